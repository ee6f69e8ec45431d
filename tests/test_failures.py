"""One line for every failure a user can cause or meet, and Ray cleaned up after its driver.

Unit tests (no Ray): the CLI (and the ``jobs/*.py`` shims, which are the same click
commands) turns each expected failure class into ONE ``error: ...`` line on stderr with exit
status 2: config/store/data/lock/steering errors (the ``ValueError`` family), a full disk
(the path, how much the run needs when a stage says so, the free space, what is kept), a
read-only output or a missing permission (the path and the fix), a job whose actor died for
good (``FleetError``); an unexpected error is one line and exit status 1, and its traceback
shows with ``--debug`` (before or after the command) or ``CROSSMODAL_DEBUG=1``.
``--no-progress`` forwards the Hugging Face progress switch to the actors' environment.

Integration (a tiny in-process Ray, marked): an actor that always dies (``os._exit``) with
``max_restarts=1, max_task_retries=1`` ends ``ActorFleet.map`` with one ``FleetError`` line
naming the work unit, 2 attempts and Ray's last cause, which the CLI prints as one line with
exit 2; an actor that dies once is restarted, its unit retried, and the fleet reports that
in one line; a job raising ``OSError(ENOSPC)`` inside an actor arrives as Ray's
``RayTaskError(OSError)`` and still becomes the disk-full line naming the path and the job;
actors that cannot start give one line with the constructor's error; actors see the
progress switch. Finally a driver with an in-process Ray is SIGKILLed and no process of its
Ray survives 15 s (today's agents outlived it by about 60 s).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from crossmodal.cli import collect as collect_command
from crossmodal.cli import main
from crossmodal.collect.plan import Condition, PilotUnit, WorkUnit
from crossmodal.errors import DEBUG_ENV, FleetError, disk_need, explain
from crossmodal.fleet.pool import describe_job
from crossmodal.fleet.session import QUIET, actor_env
from crossmodal.schemas import ConfigError
from crossmodal.steer.grid import Cell
from crossmodal.store.layout import StoreError
from crossmodal.store.lock import LockError

REPO = Path(__file__).resolve().parent.parent
UNIT = WorkUnit(3, Condition("x2en", "speech", "deu", "deu", "eng"), 0, 4, ("a", "b", "c", "d"))


def _raising(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """The collect stage fails with ``err`` (the CLI imports it when the command runs)."""

    def fail(*_args: object, **_kw: object) -> None:
        raise err

    monkeypatch.setattr("crossmodal.collect.driver.collect_file", fail)


def _invoke(args: list[str], env: dict[str, str] | None = None, command=main):
    """``command`` with the organism config right after ``collect`` (first for the shim)."""
    at = args.index("collect") + 1 if "collect" in args else 0
    config = str(REPO / "configs" / "organism.yaml")
    return CliRunner().invoke(command, [*args[:at], config, *args[at:]], env=env)


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ unit


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (StoreError("store layout_version must be one of [1], got 0"), ["layout_version"]),
        (LockError("output 'x' is locked by collect run pid 7"), ["locked", "pid 7"]),
        (ValueError("steering language must be one of ['deu'], got 'fra'"), ["'fra'"]),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/o.zarr/stats/c/0"),
            ["disk full", "'/data/o.zarr/stats/c/0'", "GB free now", "finished work units"],
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/o.zarr"),
            ["read-only file system", "'/ro/o.zarr'", "--output", "re-run the same command"],
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/srv/o.zarr/zarr.json"),
            ["permission denied", "'/srv/o.zarr/zarr.json'", "chmod", "another output"],
        ),
        (
            FleetError("work unit 3 (x2en/speech/deu/0) failed 2 time(s): ...", job="w"),
            ["work unit 3", "2 time(s)"],
        ),
    ],
)
def test_expected_failures_are_one_line_with_exit_2(monkeypatch, err, words) -> None:
    _raising(monkeypatch, err)
    result = _invoke(["collect"])
    line = _one_error_line(result)
    assert result.exit_code == 2, result.output
    assert all(w in line for w in words), line
    assert "Traceback" not in result.output


def test_disk_full_says_how_much_the_run_needs(monkeypatch) -> None:
    err = OSError(errno.ENOSPC, "No space left on device", "/data/o.zarr/part")
    with pytest.raises(OSError), disk_need(3_200_000_000, "the plan's compressed estimate"):
        raise err
    _raising(monkeypatch, err)
    line = _one_error_line(_invoke(["collect"]))
    assert "needs about 3.20 GB (the plan's compressed estimate)" in line


def test_config_errors_keep_one_line_per_violation(monkeypatch) -> None:
    _raising(monkeypatch, ConfigError("c.yaml", ["batch_size: must be >= 1, got 0; fix it"]))
    result = _invoke(["collect"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: c.yaml: 1 config error(s):",
        "  batch_size: must be >= 1, got 0; fix it",
    ]


def test_unexpected_errors_are_one_line_and_exit_1(monkeypatch) -> None:
    _raising(monkeypatch, KeyError("submodule"))
    result = _invoke(["collect"])
    line = _one_error_line(result)
    assert result.exit_code == 1
    assert "unexpected KeyError: 'submodule'" in line and "--debug" in line


@pytest.mark.parametrize(
    ("args", "env", "command"),
    [
        (["--debug", "collect"], None, main),  # crossmodal --debug collect CONFIG
        (["collect", "--debug"], None, main),  # crossmodal collect CONFIG --debug
        (["collect"], {DEBUG_ENV: "1"}, main),
        (["--debug"], None, collect_command),  # python -m jobs.collect CONFIG --debug
    ],
)
def test_debug_shows_the_traceback_above_the_line(monkeypatch, args, env, command) -> None:
    _raising(monkeypatch, KeyError("submodule"))
    result = _invoke(args, env=env, command=command)
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: unexpected KeyError")


def test_jobs_shims_are_the_mapped_commands() -> None:
    from jobs import collect, pipeline, reduce, steer

    for shim in (collect, pipeline, reduce, steer):
        assert type(shim.main).__name__ == "Command"
        assert "--debug" in {o for p in shim.main.params for o in p.opts}


def test_a_real_shim_process_prints_one_line_and_exits_2(tmp_path) -> None:
    """``python -m jobs.reduce`` on a directory that is no store: one line, exit 2."""
    run = subprocess.run(
        [sys.executable, "-m", "jobs.reduce", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: store must be one of"), run.stderr


def test_no_progress_reaches_the_actor_environment(monkeypatch) -> None:
    seen = {}

    def record(*_args: object, **kw: object) -> None:
        seen.update(progress=kw["progress"], env=actor_env())

    for key in QUIET:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("crossmodal.collect.driver.collect_file", record)
    try:
        assert _invoke(["collect", "--no-progress"]).exit_code == 0
    finally:
        for key in QUIET:
            os.environ.pop(key, None)
    assert seen["progress"] is False
    assert seen["env"]["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in actor_env({})
    assert actor_env({}, progress=False)["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_quiet_environment_silences_every_bar_in_a_fresh_process() -> None:
    """What an actor gets under ``--no-progress`` (:func:`actor_env`): plain tqdm bars, the
    Hugging Face hub's and transformers' (``Loading weights``) all draw nothing."""
    code = (
        "from tqdm import tqdm\n"
        "from huggingface_hub.utils import tqdm as hub_tqdm\n"
        "from transformers.utils import logging\n"
        "for bar in (tqdm, hub_tqdm, logging.tqdm):\n"
        "    list(bar(range(3), desc='bar'))\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in QUIET}
    for progress in (True, False):
        env = {**base, **actor_env(base, progress=progress)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert (run.stderr.count("bar: 100%") == 3) is progress, run.stderr


def test_jobs_are_described_by_name() -> None:
    pilot = PilotUnit("x2en", "speech", ((UNIT.condition, ("a",)),))
    cell = Cell("selected", "text", role="control", step=1, language="deu")
    assert describe_job(UNIT) == "work unit 3 (x2en/speech/deu/0)"
    assert describe_job((pilot, PilotUnit("x2en", "text", ()))) == (
        "pilot x2en/speech + pilot x2en/text"
    )
    assert describe_job([cell] * 5) == " + ".join(
        [f"cell {cell.id} (selected, text input)"] * 3
    ) + (" and 2 more")
    assert describe_job({"a": 1}) == "{'a': 1}"


def test_explain_reads_through_ray_task_errors() -> None:
    from ray.exceptions import RayTaskError

    cause = OSError(errno.EROFS, "Read-only file system", "/ro/x")
    wrapped = RayTaskError("f", "Traceback ...\nOSError: ...", cause).as_instanceof_cause()
    failure = explain(wrapped)
    assert failure.code == 2 and failure.line.startswith("read-only file system: cannot write")


# ------------------------------------------------------------------------------ Ray


class AlwaysDies:
    """Every call kills its process, like a segfault or the OOM killer."""

    def __call__(self, job: object) -> None:
        os._exit(3)


class DiesOnce:
    """The first call in any process of this class kills it (a marker file says so)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def __call__(self, job: object) -> object:
        if not self.marker.exists():
            self.marker.touch()
            os._exit(3)
        return job


