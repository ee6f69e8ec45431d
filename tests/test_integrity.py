"""Integrity (docs/reliability.md, "Integrity"): every damage the attack on the organism found
is one line of ``crossmodal verify`` naming the array, the chunk and the fix, verify never
raises, reduce's check (:func:`crossmodal.store.verify.check_integrity`) sees it, and the
collect resume redoes the damaged work units, giving the clean run's values.

Damage, one test each: 16 flipped bytes in a mean shard, a truncated shard, a deleted mean
shard (all three redone by the resume), a changed ``config.seed`` / ``config.steps`` in the
root attrs, a deleted array ``zarr.json`` (both refused: no work unit rewrites them). Before
layout 2 the flipped bytes and the edited config passed verify, the truncated shard and the
deleted ``zarr.json`` made it raise, and the deleted shard passed the resume (reduce then
read NaN).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner
from helpers import assert_same_arrays, build_model_dir, collect_config, local_collect

from crossmodal.cli import verify as verify_command
from crossmodal.store.layout import StoreError
from crossmodal.store.verify import check_integrity, verify_store

COND = "x2en/text/deu"
FIX = "run `crossmodal collect CONFIG` again (the store's own config): its resume redoes them"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def raw(model_dir, tmp_path_factory) -> dict:
    """The organism config of tests/test_verify.py, parts deleted after merging (lean)."""
    return collect_config(model_dir, tmp_path_factory.mktemp("good") / "s.zarr", keep_parts=False)


@pytest.fixture(scope="module")
def good_store(raw) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
    return Path(raw["output"])


@pytest.fixture
def store(good_store, tmp_path) -> Path:
    """A fresh copy of the good store, to damage."""
    return Path(shutil.copytree(good_store, tmp_path / "s.zarr"))


def _shard(store: Path, array: str, key: str = COND, step: int = 0, pooling: int = 0) -> Path:
    """The shard file of ``array`` (a stats array) for condition ``key``, step and pooling."""
    root = zarr.open_group(str(store), mode="r")
    labels = {
        d: [str(v) for v in root[f"stats/decoder/{d}"][...]]
        for d in ("task", "modality", "language")
    }
    axes = ("task", "modality", "language")
    at = [labels[d].index(v) for d, v in zip(axes, key.split("/"), strict=True)]
    tail = (0, 0) if array.endswith("hist") else (0,)  # unit (and bin): one shard
    path = store / array / "c" / "/".join(map(str, (*at, step, pooling, *tail)))
    assert path.is_file(), path
    return path


def _units_of(store: Path, key: str = COND) -> list[int]:
    plan = zarr.open_group(str(store), mode="r")["plan"].attrs["work_units"]
    return [w["index"] for w in plan if f"{w['task']}/{w['modality']}/{w['language']}" == key]


def _line(problems: list[str], text: str) -> str:
    hits = [p for p in problems if text in p]
    assert hits, problems
    assert all("\n" not in p for p in problems)
    return hits[0]


def _resume_gives_the_clean_store(raw: dict, store: Path, good_store: Path, monkeypatch) -> None:
    lines: list[str] = []
    result = local_collect(monkeypatch, {**raw, "output": str(store)}, echo=lines.append)
    assert result["ran"] == len(_units_of(store)), lines
    assert any(line.startswith("resume: ") and "recollecting work units" in line for line in lines)
    assert verify_store(store).ok
    assert_same_arrays(good_store, store)


def test_good_store_has_no_damage(good_store):
    assert check_integrity(good_store) == []
    assert verify_store(good_store).ok


def test_flipped_bytes_in_a_mean_shard(raw, store, good_store, monkeypatch):
    shard = _shard(store, "stats/decoder/mean")
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(verify_command, [str(store)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "stats/decoder/mean chunk [" in result.output
    line = _line(verify_store(store).problems, "stats/decoder/mean chunk [")
    assert "unreadable" in line and "checksum" in line
    assert f"recollect work units {_units_of(store)}: {FIX}" in line
    assert _line(check_integrity(store), "stats/decoder/mean chunk [")
    _resume_gives_the_clean_store(raw, store, good_store, monkeypatch)


def test_truncated_shard(raw, store, good_store, monkeypatch):
    shard = _shard(store, "stats/decoder/hist", step=1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    line = _line(verify_store(store).problems, "stats/decoder/hist chunk [")
    assert "unreadable" in line and FIX in line
    _resume_gives_the_clean_store(raw, store, good_store, monkeypatch)


def test_deleted_mean_shard(raw, store, good_store, monkeypatch):
    _shard(store, "stats/decoder/mean").unlink()
    line = _line(verify_store(store).problems, "stats/decoder/mean chunk [")
    assert "shard file missing" in line and f"recollect work units {_units_of(store)}" in line
    assert _line(check_integrity(store), "shard file missing")
    _resume_gives_the_clean_store(raw, store, good_store, monkeypatch)


@pytest.mark.parametrize(("field", "value"), [("seed", 1), ("steps", [1, 2])])
def test_changed_config_in_the_root_attrs(raw, store, monkeypatch, field, value):
    root = zarr.open_group(str(store), mode="r+")
    config = dict(root.attrs["config"])
    assert config[field] != value
    root.attrs["config"] = {**config, field: value}
    line = _line(verify_store(store).problems, "attrs config: the stored config hashes to")
    assert "config_hash says" in line and "collect again into a new output" in line
    assert _line(check_integrity(store), "attrs config")
    with pytest.raises(StoreError, match=r"attrs config: the stored config hashes to"):
        local_collect(monkeypatch, {**raw, "output": str(store)})


def test_deleted_array_metadata(raw, store, monkeypatch):
    (store / "stats/decoder/mean/zarr.json").unlink()
    report = verify_store(store)  # never raises
    line = _line(report.problems, "stats/decoder/mean: array metadata unreadable")
    assert "cannot be repaired by work unit: collect again into a new output" in line
    with pytest.raises(StoreError) as err:
        local_collect(monkeypatch, {**raw, "output": str(store)})
    assert "stats/decoder/mean: array metadata unreadable" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_damage_never_raises(store):
    (store / "manifest" / "zarr.json").write_text("{not json")
    report = verify_store(store)
    assert not report.ok and all("\n" not in p for p in report.problems)
    assert check_integrity(store)


def test_parts_recorded_done_but_missing_are_redone(raw, store, good_store, monkeypatch):
    """A condition whose parts are recorded done but whose shards are gone (not merged): the
    resume redoes them instead of merging from nothing (the old resume merged NaN)."""
    root = zarr.open_group(str(store), mode="r+")
    root["manifest"].attrs["merged"] = [k for k in root["manifest"].attrs["merged"] if k != COND]
    del root.attrs["finished"]
    assert not any((store / "parts/decoder/mean/c").glob(f"{_units_of(store)[0]}"))  # lean store
    _resume_gives_the_clean_store(raw, store, good_store, monkeypatch)


def test_encoder_families_and_speech_resume_without_false_damage(model_dir, tmp_path, monkeypatch):
    """Families that skip a modality (speech_encoder on text) hold no rows there: not damage;
    a complete store resumes with nothing to redo."""
    out = tmp_path / "enc.zarr"
    raw = collect_config(
        model_dir,
        out,
        languages=["eng", "deu"],
        tasks=["x2en"],
        modalities=["speech", "text"],
        families=["decoder", "encoder"],
        data={"source": "organism", "examples_per_language": 2},
        keep_parts=False,
    )
    local_collect(monkeypatch, raw)
    assert check_integrity(out) == [] and verify_store(out).ok
    lines: list[str] = []
    again = local_collect(monkeypatch, raw, echo=lines.append)
    assert again["ran"] == 0 and not any(line.startswith("resume: ") for line in lines)
