"""The collect driver killed at every write boundary resumes to the clean run's store.

Finding 1 of the reliability attack (docs/reliability.md, "Crash-safe collect"): the driver
deleted a condition's parts before recording it merged, so a driver killed during the merge
left a resume that re-merged from deleted parts (NaN moments, wrong histograms) and exited 0.
The merge now writes every family, records the condition, and only then deletes its parts;
the resume verifies what it skips (crossmodal/store/integrity.py).

- ``test_killed_during_the_merge``: the exact finding, in process: the merge stops after its
  first family (a raise in place of the kill); the resume gives the clean store.
- ``test_killed_at_every_write_boundary`` (integration): for every name in
  :data:`crossmodal.collect.driver.BOUNDARIES` the driver (one in-process collector, no Ray)
  is stopped there by ``CROSSMODAL_FAULT="driver:at=<boundary>"`` (the kill raises); the same
  call again completes and every array equals the clean run's.
- ``test_a_driver_process_killed_while_merging`` (integration): the same with a real process
  SIGKILLed at the second ``collect.merge.written``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_arrays, build_model_dir, collect_config, local_collect

from crossmodal.collect.driver import BOUNDARIES
from crossmodal.fleet import faults
from crossmodal.fleet.faults import DIR_ENV, ENV
from crossmodal.store.collect_store import CollectStore
from crossmodal.store.verify import verify_store

REPO = Path(__file__).resolve().parent.parent
_DRIVER = (
    "import json, sys; sys.path.insert(0, 'tests'); from helpers import LocalSession; "
    "from crossmodal.collect import driver; from crossmodal.collect.config import load_config; "
    "driver.RaySession = LocalSession; "
    "driver.run_collect(load_config(json.load(open(sys.argv[1]))), progress=False, "
    "echo=lambda _: None)"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def raw(model_dir, tmp_path_factory) -> dict:
    """The small organism config, parts deleted after merging (so every boundary is reached)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return collect_config(model_dir, out, keep_parts=False, families=["decoder"])


@pytest.fixture(scope="module")
def reference(raw) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
    return Path(raw["output"])


class _Died(BaseException):
    """Stands for the driver's death in the middle of a merge."""


def test_killed_during_the_merge(raw, reference, tmp_path, monkeypatch):
    out = tmp_path / "merge.zarr"
    config = {**raw, "output": str(out), "families": ["decoder", "ffn_act"]}
    clean = tmp_path / "clean.zarr"
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, {**config, "output": str(clean)})
    merge_family = CollectStore._merge_family
    calls = []

    def dies_on_the_second_family(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:  # the first family is merged (old code: its parts deleted)
            raise _Died()
        return merge_family(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CollectStore, "_merge_family", dies_on_the_second_family)
        with pytest.raises(_Died):
            local_collect(mp, config)
    assert calls == ["decoder", "ffn_act"]
    result = local_collect(monkeypatch, config)
    assert result["ran"] == result["work_units"] - result["resumed"]
    report = verify_store(out)
    assert report.ok, report.problems
    assert_same_arrays(clean, out)


@pytest.mark.integration
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_killed_at_every_write_boundary(raw, reference, tmp_path, monkeypatch, boundary):
    """In process, the kill raising instead of ending the process (the writes before it are
    on disk either way); a real process below."""

    def died(mode: str) -> None:
        raise _Died(mode)

    monkeypatch.setattr(faults, "_kill", died)
    monkeypatch.setenv(ENV, f"driver:at={boundary}")
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "markers"))
    config = {**raw, "output": str(tmp_path / "out.zarr")}
    with pytest.raises(_Died):
        local_collect(monkeypatch, config)
    local_collect(monkeypatch, config)  # the marker: it does not fire again
    report = verify_store(config["output"])
    assert report.ok, report.problems
    assert_same_arrays(reference, Path(config["output"]))


@pytest.mark.integration
def test_a_driver_process_killed_while_merging(raw, reference, tmp_path):
    """A real driver SIGKILLed between writing a merge and recording it; the same command."""
    boundary = "collect.merge.written"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        DIR_ENV: str(tmp_path / "markers"),
        ENV: f"driver:at={boundary},n=2,mode=sigkill",
    }
    out = tmp_path / "out.zarr"
    cfg = tmp_path / "collect.json"
    cfg.write_text(json.dumps({**raw, "output": str(out)}))
    run = [sys.executable, "-c", _DRIVER, str(cfg)]
    kw = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 300}
    killed = subprocess.run(run, env=env, **kw)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert f"after 2 arrivals at {boundary}" in killed.stderr
    again = subprocess.run(run, env=env, **kw)  # the marker: it does not fire again
    assert again.returncode == 0, again.stderr[-2000:]
    report = verify_store(out)
    assert report.ok, report.problems
    assert_same_arrays(reference, out)
