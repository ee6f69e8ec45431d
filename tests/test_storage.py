"""Outputs on object storage, against a real S3 server on 127.0.0.1 (tests/s3_server.py):
the lock (conditional create, lease, heartbeat, stale takeover), whole-object writes, the
bad-input lines (unreachable endpoint, missing bucket, denied credentials, unsupported
scheme) and labelled arrays through ``xarray.open_zarr("s3://...")``. The whole pipeline on
S3 is tests/test_s3_pipeline.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from s3_server import s3_server

from crossmodal.store import location
from crossmodal.store.datasets import write_dataset
from crossmodal.store.location import LocationError, check_reachable, register, upath
from crossmodal.store.lock import LEASE_ENV, LOCK_NAME, LockError, ObjectLock, output_lock

logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def url(service):
    scheme = getattr(service, "scheme", "s3")
    out = f"{scheme}://{service.bucket()}/run/store.zarr"
    register(out, service.options)
    return out


def test_lock_refuses_a_live_holder_and_releases(url):
    messages: list[str] = []
    first = output_lock(url, "collect", echo=messages.append)
    assert isinstance(first, ObjectLock)
    with first:
        assert upath(url).joinpath(LOCK_NAME).exists()
        with pytest.raises(LockError) as err:
            ObjectLock(url, "collect").acquire()
        line = str(err.value)
        assert "\n" not in line and line.startswith(f"output {url!r} is locked by collect run pid")
        assert line.endswith("wait for it to finish or choose another output")
    assert not upath(url).joinpath(LOCK_NAME).exists() and not messages
    with ObjectLock(url, "reduce"):  # free again
        pass


def test_heartbeat_keeps_the_lease_and_a_dead_holder_is_taken_over(url, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "2")  # heartbeat every 0.5 s; stale after 2 s (+1 s margin)
    with ObjectLock(url, "collect"):
        time.sleep(3.5)  # > the lease and its margin: only the heartbeat keeps it
        with pytest.raises(LockError, match="is locked by collect run"):
            ObjectLock(url, "collect").acquire()
    dead = ObjectLock(url, "collect")
    dead.acquire()
    dead._stop.set()  # a killed run: no more heartbeats, the object stays
    dead._thread.join()
    time.sleep(3.5)
    messages: list[str] = []
    with ObjectLock(url, "collect", echo=messages.append) as taker:
        assert taker.took_over is not None and taker.took_over.job == "collect"
    assert len(messages) == 1 and messages[0].startswith(f"taking over the stale lock of {url!r}")
    assert "sent no heartbeat" in messages[0] and "resumes what it left" in messages[0]


def test_a_writer_that_fails_leaves_the_old_object_whole(url):
    target = upath(url).parent / "table.parquet"
    location.write_whole(target, lambda p: p.write_bytes(b"old" * 1000))

    def half(p):
        p.write_bytes(b"new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        location.write_whole(target, half)
    assert target.read_bytes() == b"old" * 1000


@pytest.fixture
def s3_url(s3):
    out = f"s3://{s3.bucket()}/run/store.zarr"
    register(out, s3.options)
    return out


def test_bad_input_one_line_each(s3, s3_url, monkeypatch):
    cases = {
        "s3://no-such-bucket-here/x.zarr": "output bucket must exist, got 'no-such-bucket-here'",
        "ftp://host/x.zarr": "scheme ftp:// is not supported",
        "az://container/x.zarr": "scheme az:// is not supported",
        "hdfs://nn/x.zarr": "scheme hdfs:// is not supported",
    }
    for out, words in cases.items():
        with pytest.raises(LocationError) as err:
            register(out, s3.options)
            check_reachable(out)
        assert words in str(err.value) and "\n" not in str(err.value)
    register("s3://elsewhere/x.zarr", {"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(LocationError, match="endpoint_url must be a reachable S3 endpoint"):
        check_reachable("s3://elsewhere/x.zarr")
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # IAM auth on
    with pytest.raises(LocationError, match="got denied .403.; set AWS_ACCESS_KEY_ID"):
        check_reachable(s3_url)


def test_bad_gs_input_one_line_each(gcs, monkeypatch):
    register("gs://no-such-bucket-here/x.zarr", gcs.options)
    with pytest.raises(LocationError) as err:
        check_reachable("gs://no-such-bucket-here/x.zarr")
    assert str(err.value).startswith("output bucket must exist, got 'no-such-bucket-here' at ")
    assert "gcloud storage buckets create gs://no-such-bucket-here" in str(err.value)
    register("gs://elsewhere/x.zarr", {"endpoint_url": "http://127.0.0.1:9", "anon": True})
    with pytest.raises(LocationError, match="endpoint_url must be a reachable GCS endpoint"):
        check_reachable("gs://elsewhere/x.zarr")
    missing = f"gs://{gcs.bucket()}/x.zarr"  # not anonymous: the provider chain finds nothing
    register(missing, {"endpoint_url": gcs.endpoint})
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    with pytest.raises(LocationError) as err:
        check_reachable(missing)
    line = str(err.value)
    assert line.startswith(f"credentials for {missing!r} must allow reading and writing it, got")
    assert "set GOOGLE_APPLICATION_CREDENTIALS" in line and "\n" not in line


def test_collect_refuses_a_missing_bucket_before_any_actor(s3, tmp_path, monkeypatch):
    from helpers import collect_config, local_collect

    from crossmodal.collect import collector
    from crossmodal.organism import organism_path

    started = []
    monkeypatch.setattr(collector.Collector, "__init__", lambda *a, **k: started.append(a))
    raw = collect_config(organism_path(), "s3://missing-bucket-zz/c.zarr")
    raw["storage_options"] = s3.options
    with pytest.raises(LocationError, match="output bucket must exist"):
        local_collect(monkeypatch, raw)
    assert not started


def test_open_zarr_on_the_url_gives_labelled_arrays(service, url):
    ds = xr.Dataset(
        {"ap": (("unit", "language"), np.arange(6.0).reshape(3, 2))},
        coords={"unit": [10, 11, 12], "language": ["eng", "deu"]},
    )
    write_dataset(location.zarr_store(url), "selectivity/decoder", ds)
    got = xr.open_zarr(
        url,
        group="selectivity/decoder",
        consolidated=False,
        storage_options=location.fs_kwargs(url),
    )
    assert got["ap"].dims == ("unit", "language")
    assert [str(v) for v in got["language"].values] == ["eng", "deu"]
    np.testing.assert_array_equal(got["ap"].sel(unit=11).values, [2.0, 3.0])
    # the store object is opened as it is, never str()'d into a local path (that once made
    # folders named "<FsspecStore(...)>/selectivity/decoder" in the working directory)
    assert not [p.name for p in Path.cwd().iterdir() if p.name.startswith("<")]


def test_reduce_cli_takes_a_store_url_and_checks_it_first(s3, monkeypatch):
    from click.testing import CliRunner

    from crossmodal.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the CLI's endpoint: the AWS chain
    monkeypatch.delenv(location.OPTIONS_ENV, raising=False)
    result = CliRunner().invoke(main, ["reduce", "s3://no-bucket-cli/x.zarr"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "output bucket must exist, got 'no-bucket-cli'" in lines[0]


def test_steer_parts_on_a_url_are_whole_objects_and_resume_reads_them(s3):
    """Steering part files on s3://: one object each, read back for resume (done cells) and
    consolidation; a temporary-looking object is not a part."""
    import pyarrow as pa

    from crossmodal.steer.parts import PARTS, done_cells, part_name, read_parts, write_part

    bucket = s3.bucket()
    out = f"s3://{bucket}/study/steer"
    register(out, s3.options)
    cells = [_Cell("b"), _Cell("a")]
    table = pa.table({"cell_id": ["a", "b"], "input_id": [0, 0]})
    name = write_part(upath(out) / PARTS, cells, table)
    assert name == part_name(cells) and upath(out).joinpath(PARTS, name).is_file()
    upath(out).joinpath(PARTS, "._x.parquet.1.tmp").write_bytes(b"half")
    assert done_cells(out) == {"a", "b"}
    assert [t.equals(table) for t in read_parts(out)] == [True]
    assert done_cells(f"s3://{bucket}/study/none") == set()


class _Cell:
    def __init__(self, id: str) -> None:
        self.id = id


def test_a_steering_run_is_linked_relative_to_its_store_where_it_can_be():
    from crossmodal.steer.driver import run_link

    assert run_link("s3://b/study/steer", "s3://b/study/c.zarr") == "steer"
    assert run_link("s3://b/steer", "s3://b/c.zarr") == "steer"
    assert run_link("s3://other/steer", "s3://b/c.zarr") == "s3://other/steer"
    assert run_link("/data/steer", "/data/c.zarr") == "steer"
    assert run_link("s3://b/steer", "/data/c.zarr") == "s3://b/steer"
