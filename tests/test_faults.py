"""Fault injection (crossmodal/fleet/faults.py) and recovery: nothing lost, nothing counted twice.

Unit tests (no Ray): the ``CROSSMODAL_FAULT`` grammar and its one-line errors; a fault fires
once at the armed count and never again (a restarted actor, a second actor, a re-run
driver find the marker); a real process ends with ``FAULT_EXIT_CODE`` or SIGKILL.

Integration (Ray, marked): the reference is a fault-free run of the same driver with one
in-process Collector (tests/test_verify.py ``local_collect``), so "identical" holds whatever
executes the work units.
- a collect actor dies (``os._exit``) after 3 batches, i.e. in the middle of its second
  work unit, before writing it: Ray restarts it (max_restarts) and retries the unit
  (max_task_retries); counts and histograms are identical, moments within 1e-12;
- a collect driver (``python -m jobs.collect``) SIGKILLs itself after 2 work units; while
  it runs a second run of the same store is refused by the lock; the same command again
  takes over the stale lock, redoes only the missing units, and the store is identical
  and verifies;
- a steering actor dies after 1 batch: results and summary tables are identical to a
  fault-free run;
- the steering driver stops after 1 task (in-process executor, a kill that raises, no
  Ray): the re-run redoes exactly the other tasks, tables identical;
- the steering driver dies at each of its write boundaries, locally and with its output in
  a bucket of the local S3 server (tests/s3_server.py): the re-run completes, tables
  identical, no temporary object left.
Edge cases listed: the killed unit is mid-way (no part written) and is recorded exactly
once; the driver dies between two units with its lock held; markers make every fault
one-shot even though restarted processes count from 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr
from s3_server import S3Server, s3_server

from crossmodal.fleet.faults import (
    DIR_ENV,
    ENV,
    FAULT_EXIT_CODE,
    Fault,
    FaultPoint,
    env_vars,
    parse,
)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ unit


def test_parse_the_switch():
    assert parse("") == ()
    assert parse("collector:after_batches=2") == (Fault("collector", "after_batches", 2),)
    assert parse(" driver:after_units=3,mode=sigkill ; steer_worker:after_batches=1;") == (
        Fault("driver", "after_units", 3, "sigkill"),
        Fault("steer_worker", "after_batches", 1),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "worker:after_batches=2",
            "CROSSMODAL_FAULT role must be one of ['collector', 'driver', "
            "'steer_worker'], got 'worker' in 'worker:after_batches=2'; write e.g. "
            "CROSSMODAL_FAULT='collector:after_batches=2'",
        ),
        (
            "collector:after_units=2",
            "CROSSMODAL_FAULT options of collector must be one of "
            "['after_batches', 'mode'], got ['after_units']",
        ),
        (
            "driver:after_units=0",
            "CROSSMODAL_FAULT after_units must be one of [an integer >= 1], got '0'",
        ),
        ("driver:after_units=two", "got 'two'"),
        (
            "collector:after_batches=1,mode=segv",
            "CROSSMODAL_FAULT mode must be one of ['exit', 'sigkill'], got 'segv'",
        ),
        ("collector", "CROSSMODAL_FAULT role must be one of"),
        (
            "driver:after_units=1;driver:after_units=2",
            "roles must be one of [each role at most once], got ['driver', 'driver']",
        ),
    ],
)
def test_bad_switch_is_one_line(text, message):
    with pytest.raises(ValueError) as err:
        parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fires_once_at_the_armed_count(tmp_path):
    out = tmp_path / "store.zarr"
    environ = {ENV: "collector:after_batches=3"}
    fired: list[str] = []
    first = FaultPoint("collector", out, environ=environ, kill=fired.append)
    assert first.marker_dir == tmp_path / "store.zarr.faults"  # beside the output
    assert [first.tick() for _ in range(5)] == [False, False, True, False, False]
    assert fired == ["exit"] and first.marker.is_file()
    restarted = FaultPoint("collector", out, environ=environ, kill=fired.append)
    assert not any(restarted.tick() for _ in range(5)) and fired == ["exit"]  # one-shot
    other_role = FaultPoint("driver", out, environ=environ, kill=fired.append)
    assert other_role.fault is None and not other_role.tick(10)
    assert not FaultPoint("collector", out, environ={}, kill=fired.append).tick(10)


def test_marker_dir_from_the_environment_and_env_vars(tmp_path):
    environ = {ENV: "steer_worker:after_batches=1", DIR_ENV: str(tmp_path / "m"), "X": "1"}
    fired: list[str] = []
    point = FaultPoint("steer_worker", tmp_path / "out", environ=environ, kill=fired.append)
    assert point.tick() and point.marker.parent == tmp_path / "m" and fired == ["exit"]
    assert env_vars(environ) == {ENV: environ[ENV], DIR_ENV: environ[DIR_ENV]}
    with pytest.raises(ValueError, match="role must be one of"):
        FaultPoint("reducer", tmp_path / "out", environ=environ)


@pytest.mark.parametrize(("mode", "code"), [("exit", FAULT_EXIT_CODE), ("sigkill", -9)])
def test_a_real_process_dies_once(tmp_path, mode, code):
    script = (
        "import sys; from crossmodal.fleet.faults import FaultPoint; "
        "p = FaultPoint('driver', sys.argv[1]); [p.tick() for _ in range(5)]; print('survived')"
    )
    env = {**os.environ, ENV: f"driver:after_units=2,mode={mode}"}
    run = [sys.executable, "-c", script, str(tmp_path / "out")]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == code and first.stdout == ""
    if mode == "exit":
        assert "crossmodal fault injection: exit driver pid" in first.stderr
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == "survived\n"


# ------------------------------------------------------------------------------ Ray


def _assert_same_store(a: Path, b: Path) -> None:
    """Identical counts and histograms (stats and parts), moments within 1e-12 relative."""
    for family in ("decoder", "ffn_act"):
        for group in ("stats", "parts"):
            x = xr.open_zarr(a, group=f"{group}/{family}", consolidated=False).load()
            y = xr.open_zarr(b, group=f"{group}/{family}", consolidated=False).load()
            exact = ["count", "dropped", "hist"]
            if group == "stats":
                exact += ["n_examples", "n_skipped", "n_rows", "n_ended"]
            for name in exact:
                np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)
            for name in ("mean", "m2", "min", "max"):
                np.testing.assert_allclose(
                    x[name].values, y[name].values, rtol=1e-12, atol=0, equal_nan=True, err_msg=name
                )
    ma = zarr.open_group(str(a), mode="r")["manifest"].attrs.asdict()
    mb = zarr.open_group(str(b), mode="r")["manifest"].attrs.asdict()
    assert sorted(ma["parts"]) == sorted(mb["parts"]) and sorted(ma["merged"]) == sorted(
        mb["merged"]
    )
    for key in ma["parts"]:
        for field in ("key", "n_examples", "n_skipped", "n_rows", "n_ended", "dropped"):
            assert ma["parts"][key][field] == mb["parts"][key][field], (key, field)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from helpers import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def fault_raw(model_dir, tmp_path_factory) -> dict:
    """2 actors sharing 0.5 CPU; 4 conditions x 2 work units of 1 + 2 batches each."""
    from helpers import collect_config

    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    actors = {"count": 2, "num_cpus": 0.25, "max_restarts": 1, "max_task_retries": 1}
    return collect_config(model_dir, out, actors=actors)


@pytest.fixture(scope="module")
def reference(fault_raw) -> Path:
    """The fault-free store: the same driver, one in-process Collector, no Ray."""
    from helpers import local_collect

    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, fault_raw)
    return Path(fault_raw["output"])


@pytest.mark.integration
def test_collector_killed_mid_unit_is_retried_once(
    fault_raw, reference, tmp_path, monkeypatch, capfd
):
    """The killed actor's unit runs again on the restarted actor, the store equals a clean
    one, and the driver says so in one line naming the unit (Ray keeps no cause for it)."""
    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect
    from crossmodal.store.verify import verify_store

    out = tmp_path / "faulty.zarr"
    monkeypatch.setenv(ENV, "collector:after_batches=3")  # mid-way through a second unit
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "markers"))
    config = load_config({**fault_raw, "output": str(out)})
    result = run_collect(config, progress=False, echo=lambda _: None)
    markers = list((tmp_path / "markers").iterdir())
    assert len(markers) == 1 and markers[0].name.startswith("collector-")  # it did fire
    assert result["ran"] == result["work_units"] == 8
    _assert_same_store(reference, out)
    assert verify_store(out).ok
    restarts = [
        line
        for line in capfd.readouterr().err.splitlines()
        if "ran again on a restarted Collector actor" in line
    ]
    assert restarts, "no restart line"  # one per restart (a loaded machine may OOM-kill more)
    named = r"warning: (work unit \d+ \(\w+/\w+/\w+/\d+\)|pilot \S+( \+ pilot \S+)*) ran again"
    assert all(re.match(named, r) for r in restarts), restarts
    assert any(r.startswith("warning: work unit ") for r in restarts), restarts  # the fault's


def _collect_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.collect", str(config), "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.integration
def test_driver_killed_then_the_same_command_completes(fault_raw, reference, tmp_path):
    """SIGKILL after 2 work units, a concurrent run refused meanwhile, then a clean resume."""
    from conftest import group_alive, kill_group

    from crossmodal.collect import driver as collect
    from crossmodal.collect.config import load_config
    from crossmodal.store.lock import LOCK_NAME, LockError, read_lock
    from crossmodal.store.verify import verify_store

    out = tmp_path / "driver.zarr"
    cfg = tmp_path / "collect.yaml"
    cfg.write_text(yaml.safe_dump({**fault_raw, "output": str(out)}))
    env = _env(**{ENV: "driver:after_units=2,mode=sigkill"})
    proc = subprocess.Popen(
        _collect_cmd(cfg),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while read_lock(out) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        holder = read_lock(out)
        assert holder is not None and holder.pid == proc.pid, proc.poll()
        second = load_config({**fault_raw, "output": str(out)})
        with pytest.MonkeyPatch.context() as mp:  # reaching the work would mean no lock
            mp.setattr(collect, "_collect", lambda *a, **k: pytest.fail("lock not held"))
            with pytest.raises(LockError, match=rf"is locked by collect run pid {proc.pid} "):
                collect.run_collect(second, progress=False, echo=lambda _: None)
        _, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc.pid)  # the in-process Ray it started, if anything is left
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert group_alive(proc.pid) == []
    done = zarr.open_group(str(out), mode="r")["manifest"].attrs["parts"]
    assert len(done) == 2  # killed right after the second unit was recorded
    partial = verify_store(out)
    assert partial.ok and partial.notes[0].startswith("incomplete:")
    assert read_lock(out).pid == proc.pid  # the dead driver's lock is still there

    again = subprocess.run(
        _collect_cmd(cfg),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the stale lock of {str(out)!r}: collect run pid {proc.pid}" in (
        again.stdout
    )
    assert "collected 6 work units (2 already done)" in again.stdout
    assert not (out / LOCK_NAME).exists()
    _assert_same_store(reference, out)
    assert verify_store(out).ok


# ------------------------------------------------------------------------------ steering


@pytest.fixture(scope="module")
def steer_root(model_dir, tmp_path_factory) -> Path:
    """``root/model`` (the tiny model) and ``root/sel.zarr`` (synthetic selectivity)."""
    from helpers import steer_selectivity as _selectivity

    from crossmodal.model.load import load_model

    root = tmp_path_factory.mktemp("steer")
    (root / "model").symlink_to(model_dir)
    _selectivity(load_model(str(model_dir)).model, root / "sel.zarr")
    return root


def _frames(out: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and summary tables of the run at ``out`` (a Path or a UPath)."""
    with (out / "results.parquet").open("rb") as f, (out / "summary.parquet").open("rb") as g:
        res, summ = pd.read_parquet(f), pd.read_parquet(g)
    res = res.sort_values(["cell_id", "input_id"]).reset_index(drop=True)
    summ = summ.sort_values("cell_id").reset_index(drop=True)
    return res, summ


