"""Inputs bounded by policy (docs/reliability.md, "Bounded inputs"): ``data.max_audio_seconds``
and ``data.max_text_chars`` skip longer examples, counted with the reason and recorded per
example id in the store; a transcript that is not UTF-8 is a counted skip (it used to be
decoded with replacement characters and fed to the model); ``--dry-run`` prints the bounds,
the speech memory they plan and the skipped ids.

The attack: one 10-minute recording made the pilot allocate 86 GB, and every resume failed
the same way. Reproduced small: the FLEURS fixture (tests/fleurs_fixture.py) plus a 70 s
recording (over the 60 s default), a 1,200-character transcript (over the 1,000 default)
and a Latin-1 transcript, in en_us.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zarr
from fleurs_fixture import build_fleurs
from helpers import build_model_dir, collect_config, local_collect

from crossmodal.collect.config import load_config
from crossmodal.collect.plan import attention_bytes, build_plan, format_plan
from crossmodal.data.fleurs import FleursParquetSource, FleursSource
from crossmodal.data.sources import Bounds, OrganismSource
from crossmodal.store.collect_store import skipped_examples
from crossmodal.store.verify import verify_store

LONG_S = 70.0
DEFAULTS = Bounds(60.0, 1000)


@pytest.fixture(scope="module")
def fleurs(tmp_path_factory) -> Path:
    """The FLEURS fixture (raw layout) with a too-long recording (1010), a too-long
    transcript (1011) and a Latin-1 transcript (1012) in en_us."""
    root = build_fleurs(tmp_path_factory.mktemp("fleurs")).root
    cfg = root / "data" / "en_us"
    t = np.arange(int(16_000 * LONG_S)) / 16_000
    sf.write(cfg / "audio" / "test" / "long.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16_000)
    sf.write(cfg / "audio" / "test" / "text.wav", 0.3 * np.sin(2 * np.pi * 440 * t[:4000]), 16_000)
    lines = [
        "1010\tlong.wav\tA very long recording.\ta very long recording\ta|v\t1120000\tMALE",
        f"1011\ttext.wav\t{'word ' * 240}\twords\tw\t4000\tMALE",
    ]
    with (cfg / "test.tsv").open("ab") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b"1012\ttext.wav\tCaf\xe9 au lait.\tcaf au lait\tc\t4000\tFEMALE\n")
    return root


def test_long_recording_is_a_counted_skip(fleurs):
    source = FleursSource(fleurs, audio=True, bounds=DEFAULTS)
    ids = [r.id for r in source.records("eng", "test")]
    assert "1010" not in ids and {"1001", "1002", "1003", "1008"} <= set(ids)
    assert source.skipped.counts["audio_too_long"] == 1
    assert source.skipped.ids["audio_too_long"] == ["eng/test/1010"]
    assert "long.wav: 70.0 s, longer than max_audio_seconds 60" in str(source.skipped)
    unbounded = FleursSource(fleurs, audio=True)  # no bounds: the old behaviour
    assert "1010" in [r.id for r in unbounded.records("eng", "test")]


def test_long_and_non_utf8_text_are_counted_skips(fleurs):
    source = FleursSource(fleurs, audio=False, bounds=DEFAULTS)
    records = {r.id: r for r in source.records("eng", "test")}
    assert "1011" not in records and "1012" not in records
    assert not any("\ufffd" in r.text for r in records.values())  # never a replacement char
    assert source.skipped.ids["text_too_long"] == ["eng/test/1011"]
    assert source.skipped.ids["text_not_utf8"] == ["eng/test/1012"]
    assert source.skipped.ids["text_empty"] == ["eng/test/1007"]


def test_parquet_bounds(tmp_path):
    fx = build_fleurs(tmp_path)
    source = FleursParquetSource(fx.parquet_root, audio=True, bounds=Bounds(0.2, None))
    ids = [r.id for r in source.records("eng", "test")]  # fixture clips are 0.25 s
    assert ids == [] and source.skipped.counts["audio_too_long"] >= 4
    text = FleursParquetSource(fx.parquet_root, audio=False, bounds=Bounds(None, 12))
    kept = [r.text for r in text.records("eng", "test")]
    assert kept and all(len(t) <= 12 for t in kept)
    assert "eng/test/1002" in text.skipped.ids["text_too_long"]  # "The second sentence."


def test_organism_bounds():
    source = OrganismSource(4, audio=False, bounds=Bounds(None, 5))
    assert list(source.records("eng", "test")) == []
    assert source.skipped.counts["text_too_long"] == 4
    default = OrganismSource(4, audio=True, bounds=DEFAULTS)  # the defaults skip nothing
    assert len(list(default.records("eng", "test"))) == 4 and not default.skipped.counts


def test_the_bound_plans_the_speech_memory(fleurs):
    raw = {
        "model": "organism",
        "languages": ["eng", "deu"],
        "tasks": ["asr"],
        "modalities": ["speech"],
        "data": {"source": "fleurs_raw", "path": str(fleurs)},
    }
    config = load_config(raw)
    ten_minutes = load_config({**raw, "data": {**raw["data"], "max_audio_seconds": 600}})
    assert attention_bytes(ten_minutes) == 100 * attention_bytes(config)  # quadratic
    plan = build_plan(config)
    text = format_plan(plan, {"decoder": 1})
    assert "  inputs     audio <= 60 s (speech encoder attention <= " in text
    assert "text <= 1,000 chars; longer examples are skipped and counted" in text
    assert "    text_not_utf8      eng/test/1012" in text
    assert "    text_too_long      eng/test/1011" in text
    planned = {i for w in plan.work_units for i in w.example_ids}
    assert not planned & {"1011", "1012"}  # text skips never become examples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


def test_collect_skips_the_long_recording_and_records_why(model_dir, fleurs, tmp_path, monkeypatch):
    """The recording is skipped while loading, before the pilot or a work unit runs the
    model on it; every skip is recorded per example id in the store."""
    out = tmp_path / "s.zarr"
    raw = collect_config(
        model_dir,
        out,
        languages=["eng", "deu"],
        tasks=["asr"],
        modalities=["speech"],
        families=["decoder"],
        data={"source": "fleurs_raw", "path": str(fleurs)},
    )
    lines: list[str] = []
    local_collect(monkeypatch, raw, echo=lines.append)
    assert verify_store(out).ok
    root = zarr.open_group(str(out), mode="r")
    skipped = skipped_examples(root)
    assert skipped["audio_too_long"] == ["eng/test/1010"]
    assert skipped["text_too_long"] == ["eng/test/1011"]
    assert skipped["text_not_utf8"] == ["eng/test/1012"]
    assert skipped["audio_undecodable"] == ["eng/test/1004"]  # not 1008: its 2nd recording is used
    assert any(
        line.startswith("skipped examples: audio_missing=1, audio_too_long=1") for line in lines
    )
    n = root["stats/decoder/n_skipped"][...]
    assert int(n.sum()) == 4  # 1004, 1005, 1006, 1010 (text skips never became examples)
