"""The model organism: languages, corpus, speech, tokenizer, the shipped model, the build.

Edge cases: words that would split into several pieces (checked for every word), splits
that could share a sentence (disjoint by content hash), outputs too short for decoding
step 11, a missing model directory, a build that must be bit-identical for one seed.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoProcessor,
    SeamlessM4TFeatureExtractor,
    SeamlessM4TProcessor,
    SeamlessM4Tv2Model,
)

from crossmodal.data.records import TARGET_SAMPLING_RATE
from crossmodal.organism import (
    ORGANISM_LANGUAGES,
    BuildConfig,
    ModelShape,
    OrganismMissingError,
    TrainConfig,
    build_organism,
    check_organism_dir,
    evaluate_organism,
    organism_corpus,
    organism_path,
)
from crossmodal.organism.evaluate import MIN_STEPS, SPEECH_MIN, TEXT_MIN, OrganismReport
from crossmodal.organism.features import FastFeatureExtractor
from crossmodal.organism.grammar import (
    MAX_WORDS,
    MIN_WORDS,
    Clause,
    NounPhrase,
    Sentence,
    draw_sentence,
    lexicon,
    render,
    split_of,
)
from crossmodal.organism.speech import synthesize, word_templates
from crossmodal.steer.lid import OrganismLID


@pytest.fixture(scope="module")
def model(shipped_organism) -> SeamlessM4Tv2Model:
    return SeamlessM4Tv2Model.from_pretrained(shipped_organism).eval()


@pytest.fixture(scope="module")
def processor(shipped_organism) -> SeamlessM4TProcessor:
    return SeamlessM4TProcessor.from_pretrained(shipped_organism)


# --- languages -------------------------------------------------------------------------


def test_lexicon_is_disjoint_and_in_its_script():
    words = {lang: set(entries.values()) for lang, entries in lexicon().items()}
    for a in ORGANISM_LANGUAGES:
        for b in ORGANISM_LANGUAGES:
            if a < b:
                assert not words[a] & words[b], (a, b)
    scripts = {"jpn": "HIRAGANA", "cmn": "CJK UNIFIED IDEOGRAPH", "eng": "LATIN"}
    for lang, entries in lexicon().items():
        prefix = scripts.get(lang, "LATIN")
        for word in entries.values():
            assert all(unicodedata.name(c).startswith(prefix) for c in word), (lang, word)


FIRST_CLAUSE_GLOSS = {
    "eng": "the big dog sees a cat in the house today",
    "deu": "the big dog sees today in the house a cat",
    "spa": "today the dog big sees a cat in the house",
    "fra": "the dog big sees today a cat in the house",
    "jpn": "today the big dog <subj> the house in a cat <obj> sees",
    "cmn": "the big <adj> dog today in the house sees a cat",
}


def test_word_order_rules():
    dog, cat, house = (
        NounPhrase("the", "big", "dog"),
        NounPhrase("a", None, "cat"),
        NounPhrase("the", None, "house"),
    )
    clause = Clause(dog, "sees", cat, ("in", house), "today")
    sentence = Sentence(clause, "and", clause)
    for lang, expected in FIRST_CLAUSE_GLOSS.items():
        gloss = {word: concept for concept, word in lexicon()[lang].items()}
        words = [gloss[w] for w in render(sentence, lang)]
        n = len(expected.split())
        assert words[:n] == expected.split(), lang
        assert words[n] == "and" and words[n + 1 :] == expected.split(), lang


def test_sentences_are_long_enough_in_every_language():
    for index in range(200):
        sentence = draw_sentence("train", index)
        for lang in ORGANISM_LANGUAGES:
            assert MIN_STEPS <= MIN_WORDS <= len(render(sentence, lang)) <= MAX_WORDS


# --- corpus -----------------------------------------------------------------------------


def test_corpus_is_deterministic_and_parallel():
    a = organism_corpus("test", n_sentences=3, seed=5)
    b = organism_corpus("test", n_sentences=3, seed=5)
    assert [(r.id, r.language, r.text) for r in a] == [(r.id, r.language, r.text) for r in b]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b, strict=True))
    assert [r.language for r in a] == list(ORGANISM_LANGUAGES) * 3
    ids = {r.id for r in a}
    assert len(ids) == 3
    for sid in ids:
        assert sorted(r.language for r in a if r.id == sid) == sorted(ORGANISM_LANGUAGES)
    other = organism_corpus("test", n_sentences=3, seed=6, audio=False)
    assert [r.text for r in other] != [r.text for r in a]


def test_splits_are_disjoint():
    keys, ids = {}, {}
    for split in ("train", "dev", "test"):
        sentences = [draw_sentence(split, i) for i in range(300)]
        assert all(split_of(s) == split for s in sentences)
        keys[split] = {s.key() for s in sentences}
        ids[split] = {r.id for r in organism_corpus(split, ["eng"], 300, audio=False)}
        assert {r.split for r in organism_corpus(split, ["eng"], 2, audio=False)} == {split}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not keys[a] & keys[b] and not ids[a] & ids[b]


def test_corpus_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match=r"split must be one of \['train', 'dev', 'test'\], got 'val'"
    ):
        organism_corpus("val")
    with pytest.raises(ValueError, match=r"language must be one of .*got 'kor'"):
        organism_corpus("test", ["eng", "kor"])
    with pytest.raises(ValueError, match="n_sentences must be >= 0"):
        organism_corpus("test", n_sentences=-1)


# --- speech ---------------------------------------------------------------------------


def test_speech_is_16k_float32_mono_and_feeds_the_extractor():
    records = organism_corpus("dev", n_sentences=2)
    extractor = SeamlessM4TFeatureExtractor()
    for rec in records:
        assert rec.sampling_rate == TARGET_SAMPLING_RATE
        assert rec.audio.dtype == np.float32 and rec.audio.ndim == 1
        assert 0.5 < rec.audio.size / TARGET_SAMPLING_RATE <= 3.0
        assert np.abs(rec.audio).max() <= 1.0
        feats = extractor(rec.audio, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="np")
        assert feats["input_features"].shape[0] == 1 and feats["input_features"].shape[2] == 160
        assert np.isfinite(feats["input_features"]).all()


def test_languages_sound_different_and_words_have_distinct_templates():
    words = render(draw_sentence("dev", 0), "eng")
    assert not np.array_equal(synthesize(words, "eng", seed=1), synthesize(words, "eng", seed=2))
    np.testing.assert_array_equal(
        synthesize(words, "eng", seed=1), synthesize(words, "eng", seed=1)
    )
    for lang in ORGANISM_LANGUAGES:
        templates = list(word_templates(lang).values())
        assert len(set(templates)) == len(templates) == len(lexicon()[lang])
    with pytest.raises(ValueError, match="words must be words of 'deu'"):
        synthesize(words, "deu")


def test_fast_features_match_the_real_extractor():
    audio = [r.audio for r in organism_corpus("dev", ["eng", "cmn"], n_sentences=2)]
    real = SeamlessM4TFeatureExtractor()(audio, sampling_rate=16000, return_tensors="np")
    fast = FastFeatureExtractor()(audio, sampling_rate=16000, return_tensors="np")
    np.testing.assert_array_equal(real["attention_mask"], fast["attention_mask"])
    np.testing.assert_allclose(fast["input_features"], real["input_features"], atol=2e-4)


# --- the shipped organism ----------------------------------------------------------------


def test_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(
        OrganismMissingError, match=r"must hold config.json.*crossmodal organism --build"
    ):
        check_organism_dir(tmp_path)


def test_shipped_directory_loads_with_plain_transformers(model, processor):
    assert isinstance(AutoProcessor.from_pretrained(organism_path()), SeamlessM4TProcessor)
    assert not model.training
    cfg = model.config
    assert (
        cfg.decoder_layerdrop == 0.0 and cfg.dropout == 0.0 and cfg.speech_encoder_layerdrop == 0.0
    )
    lang_ids = model.generation_config.text_decoder_lang_to_code_id
    assert sorted(lang_ids) == sorted(ORGANISM_LANGUAGES)
    assert processor.tokenizer.convert_tokens_to_ids([f"__{lang}__" for lang in lang_ids]) == list(
        lang_ids.values()
    )
    size = sum(f.stat().st_size for f in Path(organism_path()).iterdir())
    assert size < 20e6


def test_every_word_is_one_token(processor):
    tok = processor.tokenizer
    pieces: dict[int, str] = {}
    for lang, entries in lexicon().items():
        for word in entries.values():
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (lang, word, ids)
            assert pieces.setdefault(ids[0], lang) == lang


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_generate_from_text_and_speech(model, processor, modality):
    recs = organism_corpus("test", ["eng"], n_sentences=2)
    if modality == "text":
        inputs = processor(
            text=[r.text for r in recs], src_lang="eng", padding=True, return_tensors="pt"
        )
    else:
        inputs = processor(audio=[r.audio for r in recs], sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, tgt_lang="deu", generate_speech=False, num_beams=1)
    seqs = out.sequences
    deu_id = model.generation_config.text_decoder_lang_to_code_id["deu"]
    assert seqs[:, 0].tolist() == [3, 3] and seqs[:, 1].tolist() == [deu_id, deu_id]
    texts = processor.batch_decode(seqs, skip_special_tokens=True)
    lid = OrganismLID.from_model_dir(organism_path())
    assert all(lid.is_pure(t, "deu") for t in texts)
    assert all(len(t.split()) >= MIN_STEPS for t in texts)


def test_competence_on_held_out_sentences(shipped_organism):
    """The competence floors (TEXT_MIN, SPEECH_MIN) per task and modality (pooled over
    languages), on 40 test sentences per language; every language stays well above chance
    (0% exact match)."""
    report = evaluate_organism(n_per_language=40, batch_size=50)
    table, pooled = report.table, report.by_task()
    print(report.format())
    assert len(table) == 26 and (table["n"] == 40).all() and len(pooled) == 5
    text, speech = pooled[pooled.modality == "text"], pooled[pooled.modality == "speech"]
    assert text["exact_match"].min() >= TEXT_MIN and speech["exact_match"].min() >= SPEECH_MIN
    assert table["exact_match"].min() >= 0.6  # no language is left behind
    assert table["long_enough"].min() >= 0.9
    assert report.passed and "PASS" in report.format()


def test_report_floors_apply_per_task_pooled_over_languages():
    rows = [
        ("x2en", "speech", "deu", 10, 0.7),
        ("x2en", "speech", "spa", 30, 0.9),
        ("x2en", "text", "deu", 10, 1.0),
        ("x2en", "text", "spa", 10, 0.7),
    ]
    table = pd.DataFrame(rows, columns=["task", "modality", "language", "n", "exact_match"])
    report = OrganismReport(table.assign(long_enough=1.0))
    pooled = report.by_task().set_index(["task", "modality"])["exact_match"]
    assert pooled[("x2en", "speech")] == pytest.approx(0.85)  # (7 + 27) / 40
    assert pooled[("x2en", "text")] == pytest.approx(0.85)
    assert report.failures()[["task", "modality"]].values.tolist() == [["x2en", "text"]]
    assert "FAIL: 1 task(s) below floor" in report.format()


# --- the build ------------------------------------------------------------------------


def test_build_is_deterministic(tmp_path):
    cfg = BuildConfig(
        n_train_sentences=24,
        n_speech_sentences=3,
        shape=ModelShape(
            hidden=32,
            heads=2,
            text_encoder_layers=1,
            speech_encoder_layers=1,
            decoder_layers=1,
            ffn=32,
            decoder_ffn=32,
        ),
        train=TrainConfig(steps=3, batch_text=4, batch_speech=2, warmup=1),
        workers=1,
    )
    dirs = [build_organism(tmp_path / name, seed=3, config=cfg, log=None) for name in ("a", "b")]
    models = [SeamlessM4Tv2Model.from_pretrained(d) for d in dirs]
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = SeamlessM4Tv2Model(models[0].config).state_dict()
    assert not torch.equal(
        a["text_decoder.layers.0.ffn.fc1.weight"], init["text_decoder.layers.0.ffn.fc1.weight"]
    )
    assert (dirs[0] / "sentencepiece.bpe.model").read_bytes() == (
        dirs[1] / "sentencepiece.bpe.model"
    ).read_bytes()
    assert isinstance(AutoProcessor.from_pretrained(dirs[0]), SeamlessM4TProcessor)