@pytest.fixture(scope="module")
def steer_reference(steer_root):
    """Fault-free tables: one SteerWorker called directly on every task, then consolidated."""
    from helpers import steer_config as _config

    from crossmodal.steer.driver import consolidate
    from crossmodal.steer.grid import expand, tasks
    from crossmodal.steer.source import selectivity_digest
    from crossmodal.steer.worker import SteerWorker

    ref = _config(steer_root, "ref")
    worker = SteerWorker(ref, device="cpu")
    cells = expand(ref, selectivity_digest(ref.selectivity))
    for task in tasks(cells, ref.cells_per_task):
        worker(task)
    consolidate(ref, cells)
    return worker, cells, _frames(Path(ref.output))


def _same_tables(out: Any, reference: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    got = _frames(out)
    pd.testing.assert_frame_equal(got[0], reference[0])
    pd.testing.assert_frame_equal(got[1], reference[1])


@pytest.mark.integration
def test_steer_worker_killed_gives_identical_tables(
    steer_root, steer_reference, tmp_path, monkeypatch
):
    from helpers import steer_config as _config

    from crossmodal.steer.driver import run_steer

    _, cells, reference = steer_reference
    actors = {
        "count": 2,
        "num_cpus": 0.25,
        "num_gpus": 0,
        "max_restarts": 1,
        "max_task_retries": 1,
    }
    faulty = _config(steer_root, "faulty", actors=actors)
    monkeypatch.setenv(ENV, "steer_worker:after_batches=1")
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "markers"))
    result = run_steer(faulty, progress=False, echo=lambda _: None)
    assert result["ran"] == len(cells)
    assert [m.name.split("-")[0] for m in (tmp_path / "markers").iterdir()] == ["steer_worker"]
    _same_tables(Path(faulty.output), reference)


