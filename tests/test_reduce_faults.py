"""Reduce: crash-safe at every write boundary, resume verifies what it skips, bounded memory.

The driver (:func:`crossmodal.reduce.driver.run_reduce`) runs in-process on a tiny collect
store (3 languages, text, x2en + en2x, 3 examples each; :func:`helpers.local_collect`), with
Ray replaced by in-process stand-ins, and a kill that raises (so pytest survives; the lock's
``finally`` runs, which a real crash skips: lock take-over is tests/test_lock.py's). For each
name of :data:`crossmodal.reduce.driver.BOUNDARIES` the driver dies there once, the same call
runs again, and every array of the store, the ``reduce`` log (less timestamps) and every CSV
equal a clean run's.

Also: a changed selectivity value after the pass was recorded is noticed by the digest and
the family redone; the exact pass's accumulator does not grow when the examples double
(object sizes), and chunking the finalization gives the same AP.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from crossmodal.fleet import faults
from crossmodal.fleet.faults import ENV

K, SCOPES = 4, ("all",)


class _Died(BaseException):
    """What the patched kill raises: the driver stops right there."""


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    from helpers import build_model_dir, collect_config, local_collect

    root = tmp_path_factory.mktemp("reduce_faults")
    model = build_model_dir(root / "model")
    raw = collect_config(model, root / "collected.zarr", keep_parts=False)
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
    return Path(raw["output"])


def _reduce(store: Path, mp: pytest.MonkeyPatch, **kw: Any) -> dict:
    from helpers import LocalSession

    from crossmodal.reduce import driver

    mp.setattr(driver, "RaySession", LocalSession)
    return driver.run_reduce(
        store,
        k=K,
        scopes=SCOPES,
        csv=True,
        progress=False,
        echo=kw.pop("echo", lambda _: None),
        **kw,
    )


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def clean(collected, tmp_path_factory) -> Path:
    store = _copy(collected, tmp_path_factory.mktemp("clean") / "s.zarr")
    with pytest.MonkeyPatch.context() as mp:
        _reduce(store, mp)
    return store


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {
        path: arr[...] for path, arr in root.members(max_depth=None) if isinstance(arr, zarr.Array)
    }


def _log(store: Path) -> dict:
    log = dict(zarr.open_group(str(store), mode="r").attrs["reduce"])
    for summary in log.get("selectivity", {}).values():
        summary.pop("finished")
    return log


def _csvs(store: Path) -> dict[str, bytes]:
    folder = store.parent / f"{store.stem}-csv"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}


def _tables(store: Path) -> dict[str, pd.DataFrame]:
    folder = store.parent / f"{store.stem}-sets"
    return {p.name: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}


def _assert_same(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for path in x:
        if x[path].dtype.kind == "f":
            np.testing.assert_array_equal(x[path], y[path], err_msg=path)
        else:
            assert np.array_equal(np.asarray(x[path], object), np.asarray(y[path], object)), path
    assert _log(a) == _log(b)
    assert _csvs(a) == _csvs(b) and _csvs(a)
    ta, tb = _tables(a), _tables(b)
    assert sorted(ta) == sorted(tb) and ta
    for name, table in ta.items():
        pd.testing.assert_frame_equal(table, tb[name])


@pytest.mark.integration
def test_killed_at_every_write_boundary_then_rerun_is_identical(
    collected, clean, tmp_path, monkeypatch
):
    from crossmodal.reduce.driver import BOUNDARIES

    def died(mode: str) -> None:
        raise _Died(mode)

    monkeypatch.setattr(faults, "_kill", died)
    for boundary in BOUNDARIES:
        store = _copy(collected, tmp_path / boundary / "s.zarr")
        monkeypatch.setenv(ENV, f"driver:at={boundary}")
        with pytest.raises(_Died):
            _reduce(store, monkeypatch)
        again = _reduce(store, monkeypatch)  # the marker: it does not die again
        assert again["ran"] or again["exact_units"] or boundary.endswith("recorded"), boundary
        _assert_same(clean, store)


@pytest.mark.integration
def test_a_changed_selectivity_value_is_noticed_and_the_family_redone(clean, tmp_path, monkeypatch):
    store = _copy(clean, tmp_path / "s.zarr")
    (tmp_path / "s-sets").mkdir()
    g = zarr.open_group(str(store), mode="r+")
    g["selectivity/decoder/ap"][0, 0, 0, 0, 0] = 0.123  # damage after reduce recorded it
    lines: list[str] = []
    out = _reduce(store, monkeypatch, echo=lines.append)
    assert "selectivity/decoder" in out["ran"] and "selectivity/ffn_act" in out["skipped"]
    assert any(
        line.startswith("selectivity/decoder no longer holds what reduce recorded")
        for line in lines
    )
    x, y = _arrays(clean), _arrays(store)
    np.testing.assert_array_equal(x["selectivity/decoder/ap"], y["selectivity/decoder/ap"])
    assert _log(clean) == _log(store)


def test_exact_accumulator_does_not_grow_with_examples(tmp_path):
    """The driver-side state of the exact pass: one work unit at a time is spilled to the
    store; what stays in memory (:class:`OpenConditions`) is the same size for 2x examples."""
    from crossmodal.collect.plan import Condition, WorkUnit
    from crossmodal.reduce.exact import ExactPart, OpenConditions, Slot, spill

    def state(n_units: int, n_examples: int) -> int:
        store = str(tmp_path / f"s{n_units}_{n_examples}.zarr")
        zarr.open_group(store, path="exact/decoder", mode="w", zarr_format=3)
        cond = Condition("x2en", "text", "deu", "deu", "eng")
        units = [WorkUnit(i, cond, i, n_examples, ()) for i in range(n_units)]
        pending = OpenConditions({"x2en/text"}, units)
        rng = np.random.default_rng(0)
        for i in range(n_units - 1):
            values = {("decoder", Slot(1, "prefix_mean")): rng.random((n_examples, 64), np.float32)}
            part = ExactPart(i, "x2en/text", "deu", values)
            spill(store, part)  # what exact_pass does with each part, then it counts it
            assert not pending.add(part)
        kept = zarr.open_array(store, path="exact/decoder/spill/0/1.prefix_mean", mode="r")
        assert kept.shape == (n_examples, 64)  # nothing lost: the values are in the store
        return len(pickle.dumps(pending))

    assert state(4, 50) == state(4, 100) == state(4, 400)


def test_exact_ap_is_the_same_whatever_the_chunk(tmp_path, monkeypatch):
    """Finalizing a (task, modality) a few candidate columns at a time gives the same exact
    AP as one chunk, and that AP is sklearn's."""
    from sklearn.metrics import average_precision_score

    from crossmodal.reduce import exact
    from crossmodal.reduce.exact import ExactPart, Slot, create_exact, spill, write_exact

    rng = np.random.default_rng(1)
    slot, ids = Slot(1, "prefix_mean"), np.array([0, 2, 3, 5, 7, 8, 9])
    lab = {
        "task": np.array(["x2en"]),
        "modality": np.array(["text"]),
        "step": np.array([1]),
        "language": np.array(["deu", "eng", "jpn"]),
    }
    values = {
        lang: rng.normal(size=(n, ids.size)).astype(np.float32)
        for lang, n in (("deu", 9), ("eng", 11), ("jpn", 6))
    }
    got = []
    for chunk in (1 << 30, 4 * 26 * 3):  # one chunk; 3 columns at a time
        store = str(tmp_path / f"c{chunk}.zarr")
        union = create_exact(store, "decoder", {"x2en/text": {slot: ids}}, lab, ["prefix_mean"])
        for i, (lang, v) in enumerate(values.items()):
            spill(store, ExactPart(i, "x2en/text", lang, {("decoder", slot): v}))
        monkeypatch.setattr(exact, "SPILL_CHUNK_BYTES", chunk)
        write_exact(store, "decoder", "x2en/text", {slot: ids}, union, lab)
        got.append(zarr.open_array(store, path="exact/decoder/ap", mode="r")[...])
    np.testing.assert_array_equal(got[0], got[1])
    every = np.concatenate(list(values.values()))
    is_deu = np.r_[np.ones(9), np.zeros(17)]
    want = [average_precision_score(is_deu, every[:, j]) for j in range(ids.size)]
    np.testing.assert_allclose(got[0][0, 0, 0, 0, 0, np.searchsorted(union, ids)], want, rtol=1e-12)


