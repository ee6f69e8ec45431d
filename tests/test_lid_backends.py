"""The LID registry: label mapping, bundled backends against their libraries, fastText errors.

Edge cases: empty and whitespace texts (no language), labels that map to one code (no/nb),
GlotLID's ``xxx_Script`` labels, a missing model path, a missing ``fasttext`` package.
"""

from __future__ import annotations

import sys

import pytest

from crossmodal.steer.lid import (
    BACKENDS,
    LanguageIdentifier,
    LidError,
    get_identifier,
    lid_columns,
    to_seamless,
    top_language,
)

GERMAN = "Der Hund läuft jeden Morgen mit seinem Besitzer durch den großen Park."
ENGLISH = "The dog runs through the big park with its owner every morning."
FRENCH = "Le chien court chaque matin dans le grand parc avec son maître."


def test_label_mapping():
    assert [to_seamless(x) for x in ("de", "zh", "ja", "ms", "fa")] == [
        "deu",
        "cmn",
        "jpn",
        "zlm",
        "pes",
    ]
    assert [to_seamless(x) for x in ("DEU", "zho", "ara", "nob")] == ["deu", "cmn", "arb", "nob"]
    assert to_seamless("__label__eng_Latn") == "eng" and to_seamless("__label__cmn_Hani") == "cmn"
    assert to_seamless("__label__en") == "eng" and to_seamless("la") == "la"
    assert top_language({}) is None and top_language({"deu": 0.4, "eng": 0.4, "fra": 0.2}) == "deu"


def test_organism_backend_is_exact():
    from crossmodal.organism import organism_corpus

    ident = get_identifier("organism")
    assert isinstance(ident, LanguageIdentifier)
    records = organism_corpus("test", ["deu", "jpn", "cmn"], 3, 0, audio=False)
    dists = ident.identify([r.text for r in records] + ["", "not organism words"])
    assert [top_language(d) for d in dists] == [r.language for r in records] + [None, None]
    assert all(d[r.language] == 1.0 for d, r in zip(dists, records, strict=False))
    mixed = " ".join(records[0].text.split()[:2] + records[1].text.split()[:2])
    assert ident.identify([mixed])[0][records[0].language] == pytest.approx(0.5)


def test_unknown_backend():
    with pytest.raises(
        LidError,
        match=r"lid backend must be one of \['organism', 'py3langid', 'lingua', 'fasttext', 'glotlid'\], got 'cld3'",
    ):
        get_identifier("cld3")
    assert set(BACKENDS) == {"organism", "py3langid", "lingua", "fasttext", "glotlid"}
    with pytest.raises(ValueError, match="model directory must hold organism_lexicon.json"):
        get_identifier("organism", "/nonexistent")


def test_py3langid_matches_library():
    from py3langid.langid import MODEL_FILE
    from py3langid.langid import LanguageIdentifier as Model

    ident = get_identifier("py3langid")
    assert isinstance(ident, LanguageIdentifier)
    dists = ident.identify([GERMAN, ENGLISH, FRENCH, "  "])
    assert [top_language(d) for d in dists] == ["deu", "eng", "fra", None]
    ref = dict(Model.from_model_file(MODEL_FILE, norm_probs=True).rank(GERMAN))
    assert dists[0]["deu"] == pytest.approx(ref["de"], abs=1e-6)
    assert dists[0]["nob"] == pytest.approx(ref["no"], abs=1e-6)  # 'no' -> nob (no 'nb' label)
    assert sum(dists[0].values()) == pytest.approx(1.0, abs=1e-4)


def test_lingua_matches_library():
    from lingua import Language, LanguageDetectorBuilder

    ident = get_identifier("lingua", languages=["eng", "deu", "fra", "spa"])
    dists = ident.identify([GERMAN, ENGLISH, FRENCH, ""])
    assert [top_language(d) for d in dists] == ["deu", "eng", "fra", None]
    ref = LanguageDetectorBuilder.from_languages(
        Language.ENGLISH, Language.GERMAN, Language.FRENCH, Language.SPANISH
    ).build()
    values = {
        v.language.iso_code_639_3.name: v.value
        for v in ref.compute_language_confidence_values(GERMAN)
    }
    assert dists[0] == pytest.approx(
        {"deu": values["DEU"], "eng": values["ENG"], "fra": values["FRA"], "spa": values["SPA"]}
    )
    with pytest.raises(LidError, match="languages must name at least two lingua languages"):
        get_identifier("lingua", languages=["eng"])


@pytest.mark.parametrize("backend", ["fasttext", "glotlid"])
def test_fasttext_missing_path_is_one_line(backend, tmp_path):
    with pytest.raises(
        LidError,
        match=f"model_path must be an existing fastText model file for backend '{backend}', got None",
    ):
        get_identifier(backend)
    missing = tmp_path / "lid.176.bin"
    with pytest.raises(LidError, match="crossmodal never downloads") as err:
        get_identifier(backend, missing)
    assert "\n" not in str(err.value)


def test_fasttext_package_missing(tmp_path, monkeypatch):
    model = tmp_path / "model.bin"
    model.write_bytes(b"not a model")
    monkeypatch.setitem(sys.modules, "fasttext", None)  # import fasttext -> ImportError
    with pytest.raises(
        LidError,
        match="fasttext must be importable for backend 'fasttext', got ImportError; pip install",
    ):
        get_identifier("fasttext", model)


TRAIN = {
    "en": [
        "the cat sits on the mat",
        "a dog runs in the park",
        "the child reads a book",
        "we eat bread",
    ],
    "de": [
        "die katze sitzt auf der matte",
        "ein hund läuft im park",
        "das kind liest ein buch",
        "wir essen brot",
    ],
}


@pytest.mark.parametrize(
    ("backend", "labels"),
    [("fasttext", {"en": "en", "de": "de"}), ("glotlid", {"en": "eng_Latn", "de": "deu_Latn"})],
)
def test_fasttext_tiny_supervised_model(backend, labels, tmp_path):
    fasttext = pytest.importorskip("fasttext")
    lines = [f"__label__{labels[lang]} {s}" for lang, sents in TRAIN.items() for s in sents] * 10
    train = tmp_path / "train.txt"
    train.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(
        str(train),
        epoch=30,
        minCount=1,
        minn=2,
        maxn=4,
        bucket=1000,
        dim=8,
        seed=0,
        thread=1,
        verbose=0,
    )
    path = tmp_path / "model.bin"
    model.save_model(str(path))
    ident = get_identifier(backend, path)
    assert ident.name == backend
    dists = ident.identify(["die katze liest\nein buch", "the dog reads a book", " "])
    assert [top_language(d) for d in dists] == ["deu", "eng", None]
    ref = dict(
        (label, p) for p, label in model.f.predict("die katze liest ein buch\n", -1, 0.0, "strict")
    )
    assert dists[0]["deu"] == pytest.approx(ref[f"__label__{labels['de']}"])
    assert sum(dists[0].values()) == pytest.approx(1.0, abs=1e-3)


def test_lid_columns():
    class Fixed:
        name = "fixed"

        languages = ("deu", "eng", "jpn")

        def identify(self, texts):
            return [{"deu": 0.7, "eng": 0.3}, {}, {"jpn": 1.0}][: len(texts)]

    cols = lid_columns(Fixed(), ["a", "", "b"], ["deu", "eng"])
    assert cols == {"top": ["deu", None, "jpn"], "p_deu": [0.7, 0.0, 0.0], "p_eng": [0.3, 0.0, 0.0]}