class _Died(BaseException):
    """What the patched kill raises: the driver stops right there (its ``finally`` runs)."""


def _in_process_steer(monkeypatch) -> None:
    """Steering actors as one in-process worker (no Ray); a fault kill that raises."""
    from helpers import LocalFleet

    from crossmodal.fleet import RaySession, faults

    def local_fleet(session, cls, *args, spec, count=None, **_):  # one worker in this process
        return LocalFleet(cls(*args, device="cpu"))

    def died(mode: str) -> None:
        raise _Died(mode)

    monkeypatch.setattr(RaySession, "actors", local_fleet)
    monkeypatch.setattr(faults, "_kill", died)


def test_steer_driver_stopped_after_one_task_resumes(
    steer_root, steer_reference, tmp_path, monkeypatch
):
    """The steering driver's fault point, with an in-process executor instead of Ray actors
    and a kill that raises (so pytest survives): one task lands, the re-run does the rest."""
    from helpers import steer_config as _config

    from crossmodal.steer import driver as steer
    from crossmodal.steer.grid import tasks

    worker, cells, reference = steer_reference
    _in_process_steer(monkeypatch)
    monkeypatch.setenv(ENV, "driver:after_units=1")
    config = _config(steer_root, "driver")
    with pytest.raises(_Died):
        steer.run_steer(config, progress=False, echo=lambda _: None)
    first = tasks(cells, config.cells_per_task)[0]
    assert steer.done_cells(config.output) == {c.id for c in first}  # exactly one task landed
    again = steer.run_steer(config, progress=False, echo=lambda _: None)  # marker: no refire
    assert (again["ran"], again["resumed"]) == (len(cells) - len(first), len(first))
    _same_tables(Path(config.output), reference)


