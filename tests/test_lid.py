"""Language identification: the Protocol seam and the organism's exact identifier.

Edge cases: empty text, tokens that are no organism word, code-mixed texts, ties.
"""

from __future__ import annotations

import json

import pytest

from crossmodal.organism.corpus import organism_corpus
from crossmodal.organism.grammar import ORGANISM_LANGUAGES, lexicon
from crossmodal.steer.lid import (
    BACKENDS,
    LanguageIdentifier,
    OrganismLID,
    get_identifier,
    top_language,
)


@pytest.fixture(scope="module")
def lid() -> OrganismLID:
    return OrganismLID()


def test_organism_lid_satisfies_protocol(lid):
    assert isinstance(lid, LanguageIdentifier)
    assert lid.languages == ORGANISM_LANGUAGES
    assert set(BACKENDS) >= {"organism"}
    assert isinstance(get_identifier("organism"), OrganismLID)


def test_unknown_backend_is_one_line_error():
    with pytest.raises(ValueError, match=r"lid backend must be one of \['organism'.*got 'cld3'"):
        get_identifier("cld3")


@pytest.mark.parametrize("split", ["dev", "test"])
def test_exact_on_reference_texts(lid, split):
    records = organism_corpus(split, n_sentences=30, audio=False)
    probs = lid.identify([r.text for r in records])
    for rec, p in zip(records, probs, strict=True):
        assert p[rec.language] == 1.0
        assert sum(p.values()) == 1.0
        assert lid.token_languages(rec.text) == [rec.language] * len(rec.text.split())
        assert lid.top_language(rec.text) == rec.language
        assert lid.is_pure(rec.text, rec.language)
    tops = [top_language(p) for p in lid.identify([r.text for r in records])]
    assert tops == [r.language for r in records]


def test_every_word_has_exactly_one_language(lid):
    seen: dict[str, str] = {}
    for lang, words in lexicon().items():
        for word in words.values():
            assert word not in seen, f"{word!r} in {seen.get(word)} and {lang}"
            seen[word] = lang
            assert lid.token_languages(word) == [lang]


def test_code_mixed_shares_are_exact(lid):
    eng, deu, jpn = (list(lexicon()[lang].values()) for lang in ("eng", "deu", "jpn"))
    text = " ".join([eng[0], eng[1], eng[2], deu[0], jpn[0], "zzz-not-a-word"])
    shares = lid.shares(text)
    assert shares == {"eng": 3 / 6, "deu": 1 / 6, "spa": 0.0, "fra": 0.0, "jpn": 1 / 6, "cmn": 0.0}
    assert lid.token_languages(text) == ["eng", "eng", "eng", "deu", "jpn", None]
    assert lid.top_language(text) == "eng"
    assert not lid.is_pure(text, "eng")


def test_empty_and_unknown_texts(lid):
    assert lid.identify(["", "   "]) == [dict.fromkeys(ORGANISM_LANGUAGES, 0.0)] * 2
    assert lid.top_language("") is None
    assert lid.top_language("hello world") is None
    assert not lid.is_pure("", "eng")


def test_top_language_ties_and_zeros():
    assert top_language({"a": 0.5, "b": 0.5}) == "a"
    assert top_language({"a": 0.0, "b": 0.0}) is None
    assert top_language({}) is None


def test_custom_lexicon_and_bad_words():
    lid = OrganismLID({"uno": "spa", "one": "eng"})
    assert lid.languages == ("spa", "eng")
    assert lid.identify(["one uno uno"]) == [{"spa": 2 / 3, "eng": 1 / 3}]
    with pytest.raises(
        ValueError, match="words must be non-empty and without whitespace, got 'two words'"
    ):
        OrganismLID({"two words": "eng"})


def test_from_model_dir(tmp_path, lid):
    (tmp_path / "organism_lexicon.json").write_text(json.dumps(lexicon(), ensure_ascii=False))
    loaded = OrganismLID.from_model_dir(tmp_path)
    assert loaded.languages == lid.languages
    text = " ".join(lexicon()["cmn"].values())
    assert loaded.shares(text) == lid.shares(text)
    with pytest.raises(ValueError, match="model directory must hold organism_lexicon.json"):
        OrganismLID.from_model_dir(tmp_path / "nowhere")