class DiskFull:
    def __call__(self, job: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/o.zarr/stats/part/0")


class CannotStart:
    def __init__(self) -> None:
        raise ValueError("model must be one of [a SeamlessM4T v2 directory], got '/nope'")

    def __call__(self, job: object) -> None:
        return None


class Environment:
    def __call__(self, job: object) -> tuple[str | None, bool]:
        from huggingface_hub.utils import are_progress_bars_disabled

        return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), are_progress_bars_disabled()


class Spec:
    count, num_gpus, num_cpus, max_restarts, max_task_retries = 1, 0, 0.1, 1, 1


@pytest.fixture(scope="module")
def session():
    from ray import cloudpickle

    from crossmodal.fleet import RaySession

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable there
    old = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)  # what --no-progress does in the driver
    try:
        with RaySession(None) as ray_session:
            yield ray_session
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.mark.integration
def test_retries_exhausted_is_one_line_naming_the_unit(session, monkeypatch) -> None:
    with session.actors(AlwaysDies, spec=Spec) as fleet, pytest.raises(FleetError) as caught:
        list(fleet.map([UNIT]))
    err = caught.value
    line = str(err)
    assert "\n" not in line
    assert line.startswith("work unit 3 (x2en/speech/deu/0) failed 2 time(s)")
    assert err.attempts == Spec.max_task_retries + 1 == 2
    assert "actors.max_restarts=1, actors.max_task_retries=1" in line
    assert "worker process has died" in err.cause and "Some common causes" not in line
    _raising(monkeypatch, err)
    result = _invoke(["collect"])
    assert result.exit_code == 2
    assert _one_error_line(result) == f"error: {line}"


