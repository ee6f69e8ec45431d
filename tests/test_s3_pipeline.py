"""The organism pipeline with every output on ``s3://`` (a real S3 server on 127.0.0.1,
tests/s3_server.py) and on ``gs://`` (a GCS server, tests/gcs_server.py), against the same
pipeline on local disk:

- collect (Ray actors writing their shards to the bucket) -> reduce -> steer -> report gives
  the same arrays, sets table, steering tables and report as the local run;
  ``xarray.open_zarr`` on the URL is labelled, ``pandas.read_parquet`` reads the steering
  tables from their URL;
- a second collect on a store whose lock a live run holds is refused in one line;
- a collect driver killed mid-run (after its second work unit was recorded) leaves a lock
  that goes stale after its lease; the re-run takes it over and ends with the clean run's
  store.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr
from gcs_server import gcs_server
from helpers import collect_config
from s3_server import s3_server

from crossmodal.fleet.faults import DIR_ENV, ENV, FAULT_EXIT_CODE
from crossmodal.organism import organism_path
from crossmodal.pipeline import load_pipeline, run_pipeline
from crossmodal.store import results
from crossmodal.store.location import fs_kwargs, read_parquet, register, upath, zarr_store
from crossmodal.store.lock import LEASE_ENV, LockError, ObjectLock

pytestmark = pytest.mark.integration
logging.getLogger("werkzeug").setLevel(logging.ERROR)
REPO = Path(__file__).resolve().parent.parent
SMALL = {  # a few work units: seconds per stage, on S3 too
    "tasks": ["x2en"],
    "modalities": ["speech", "text"],
    "families": ["decoder"],
    "steps": [1, 3],
    "shard_size": 3,
    "keep_parts": False,
}


def _pipeline(tmp: Path, output: str, report: str, options: dict | None) -> Path:
    raw = collect_config(organism_path(), output, **SMALL)  # type: ignore[arg-type]
    if options:
        raw["storage_options"] = options
    (tmp / "collect.yaml").write_text(yaml.safe_dump(raw))
    (tmp / "steer.yaml").write_text(yaml.safe_dump(_steer(output)))
    pipe = {"collect": "collect.yaml", "reduce": {"k": 8, "scopes": ["all"]}}
    pipe["steer"] = "steer.yaml"
    pipe["report"] = {"out": report}
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    return tmp / "pipeline.yaml"


def _steer(store: str) -> dict:
    """The smallest steering grid (one cell and its random control, two inputs), its output
    beside the store (on s3:// when the store is)."""
    raw = {
        "model": str(organism_path()),
        "selectivity": {"path": store, "group": "selectivity/decoder"},
        "roles": ["representation"],  # x2en: the task SMALL collects
        "unit_modalities": ["text"],
        "input_modalities": ["text"],
        "steps": [1],
        "languages": ["deu"],
        "set_sizes": [2],
        "random_seeds": [0],
        "n_inputs": 2,
        "max_new_tokens": 8,
        "lid": {"backends": ["organism"]},
        "output": store.rsplit("/", 1)[0] + "/steer",
        "actors": {"count": 1, "num_cpus": 0.5, "num_gpus": 0},
    }
    return raw  # no storage_options: the pipeline gives it the collect config's


@pytest.fixture(scope="module", params=["s3", "gs"])
def s3(request):
    """Each object-storage service in turn (the name stays: S3 first, then GCS)."""
    with s3_server() if request.param == "s3" else gcs_server() as server:
        yield server


QUIET = {"progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The pipeline on local disk (in-process Ray), once for both services."""
    local_dir = tmp_path_factory.mktemp("local")
    local = load_pipeline(
        _pipeline(local_dir, str(local_dir / "c.zarr"), str(local_dir / "rep"), None)
    )
    return run_pipeline(local, **QUIET)


@pytest.fixture(scope="module")
def runs(local_run, s3, tmp_path_factory):
    """The same pipeline on local disk and on the service (each with its own in-process Ray)."""
    s3_dir = tmp_path_factory.mktemp(s3.scheme)
    bucket = s3.bucket()
    url = f"{s3.scheme}://{bucket}/study/c.zarr"
    report = f"{s3.scheme}://{bucket}/study/rep"
    remote = load_pipeline(_pipeline(s3_dir, url, report, s3.options))
    return local_run, run_pipeline(remote, **QUIET), url, s3_dir


COLLECTED = ("stats/", "edges/", "concentration/")
"""What collect writes and keeps (reduce adds its groups beside them)."""


def _arrays(store, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    root = zarr.open_group(zarr_store(store), mode="r")
    members = root.members(max_depth=None)
    return {
        k: np.asarray(v[...])
        for k, v in members
        if hasattr(v, "dtype") and (not prefixes or k.startswith(prefixes))
    }


def assert_same_store(a, b, prefixes: tuple[str, ...] = ()) -> None:
    """Every array (under ``prefixes``, when given) holds the same values in both stores."""
    xa, xb = _arrays(a, prefixes), _arrays(b, prefixes)
    assert xa
    assert sorted(xa) == sorted(xb)
    for name, x in xa.items():
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, xb[name], rtol=1e-12, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, xb[name], err_msg=name)


def test_pipeline_on_s3_equals_the_local_run(runs, s3):
    local, remote, url, _ = runs
    assert remote["store"] == url and remote["report"].startswith(f"{s3.scheme}://")
    assert_same_store(local["store"], url)  # collect and reduce groups alike
    sets_local = read_parquet(Path(local["store"]).parent / "c-sets")
    sets_s3 = read_parquet(upath(url).parent / "c-sets")
    assert sets_local.drop(columns=[]).equals(sets_s3)
    files_local = sorted(p.name for p in Path(local["report"]).rglob("*") if p.is_file())
    files_s3 = sorted(p.name for p in upath(remote["report"]).rglob("*") if p.is_file())
    assert files_local == files_s3 and "summary.md" in files_s3
    assert local["headline"] == remote["headline"] or _same_headline(local, remote)
    ds = xr.open_zarr(
        url, group="stats/decoder", consolidated=False, storage_options=fs_kwargs(url)
    )
    assert "unit" in ds.dims and "language" in ds.dims and ds.sizes["unit"] > 0


def test_steering_on_s3_equals_the_local_run(runs, s3):
    """The steer stage wrote its parts, tables and grid to the bucket, linked the run from
    the store's attrs (relative to the store's folder), and its tables equal the local run's
    (pandas reads them straight from the URL)."""
    local, remote, url, _ = runs
    steer = url.rsplit("/", 1)[0] + "/steer"
    assert remote["steer"] == steer and local["steer"].endswith("/steer")
    files = {p.name for p in upath(steer).rglob("*") if p.is_file()}
    assert {"grid.json", "results.parquet", "summary.parquet"} <= files
    assert not any(name.endswith(".tmp") for name in files)
    assert results.open(url).attrs["steering"]["runs"].keys() == {"steer"}
    assert [str(r) for r in results.open(url).steering_runs()] == [steer]
    for table in ("summary", "results"):
        here = pd.read_parquet(Path(local["steer"]) / f"{table}.parquet")
        there = pd.read_parquet(f"{steer}/{table}.parquet", storage_options=fs_kwargs(steer))
        pd.testing.assert_frame_equal(here, there)
    assert "control_steering" in remote["headline"]
    report = {p.name for p in upath(remote["report"]).rglob("*") if p.is_file()}
    assert "steering.md" in report


def test_no_local_folder_is_named_after_a_store_object():
    """No code used str() of a Zarr store object as a local path (it once made folders
    named "<FsspecStore(...)>" in the working directory)."""
    for where in (Path.cwd(), REPO):
        assert not [p.name for p in where.iterdir() if p.name.startswith("<")]


def _same_headline(a, b) -> bool:
    keep = [k for k in a["headline"] if k != "capture_examples_per_s"]
    return {k: a["headline"][k] for k in keep} == {k: b["headline"][k] for k in keep}


def test_second_collect_on_a_locked_store_is_refused(runs, s3):
    _, _, url, _ = runs
    register(url, s3.options)
    with ObjectLock(url, "collect"):  # a live run: its heartbeat keeps the lease
        from crossmodal.collect.config import load_config
        from crossmodal.collect.driver import run_collect

        raw = collect_config(organism_path(), url, **SMALL)  # type: ignore[arg-type]
        config = load_config({**raw, "storage_options": s3.options})
        with pytest.raises(LockError) as err:
            run_collect(config, progress=False, echo=lambda _: None)
    assert str(err.value).startswith(f"output {url!r} is locked by collect run pid")


def test_two_concurrent_collects_second_refused(runs, s3, tmp_path):
    """Two real collects at once on one new store: exactly one writes, the other is refused."""
    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect

    url = f"{s3.scheme}://{s3.bucket()}/c.zarr"
    raw = collect_config(organism_path(), url, **SMALL)  # type: ignore[arg-type]
    config = load_config({**raw, "storage_options": s3.options})
    results: list[object] = []

    def one() -> None:
        try:
            results.append(run_collect(config, progress=False, echo=lambda _: None))
        except LockError as err:
            results.append(err)

    first = threading.Thread(target=one)
    first.start()
    while not upath(url).joinpath("crossmodal.lock").exists() and first.is_alive():
        time.sleep(0.2)
    one()
    first.join()
    refused = [r for r in results if isinstance(r, LockError)]
    assert len(refused) == 1 and "is locked by collect run" in str(refused[0])
    assert_same_store(runs[0]["store"], url, COLLECTED)


def test_killed_collect_resumes_to_identical_results(runs, s3, tmp_path):
    local = runs[0]
    url = f"{s3.scheme}://{s3.bucket()}/c.zarr"
    register(url, s3.options)  # for this process's checks of the bucket
    raw = collect_config(organism_path(), url, **SMALL)  # type: ignore[arg-type]
    cfg = tmp_path / "collect.json"
    cfg.write_text(json.dumps({**raw, "storage_options": s3.options}))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        DIR_ENV: str(tmp_path / "markers"),
        ENV: "driver:at=collect.part.marked,n=2",
        LEASE_ENV: "2",
    }
    run = [sys.executable, "-m", "jobs.collect", str(cfg)]
    kw = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 300, "env": env}
    killed = subprocess.run(run, **kw)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    assert upath(url).joinpath("crossmodal.lock").exists()  # left behind by the killed run
    time.sleep(3.5)  # past the lease (2 s) and its one-second margin
    again = subprocess.run(run, **kw)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "taking over the stale lock" in again.stdout + again.stderr
    assert not upath(url).joinpath("crossmodal.lock").exists()
    assert_same_store(local["store"], url, COLLECTED)
