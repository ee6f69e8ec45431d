"""FLEURS adapters (raw TSV + tar/extracted audio, Parquet copy), joins and skip counting.

Tricky cases covered: a repeated id (first recording by file name wins; if it is corrupt
the next one is used), tar members not in file-name order, a malformed TSV line, a
whitespace-only text, corrupt / missing / truncated audio, a broken tar.gz, text-only
loading with no audio on disk, resampling from 8 and 22.05 kHz, stereo, alternative audio
roots keyed by Seamless code or FLEURS config, Parquet row groups smaller than the data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fleurs_fixture import CODES, RESYNTH_FREQ, ROWS, FleursFixture, build_fleurs, wav_bytes
from scipy.signal import resample_poly

from crossmodal.data.fleurs import FleursParquetSource, FleursSource, ParquetColumns
from crossmodal.data.records import Record
from crossmodal.data.sources import (
    DataError,
    DataSource,
    OrganismSource,
    SkipReport,
    join_by_id,
    joined_records,
    open_source,
)

EN_SKIPS = {
    "audio_undecodable": 2,  # d.wav, h_1.wav (1008 falls back to h_2.wav)
    "audio_missing": 1,  # e.wav
    "audio_truncated": 1,  # f.wav
    "text_empty": 1,  # g.wav
    "row_malformed": 1,
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> FleursFixture:
    return build_fleurs(tmp_path_factory.mktemp("fleurs"))


def peak_hz(audio: np.ndarray, sr: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sr)[np.argmax(spectrum)])


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.id: r for r in records}


def test_text_only_fields_and_first_recording_by_file_name(fx: FleursFixture) -> None:
    src = FleursSource(fx.root, audio=False)
    recs = list(src.records("eng", "test"))
    assert [r.id for r in recs] == ["1001", "1002", "1003", "1004", "1005", "1006", "1008"]
    r = by_id(recs)["1002"]
    assert (r.language, r.text, r.split, r.audio, r.sampling_rate) == (
        "eng",
        "The second sentence.",
        "test",
        None,
        None,
    )  # b_1.wav sorts before b_2.wav
    assert dict(src.skipped.counts) == {"text_empty": 1, "row_malformed": 1}
    normalized = FleursSource(fx.root, audio=False, text_field="normalized")
    assert by_id(list(normalized.records("eng", "test")))["1001"].text == "hello world"


def test_text_only_never_needs_audio(fx: FleursFixture, tmp_path: Path) -> None:
    cfg = tmp_path / "data" / "de_de"
    cfg.mkdir(parents=True)
    (cfg / "test.tsv").write_bytes((fx.root / "data" / "de_de" / "test.tsv").read_bytes())
    recs = list(FleursSource(tmp_path, audio=False).records("deu", "test"))
    assert [r.text for r in recs] == [row.raw for row in ROWS["de_de"]]
    with pytest.raises(
        DataError,
        match=r"^audio must be one of \[.*test.tar.gz, .*test/\], got neither .*; download it",
    ):
        FleursSource(tmp_path).records("deu", "test")


@pytest.mark.parametrize("layout", ["extracted", "tar"])
def test_audio_records_resampling_and_skips(fx: FleursFixture, layout: str) -> None:
    src = FleursSource(fx.root, audio_layout=layout)
    recs = by_id(list(src.records("eng", "test")))
    assert sorted(recs) == ["1001", "1002", "1003", "1008"]
    assert dict(src.skipped.counts) == EN_SKIPS
    for r in recs.values():
        assert r.sampling_rate == 16_000 and r.audio.dtype == np.float32 and r.audio.ndim == 1
        assert np.abs(r.audio).max() <= 1.0 and len(r.audio) == 4000  # 0.25 s at 16 kHz
    # 1002 is b_1.wav (300 Hz at 8 kHz), not b_2.wav (500 Hz); 1008 fell back to h_2.wav.
    assert {i: peak_hz(recs[i].audio) for i in recs} == {
        "1001": 440.0,
        "1002": 300.0,
        "1003": 440.0,
        "1008": 700.0,
    }
    # Exact reference: scipy's polyphase resampler on the decoded PCM16 samples.
    pcm = sf.read(io.BytesIO(wav_bytes(300.0, 8_000)))[0]
    np.testing.assert_allclose(recs["1002"].audio, resample_poly(pcm, 2, 1), atol=2e-6)
    stereo = sf.read(io.BytesIO(wav_bytes(440.0, 22_050, stereo=True)))[0]
    np.testing.assert_allclose(
        recs["1003"].audio, resample_poly(stereo.mean(axis=1), 320, 441), atol=2e-6
    )
    assert 0.29 < np.abs(recs["1003"].audio).max() < 0.31  # (0.5 + 0.1) / 2
    assert "eng/test/1005" in " ".join(src.skipped.examples["audio_missing"])


def test_tar_and_extracted_agree(fx: FleursFixture) -> None:
    tar = by_id(list(FleursSource(fx.root, audio_layout="tar").records("eng", "test")))
    ext = by_id(list(FleursSource(fx.root, audio_layout="extracted").records("eng", "test")))
    assert tar.keys() == ext.keys()
    for i in tar:
        assert tar[i] == ext[i]  # id, language, text, rate, split
        np.testing.assert_array_equal(tar[i].audio, ext[i].audio)


def test_one_record_per_recording(fx: FleursFixture) -> None:
    src = FleursSource(fx.root, one_per_id=False)
    recs = list(src.records("eng", "test"))
    assert sorted(r.id for r in recs) == ["1001", "1002", "1002", "1003", "1008"]
    assert sorted(peak_hz(r.audio) for r in recs if r.id == "1002") == [300.0, 500.0]


def test_join_by_id_aligns_languages(fx: FleursFixture) -> None:
    src = FleursSource(fx.root, audio=False)
    joined = joined_records(src, ["eng", "deu", "cmn"], "test")
    assert list(joined) == ["eng", "deu", "cmn"]
    for lang, recs in joined.items():
        assert [r.id for r in recs] == ["1001", "1003", "1008"]
        assert {r.language for r in recs} == {lang}
    assert joined["cmn"][0].text == "你好，世界。"
    # Then audio for the joined ids only; every config's audio layout is exercised.
    ids = [r.id for r in joined["eng"]]
    audio = FleursSource(fx.root)
    with_audio = join_by_id({c: audio.records(c, "test", ids=ids) for c in CODES.values()})
    assert [r.id for r in with_audio["deu"]] == ids
    assert [peak_hz(r.audio) for r in with_audio["cmn"]] == [620.0, 640.0, 660.0]
    assert audio.skipped.counts["audio_missing"] == 0  # 1005 was never requested


def test_join_keeps_first_duplicate_and_sorts_numerically() -> None:
    a = [Record("10", "eng", "x"), Record("9", "eng", "first"), Record("9", "eng", "second")]
    b = [Record("9", "deu", "y"), Record("10", "deu", "z"), Record("11", "deu", "w")]
    joined = join_by_id({"eng": a, "deu": b})
    assert [r.id for r in joined["eng"]] == ["9", "10"]
    assert joined["eng"][0].text == "first"
    assert join_by_id({}) == {}


def test_parquet_matches_raw_layout(fx: FleursFixture) -> None:
    raw = by_id(list(FleursSource(fx.root).records("eng", "test")))
    src = FleursParquetSource(fx.parquet_root, batch_size=3)
    pq_recs = by_id(list(src.records("eng", "test")))
    assert pq_recs.keys() == raw.keys()
    for i in raw:
        assert pq_recs[i] == raw[i]
        np.testing.assert_array_equal(pq_recs[i].audio, raw[i].audio)
    expected = {k: v for k, v in EN_SKIPS.items() if k != "row_malformed"}
    assert dict(src.skipped.counts) == expected
    text = list(FleursParquetSource(fx.parquet_root, audio=False).records("cmn", "test"))
    assert [r.text for r in text] == [row.raw for row in ROWS["cmn_hans_cn"]]


def test_parquet_dev_as_validation_and_custom_columns(fx: FleursFixture, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(fx.parquet_root / "de_de" / "test" / "0000.parquet")
    table = table.rename_columns(
        [{"raw_transcription": "sentence"}.get(n, n) for n in table.column_names]
    )
    (tmp_path / "de_de").mkdir()
    pq.write_table(table.drop_columns(["audio"]), tmp_path / "de_de" / "validation.parquet")
    src = FleursParquetSource(tmp_path, audio=False, columns=ParquetColumns(raw_text="sentence"))
    assert [r.text for r in src.records("deu", "dev")] == [row.raw for row in ROWS["de_de"]]
    with pytest.raises(
        DataError, match=r"^column must be one of .*got 'audio'; set ParquetColumns"
    ):
        list(
            FleursParquetSource(tmp_path, columns=ParquetColumns(raw_text="sentence")).records(
                "deu", "dev"
            )
        )


@pytest.mark.parametrize("cls_root", ["root", "parquet_root"])
def test_audio_root_replaces_recordings(fx: FleursFixture, cls_root: str) -> None:
    cls = FleursSource if cls_root == "root" else FleursParquetSource
    src = cls(getattr(fx, cls_root), audio_root=fx.audio_root)
    eng = by_id(list(src.records("eng", "test")))  # AUDIO_ROOT/eng/ (Seamless code)
    deu = by_id(list(src.records("deu", "test")))  # AUDIO_ROOT/de_de/ (FLEURS config)
    assert sorted(eng) == ["1001", "1002", "1003"] and sorted(deu) == ["1001", "1003", "1008"]
    assert {peak_hz(r.audio) for r in [*eng.values(), *deu.values()]} == {RESYNTH_FREQ}
    assert eng["1002"].text == "The second sentence."
    assert src.skipped.counts["audio_missing"] == 5  # eng 1004-1006, 1008; deu 1002
    with pytest.raises(
        DataError, match=r"^audio_root must be one of .*no cmn/test/ or cmn_hans_cn"
    ):
        src.records("cmn", "test")


def test_broken_tar_is_counted_not_raised(fx: FleursFixture, tmp_path: Path) -> None:
    cfg = tmp_path / "data" / "de_de"
    (cfg / "audio").mkdir(parents=True)
    (cfg / "test.tsv").write_bytes((fx.root / "data" / "de_de" / "test.tsv").read_bytes())
    archive = (fx.root / "data" / "de_de" / "audio" / "test.tar.gz").read_bytes()
    (cfg / "audio" / "test.tar.gz").write_bytes(archive[: len(archive) // 2])
    src = FleursSource(tmp_path)
    recs = list(src.records("deu", "test"))
    assert len(recs) + src.skipped.counts["audio_unreadable"] == 4
    assert src.skipped.counts["audio_unreadable"] >= 1 and src.skipped.total == 4 - len(recs)


def test_bad_configuration_raises_one_line(fx: FleursFixture, tmp_path: Path) -> None:
    src = FleursSource(fx.root, audio=False)
    cases = [
        (
            lambda: src.records("xx", "test"),
            r"^language must be one of \[.*\] \(96 in all\), got 'xx'",
        ),
        (lambda: src.records("en_us", "test"), r"got 'en_us'; .*use 'eng'"),
        (
            lambda: src.records("jpn", "test"),
            r"^language must be one of \['cmn', 'deu', 'eng'\], got 'jpn'; .*ja_jp",
        ),
        (
            lambda: src.records("eng", "validation"),
            r"^split must be one of .*FLEURS calls its validation split 'dev'",
        ),
        (
            lambda: src.records("eng", "train"),
            r"^split file must be one of .*this split is missing",
        ),
        (
            lambda: FleursSource(tmp_path / "nowhere"),
            r"^FLEURS root must be one of .*google/fleurs",
        ),
        (lambda: FleursParquetSource(tmp_path / "nowhere"), r"^Parquet root must be one of"),
        (
            lambda: FleursSource(fx.root, text_field="norm"),
            r"^text_field must be one of \['raw', 'normalized'\], got 'norm'",
        ),
        (lambda: FleursSource(fx.root, audio_layout="zip"), r"^audio_layout must be one of"),
        (
            lambda: FleursSource(fx.root, audio_root=tmp_path / "nowhere"),
            r"^audio_root must be one of",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


def test_skip_report_merge_and_str() -> None:
    a, b = SkipReport(max_examples=2), SkipReport()
    for i in range(3):
        a.add("audio_missing", f"eng/test/{i}")
    b.add("text_empty", "deu/test/9")
    b.add("audio_missing", "deu/test/8")
    a.merge(b)
    assert a.total == 5 and dict(a.counts) == {"audio_missing": 4, "text_empty": 1}
    assert a.examples["audio_missing"] == ["eng/test/0", "eng/test/1"]
    assert a.as_dict()["text_empty"] == {
        "count": 1,
        "examples": ["deu/test/9"],
        "ids": ["deu/test/9"],
    }
    assert a.ids["audio_missing"] == ["eng/test/0", "eng/test/1", "eng/test/2", "deu/test/8"]
    assert str(a).startswith("5 skipped: audio_missing=4 (e.g. eng/test/0, eng/test/1)")
    assert str(SkipReport()) == "nothing skipped"


def test_sources_satisfy_protocol(fx: FleursFixture) -> None:
    for src in (FleursSource(fx.root), FleursParquetSource(fx.parquet_root), OrganismSource(4)):
        assert isinstance(src, DataSource)


def test_organism_source_filters_language_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: list[tuple] = []

    def organism_corpus(
        split: str, languages: list[str], n_sentences: int, seed: int, *, audio: bool
    ) -> list[Record]:
        calls.append((split, tuple(languages), n_sentences, seed, audio))
        texts = {i: "" if i == 2 else "w{i}" for i in range(n_sentences)}
        return [
            Record(str(i), lang, t, split=split) for i, t in texts.items() for lang in languages
        ]

    fake = types.ModuleType("crossmodal.organism.corpus")
    fake.organism_corpus = organism_corpus  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crossmodal.organism.corpus", fake)
    src = OrganismSource(4, seed=7, languages=("eng", "deu"), audio=False)
    assert [r.id for r in src.records("deu", "dev")] == ["0", "1", "3"]
    assert [r.language for r in src.records("eng", "dev")] == ["eng"] * 3
    # built once per (split, language), and only for the languages asked for
    assert calls == [("dev", ("deu",), 4, 7, False), ("dev", ("eng",), 4, 7, False)]
    assert dict(src.skipped.counts) == {"text_empty": 2}
    assert [r.id for r in src.records("deu", "dev", ids=["3", "0"])] == ["0", "3"]
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"^language must be one of \['deu', 'eng'\], got 'fra'"):
        src.records("fra", "dev")
    with pytest.raises(DataError, match=r"^n_sentences must be a positive integer, got 0"):
        OrganismSource(0)


def test_organism_source_real_corpus() -> None:
    pytest.importorskip("crossmodal.organism.corpus")
    src = OrganismSource(3, seed=0, languages=("eng", "deu"))
    eng, deu = list(src.records("eng", "test")), list(src.records("deu", "test"))
    assert len(eng) == len(deu) == 3 and src.skipped.total == 0
    for r in eng:
        assert r.language == "eng" and r.split == "test" and r.text.strip()
        assert r.sampling_rate == 16_000 and r.audio.dtype == np.float32 and r.audio.ndim == 1
    joined = join_by_id({"eng": eng, "deu": deu})
    assert [r.id for r in joined["eng"]] == [r.id for r in joined["deu"]] and len(
        joined["eng"]
    ) == 3


def test_open_source_picks_the_configured_kind(fx: FleursFixture) -> None:
    assert isinstance(open_source("fleurs_raw", path=fx.root, audio=False), FleursSource)
    parquet = open_source("fleurs_parquet", path=fx.parquet_root, audio=False)
    assert isinstance(parquet, FleursParquetSource)
    organism = open_source("organism", n_sentences=4, seed=7, audio=False)
    assert isinstance(organism, OrganismSource)
    assert (organism.n_sentences, organism.seed, organism.audio) == (4, 7, False)
    with pytest.raises(ValueError, match=r"^data source must be one of \['organism', "):
        open_source("fleurs", path=fx.root)


def test_open_source_organism_matches_the_corpus() -> None:
    corpus = pytest.importorskip("crossmodal.organism.corpus")
    source = open_source("organism", n_sentences=3, seed=0, audio=False)
    expected = corpus.organism_corpus("test", ["eng", "deu"], 3, 0, audio=False)
    for language in ("eng", "deu"):
        got = [(r.id, r.text) for r in source.records(language, "test")]
        assert got == [(r.id, r.text) for r in expected if r.language == language]