@pytest.mark.integration
def test_a_restarted_actor_is_one_line_and_the_unit_finishes(session, tmp_path) -> None:
    lines: list[str] = []
    marker = str(tmp_path / "died")
    with session.actors(DiesOnce, marker, spec=Spec, echo=lines.append) as fleet:
        assert list(fleet.map([UNIT])) == [UNIT]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: work unit 3 (x2en/speech/deu/0) ran again on a restarted")
    assert "restart 1 of actors.max_restarts=1" in lines[0]


@pytest.mark.integration
def test_disk_full_in_an_actor_is_one_line_naming_path_and_unit(session, monkeypatch) -> None:
    with session.actors(DiskFull, spec=Spec) as fleet, pytest.raises(OSError) as caught:
        list(fleet.map([UNIT]))
    _raising(monkeypatch, caught.value)
    result = _invoke(["collect"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith(
        "error: disk full: no space left on device writing '/data/o.zarr/stats/part/0' "
        "(while running work unit 3 (x2en/speech/deu/0))"
    )
    assert "finished work units are kept" in line


@pytest.mark.integration
def test_actors_that_cannot_start_give_the_constructors_error(session) -> None:
    with session.actors(CannotStart, spec=Spec) as fleet, pytest.raises(FleetError) as caught:
        list(fleet.map([UNIT]))
    line = str(caught.value)
    assert line.startswith("the CannotStart actors could not start (work unit 3")
    assert "ValueError: model must be one of [a SeamlessM4T v2 directory], got '/nope'" in line
    assert "\n" not in line


@pytest.mark.integration
def test_actors_get_the_progress_switch(session) -> None:
    with session.actors(Environment, spec=Spec) as fleet:
        assert list(fleet.map([0])) == [("1", True)]


DRIVER = """
import os, sys, time
from crossmodal.fleet import RaySession
session = RaySession(None)
ray = session.connect()

@ray.remote(num_cpus=0.1)
class Idle:
    def pid(self):
        return os.getpid()

actor = Idle.remote()
ray.get(actor.pid.remote())
time.sleep(2)  # the reaper records the agents and the actor (every second)
print("READY", flush=True)
time.sleep(600)
"""


def _session_processes(sid: int) -> list[str]:
    rows = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True)
    out = []
    for row in rows.stdout.splitlines():
        pid, s, stat, args = row.split(None, 3)
        if int(s) == sid and not stat.startswith("Z"):
            out.append(f"{pid} {args[:80]}")
    return out


@pytest.mark.integration
def test_a_killed_driver_leaves_no_ray_process_behind() -> None:
    """Every process of the driver's session (its own: ``start_new_session``) is gone 15 s
    after SIGKILL; Ray's agents alone used to stay about 60 s."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        names = " ".join(_session_processes(proc.pid))
        assert "ray::DashboardAgent" in names and "ray::RuntimeEnvAgent" in names, names
        assert "crossmodal.fleet.reaper" in names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while _session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert _session_processes(proc.pid) == []
    finally:
        for row in _session_processes(proc.pid):  # only this test's session
            os.kill(int(row.split()[0]), signal.SIGKILL)


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from helpers import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"), writes=("eng", "deu"))


def test_disk_full_mid_collect_is_one_line_and_the_same_command_resumes(
    model_dir, tmp_path, monkeypatch
) -> None:
    """The real collect driver (one in-process Collector) through the CLI: the disk fills
    while it records the 2nd work unit; one line, exit 2; the same command then finishes
    without redoing the recorded unit, as the line promises."""
    import yaml
    from helpers import LocalSession, collect_config

    from crossmodal.collect import driver
    from crossmodal.store.collect_store import CollectStore

    out = tmp_path / "s.zarr"
    raw = collect_config(
        model_dir, out, languages=["eng", "deu"], tasks=["x2en"], families=["decoder"]
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(driver, "RaySession", LocalSession)
    real, calls = CollectStore.mark_part, []

    def full_disk(self, part, summary):
        calls.append(part)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "manifest"))
        real(self, part, summary)

    monkeypatch.setattr(CollectStore, "mark_part", full_disk)
    args = ["collect", str(config), "--no-progress"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 2, first.output
    line = _one_error_line(first)
    assert line.startswith(f"error: disk full: no space left on device writing '{out}/manifest'")
    assert "finished work units are kept" in line
    monkeypatch.setattr(CollectStore, "mark_part", real)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "(1 already done)" in again.output