def _steer_grid(store: Path, out: Path):
    from crossmodal.steer.grid import load_grid

    return load_grid(
        {
            "model": "organism",
            "selectivity": {"path": str(store)},
            "roles": ["control"],
            "unit_modalities": ["text"],
            "steps": [1],
            "languages": ["deu"],
            "set_sizes": [2],
            "random_seeds": [0],
            "n_inputs": 2,
            "lid": {"backends": ["organism"]},
            "output": str(out),
            "input_modalities": ["text"],
        }
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("boundary", "missing"),
    [
        ("reduce.selectivity.created", "selectivity"),
        ("reduce.exact.marked", "sets"),
        ("reduce.sets.csv_written", "sets"),
    ],
)
def test_steer_refuses_a_half_reduced_store(collected, tmp_path, monkeypatch, boundary, missing):
    """Killed early the old steer crashed (KeyError: 'submodule'), killed later it forced 0
    units in every cell; now: one line naming the unfinished pass and the command."""
    from crossmodal.steer.driver import run_steer
    from crossmodal.steer.source import SelectivityError

    def died(mode: str) -> None:
        raise _Died(mode)

    monkeypatch.setattr(faults, "_kill", died)
    store = _copy(collected, tmp_path / "s.zarr")
    monkeypatch.setenv(ENV, f"driver:at={boundary}")
    with pytest.raises(_Died):
        _reduce(store, monkeypatch)
    with pytest.raises(SelectivityError) as err:
        run_steer(_steer_grid(store, tmp_path / "out"), progress=False, echo=lambda _: None)
    assert str(err.value) == (
        f"selectivity store {str(store)!r} must be reduced (passes ['selectivity', 'exact', "
        f"'sets']) for decoder, got pass {missing!r} unfinished; finish it with "
        f"`crossmodal reduce {store}`"
    )
    assert not (tmp_path / "out" / "grid.json").exists()