def test_write_boundary_fault_fires_at_the_armed_arrival(tmp_path):
    """``at=<boundary>[,n=k]`` kills at the k-th arrival at one named write boundary."""
    assert parse("driver:at=collect.merge.written,n=2") == (
        Fault("driver", "at", 2, "exit", "collect.merge.written"),
    )
    with pytest.raises(ValueError, match="at must be one of \\[a dotted boundary name"):
        parse("driver:at=Merge Written")
    with pytest.raises(ValueError, match="n must be one of \\[an integer >= 1\\], got '0'"):
        parse("driver:at=collect.merge.written,n=0")
    fired: list[str] = []
    environ = {ENV: "driver:at=collect.merge.written,n=2,mode=sigkill"}
    point = FaultPoint("driver", tmp_path / "store.zarr", environ=environ, kill=fired.append)
    assert not point.tick(5)  # counters do not arm a boundary fault
    assert not point.reached("collect.part.marked")
    assert [point.reached("collect.merge.written") for _ in range(3)] == [False, True, False]
    assert fired == ["sigkill"]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
def test_steer_driver_killed_at_every_write_boundary_resumes(
    steer_root, steer_reference, monkeypatch, request, where
):
    """For each of the steer driver's write boundaries (grid.json, a task's part landed,
    results.parquet, summary.parquet): it dies there once; the same call again completes
    with tables identical to a fault-free run, and no temporary file is left; the same
    with the output in a bucket of the local S3 server."""
    from helpers import steer_config as _config

    from crossmodal.steer import driver as steer
    from crossmodal.store.location import register, upath

    _in_process_steer(monkeypatch)
    server = request.getfixturevalue("s3") if where == "s3" else None
    bucket = server.bucket() if server else None
    for boundary in steer.BOUNDARIES:
        name = f"at_{boundary.replace('.', '_')}"
        extra = (
            {"output": f"s3://{bucket}/{name}", "storage_options": server.options} if server else {}
        )
        config = _config(steer_root, name, **extra)
        register(config.output, server.options if server else None)
        monkeypatch.setenv(ENV, f"driver:at={boundary}")
        with pytest.raises(_Died):
            steer.run_steer(config, progress=False, echo=lambda _: None)
        steer.run_steer(config, progress=False, echo=lambda _: None)
        _same_tables(upath(config.output), steer_reference[2])
        assert not [p for p in upath(config.output).rglob("*") if p.name.endswith(".tmp")]