@pytest.mark.integration
def test_steer_keys_cells_by_the_digest_reduce_recorded(clean, tmp_path):
    """A moved reduced store keeps its cell ids; other statistics give other ids, so a
    re-reduce never reuses the earlier steering results ("0 cells (17 already done)")."""
    from crossmodal.steer.grid import expand
    from crossmodal.steer.source import selectivity_digest

    def ids(store: Path) -> set[str]:
        grid = _steer_grid(store, tmp_path / "out")
        return {c.id for c in expand(grid, selectivity_digest(grid.selectivity))}

    first = ids(clean)
    moved = _copy(clean, tmp_path / "moved.zarr")
    assert ids(moved) == first
    g = zarr.open_group(str(moved), mode="r+")
    log = g.attrs["reduce"]
    digest = log["selectivity"]["decoder"]["digests"]["selectivity/decoder"]
    assert digest == selectivity_digest_of(moved)
    g["selectivity/decoder/on_p50"][0, 0, 0, 0, :3] = 7.0  # other values: other ids
    log["selectivity"]["decoder"]["digests"]["selectivity/decoder"] = selectivity_digest_of(moved)
    g.attrs["reduce"] = log
    assert not ids(moved) & first


def selectivity_digest_of(store: Path) -> str:
    from crossmodal.reduce.selectivity import selectivity_digest

    return selectivity_digest(str(store), "selectivity/decoder")


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_reduce_refuses_a_damaged_mean_shard(collected, tmp_path, monkeypatch, damage):
    """A deleted mean shard gave 4,704 NaN ``off_mean`` values and exit 0; 16 flipped bytes
    were used as statistics. Now: one line naming the damage, nothing written."""
    from crossmodal.store.layout import StoreError

    store = _copy(collected, tmp_path / "s.zarr")
    shard = sorted((store / "stats" / "decoder" / "mean" / "c").rglob("*"))
    shard = [p for p in shard if p.is_file()][0]
    if damage == "deleted":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16]
        )
        shard.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        _reduce(store, monkeypatch)
    line = str(err.value)
    assert line.startswith("store must be one of [undamaged], got ") and "\n" not in line
    assert "stats/decoder/mean" in line, line
    assert "reduce" not in zarr.open_group(str(store), mode="r").attrs
    assert not (store / "selectivity").exists()


@pytest.mark.integration
def test_a_healthy_reduce_on_ray_prints_no_error_line(collected, clean, tmp_path):
    """The exact actors (max_restarts 1) read their candidates from the store: Ray no longer
    prints "ERROR ... has constructor arguments in the object store and max_restarts > 0",
    no ERROR line at all and no empty actor log line;
    the real Ray path gives the same store as the in-process one."""
    import os
    import re
    import subprocess
    import sys

    store = _copy(collected, tmp_path / "s.zarr")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "jobs.reduce",
        str(store),
        "--k",
        str(K),
        "--scopes",
        "all",
        "--csv",
        "--no-progress",
    ]
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "exact pass re-ran 0 work units" not in output  # the actors did run
    assert "constructor arguments in the object store" not in output
    # Ray's ERROR lines, the driver's own or forwarded with a "(raylet)"/"(Actor pid=..)" prefix
    assert not re.search(r"\[[^\]]* E \d+ \d+\]", output), output[-3000:]
    empty = re.compile(r"^(\x1b\[\d+m)?\([^)]*\)(\x1b\[0m)?\s*$", re.M)
    assert not empty.search(output), output[-3000:]  # no empty forwarded log line
    _assert_same(clean, store)
