"""Inputs on object storage, against a real S3 server on 127.0.0.1 (tests/s3_server.py):

- the input cache (crossmodal/store/inputs.py): a folder is downloaded once, again when an
  object changes (its ETag), never left half written by a download that fails, and the
  temporary folders of dead processes are removed; a damaged entry (a file cut short, no
  manifest) is downloaded again under the same name; ``CROSSMODAL_CACHE_MAX_GB`` evicts the
  least recently used entries but never the one just returned nor one in use;
- a model directory at an ``s3://`` URL loads the same weights as the local directory, and a
  missing or incomplete one, an unreachable endpoint or an unsupported scheme is refused in
  one line naming the value and the fix;
- FLEURS (raw layout, Parquet copy, alternative audio root) read from ``s3://`` gives the same
  records and skips as the local copy;
- a collect whose model and data both come from ``s3://`` writes the same store as the run
  on the local copies (integration);
- on ``gs://`` (a GCS server, tests/gcs_server.py): FLEURS reads like the local copy, and a
  model directory loads the local weights, is downloaded again when an object's generation
  changes, and an object replaced mid-download is refused in one line.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import zarr
from s3_server import s3_server

from crossmodal.model.load import ModelLoadError, load_model, model_files
from crossmodal.organism import organism_path
from crossmodal.store import inputs
from crossmodal.store.location import LocationError, register, register_inputs, upath, upload_tree

logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test its own input cache."""
    monkeypatch.setenv(inputs.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "inputs"


def _folder(s3, files: dict[str, bytes]) -> str:
    url = f"s3://{s3.bucket()}/in/folder"
    register(url, s3.options)
    for name, data in files.items():
        upath(f"{url}/{name}").write_bytes(data)
    return url


def _organism_url(s3) -> str:
    url = f"s3://{s3.bucket()}/models/organism"
    register(url, s3.options)
    upload_tree(Path(organism_path()), upath(url))
    return url


def test_a_folder_is_downloaded_once_and_again_when_an_object_changes(s3, cache, monkeypatch):
    url = _folder(s3, {"a.json": b"{}", "sub/b.bin": b"1234"})
    first = inputs.sync_folder(url)
    assert (first / "a.json").read_bytes() == b"{}" and (
        first / "sub/b.bin"
    ).read_bytes() == b"1234"
    calls, real = [], inputs._download
    monkeypatch.setattr(inputs, "_download", lambda *a: calls.append(a))
    assert inputs.sync_folder(url) == first and not calls  # cached: nothing downloaded
    monkeypatch.setattr(inputs, "_download", real)
    upath(f"{url}/sub/b.bin").write_bytes(b"5678")  # a new ETag
    second = inputs.sync_folder(url)
    assert second != first and (second / "sub/b.bin").read_bytes() == b"5678"
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])


def test_a_failed_download_leaves_no_entry_and_dead_temporaries_are_removed(s3, cache, monkeypatch):
    url = _folder(s3, {"a.json": b"{}", "b.json": b"[]"})
    real = inputs._stream

    def breaks(body, target):
        if target.name == "b.json":
            raise ConnectionError("cut")
        return real(body, target)

    monkeypatch.setattr(inputs, "_stream", breaks)
    with pytest.raises(ConnectionError):
        inputs.sync_folder(url)
    assert list(cache.iterdir()) == []  # neither an entry nor a temporary folder
    monkeypatch.setattr(inputs, "_stream", real)
    name = f"{inputs._slug(url)}-{inputs.cache_key(url, inputs.list_folder(url))}"
    dead = cache / f".{name}.{inputs._host()}.999999999.x"  # a killed process's half download
    (dead / "a.json").parent.mkdir(parents=True)
    entry = inputs.sync_folder(url)
    assert entry.name == name and not dead.exists() and (entry / "b.json").read_bytes() == b"[]"


def _counting(monkeypatch) -> list:
    """The calls to inputs._download from now on (each still downloads)."""
    calls, real = [], inputs._download
    monkeypatch.setattr(inputs, "_download", lambda *a: (calls.append(a), real(*a))[1])
    return calls


def _no_temporaries(cache: Path) -> bool:
    return not any(p.name.startswith(".") for p in cache.iterdir())


def test_a_damaged_entry_is_downloaded_again_under_the_same_name(s3, cache, monkeypatch, capsys):
    url = _folder(s3, {"a.json": b"{}", "sub/b.bin": b"1234"})
    first = inputs.sync_folder(url)
    assert (first / inputs.MANIFEST).is_file()
    calls = _counting(monkeypatch)
    assert inputs.sync_folder(url) == first and not calls  # whole: reused
    os.truncate(first / "sub/b.bin", 2)  # cut short by hand
    assert inputs.sync_folder(url) == first and len(calls) == 1
    assert (first / "sub/b.bin").read_bytes() == b"1234" and _no_temporaries(cache)
    line = capsys.readouterr().err.strip()
    assert line == (
        f"warning: input cache entry {str(first)!r} must hold every listed object whole, got "
        "'sub/b.bin' with 2 of its listed 4 bytes; downloading it again"
    )
    (first / "a.json").unlink()  # removed by hand
    assert inputs.sync_folder(url) == first and len(calls) == 2
    assert (first / "a.json").read_bytes() == b"{}"
    assert "'a.json' missing" in capsys.readouterr().err
    assert inputs.sync_folder(url) == first and len(calls) == 2  # whole again: reused


def test_an_entry_without_a_manifest_is_downloaded_again(s3, cache, monkeypatch, capsys):
    url = _folder(s3, {"a.json": b"{}"})
    entry = inputs.sync_folder(url)
    (entry / inputs.MANIFEST).unlink()  # as an entry of an older version
    calls = _counting(monkeypatch)
    assert inputs.sync_folder(url) == entry and len(calls) == 1
    assert (entry / inputs.MANIFEST).is_file() and (entry / "a.json").read_bytes() == b"{}"
    assert f"got no {inputs.MANIFEST} (an entry of an older version" in capsys.readouterr().err
    assert inputs.sync_folder(url) == entry and len(calls) == 1 and _no_temporaries(cache)


def _age(entry: Path, seconds: float) -> None:
    """Make ``entry`` look last used ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(entry / inputs.LAST_USED, (then, then))


def _three(s3) -> list[str]:
    urls = [f"s3://{s3.bucket()}/in/f{i}" for i in range(3)]
    for url in urls:
        register(url, s3.options)
        upath(f"{url}/w.bin").write_bytes(b"x" * 1000)
    return urls


def test_the_least_recently_used_entries_are_evicted_over_the_limit(s3, cache, monkeypatch):
    monkeypatch.setenv(inputs.MAX_ENV, "0.0000025")  # 2,500 bytes: two of the 1,000-byte folders
    urls = _three(s3)
    a, b, c = (inputs.sync_folder(url) for url in urls)
    assert a.is_dir() and b.is_dir()  # over the limit, but all used just now: none evicted
    _age(b, 2 * 3600)
    _age(a, 3 * 3600)  # the least recently used
    assert inputs.sync_folder(urls[2]) == c  # a reuse evicts too
    assert not a.exists() and b.is_dir() and (c / "w.bin").read_bytes() == b"x" * 1000
    assert _no_temporaries(cache)
    _age(b, 3600)
    _age(c, 2 * 3600)  # now c is the oldest: the next sync of b evicts it, not b
    monkeypatch.setenv(inputs.MAX_ENV, "0.0000015")
    assert inputs.sync_folder(urls[1]) == b and b.is_dir() and not c.exists()


def test_the_entry_just_returned_is_never_evicted(s3, cache, monkeypatch):
    monkeypatch.setenv(inputs.MAX_ENV, "0.0000005")  # 500 bytes: less than one folder
    monkeypatch.setattr(inputs, "IN_USE_S", 0)  # no entry counts as in use
    urls = _three(s3)
    first = inputs.sync_folder(urls[0])
    assert (first / "w.bin").read_bytes() == b"x" * 1000  # alone over the limit, kept
    second = inputs.sync_folder(urls[1])
    assert not first.exists() and (second / "w.bin").read_bytes() == b"x" * 1000
    assert [p.name for p in cache.iterdir()] == [second.name]


def test_an_entry_used_while_it_is_moved_aside_is_put_back(s3, cache):
    entry = inputs.sync_folder(_folder(s3, {"a.json": b"{}"}))
    assert not inputs._move_aside(entry, still=lambda moved: False)  # used meanwhile
    assert (entry / "a.json").read_bytes() == b"{}" and _no_temporaries(cache)
    assert inputs._move_aside(entry, still=lambda moved: True)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("value", ["ten", "0", "-1", "inf"])
def test_a_bad_cache_limit_is_one_line_before_any_download(s3, cache, monkeypatch, value):
    monkeypatch.setenv(inputs.MAX_ENV, value)
    with pytest.raises(LocationError) as err:
        inputs.sync_folder(_folder(s3, {"a.json": b"{}"}))
    assert str(err.value) == (
        f"CROSSMODAL_CACHE_MAX_GB must be one of [a number of GB > 0, unset for no limit], got "
        f"{value!r}; fix it or unset CROSSMODAL_CACHE_MAX_GB"
    )
    assert not cache.exists()


def test_an_object_changed_while_downloading_is_one_line(s3):
    url = _folder(s3, {"a.json": b"{}"})
    listed = inputs.list_folder(url)
    upath(f"{url}/a.json").write_bytes(b"{ }")
    with pytest.raises(LocationError) as err:
        inputs.sync_folder(url, listed)
    line = str(err.value)
    assert "\n" not in line and f"{url}/a.json must stay as listed" in line
    assert line.endswith("run again once the upload to it has finished")


def test_a_model_at_a_url_loads_the_local_weights(s3):
    url = _organism_url(s3)
    remote, local = load_model(url, device="cpu"), load_model(str(organism_path()), device="cpu")
    a, b = remote.model.state_dict(), local.model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert remote.lang_to_code_id == local.lang_to_code_id and remote.source == url
    assert remote.revision.startswith(url + "#")
    meta = model_files(url)  # the driver's copy: configs and processor, no weights
    assert (meta / "config.json").is_file() and not (meta / "model.safetensors").exists()


def test_missing_and_incomplete_model_urls_are_one_line(s3):
    bucket = s3.bucket()
    missing = f"s3://{bucket}/models/none"
    register(missing, s3.options)
    with pytest.raises(ModelLoadError) as err:
        load_model(missing, device="cpu")
    assert str(err.value) == (
        f"model directory {missing!r} does not exist (no objects under it); upload it "
        f"(aws s3 sync DIR {missing}) or fix the URL"
    )
    partial = f"s3://{bucket}/models/partial"
    upath(f"{partial}/config.json").write_bytes(
        (Path(organism_path()) / "config.json").read_bytes()
    )
    with pytest.raises(ModelLoadError) as err:
        load_model(partial, device="cpu")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"model directory {partial!r} is incomplete")
    assert "missing weights" in line and line.endswith(f"(aws s3 sync DIR {partial})")


def test_a_model_at_a_gs_url_loads_the_local_weights_and_is_refreshed(gcs):
    """The same from ``gs://`` (tests/gcs_server.py): listed with generations, each object
    read only at its listed generation; a missing model names the gcloud upload."""
    url = f"gs://{gcs.bucket()}/models/organism"
    register(url, gcs.options)
    upload_tree(Path(organism_path()), upath(url))
    remote, local = load_model(url, device="cpu"), load_model(str(organism_path()))
    a, b = remote.model.state_dict(), local.model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    first = inputs.sync_folder(url)
    upath(f"{url}/config.json").write_bytes(upath(f"{url}/config.json").read_bytes())
    assert inputs.sync_folder(url) != first  # a new generation: downloaded again
    upath(f"{url}/a.json").write_bytes(b"{}")  # a listing no entry was made from
    listed = inputs.list_folder(url)
    upath(f"{url}/a.json").write_bytes(b"{ }")
    with pytest.raises(LocationError, match="a.json must stay as listed .*412"):
        inputs.sync_folder(url, listed)
    missing = f"gs://{gcs.bucket()}/models/none"
    register(missing, gcs.options)
    with pytest.raises(ModelLoadError) as err:
        load_model(missing, device="cpu")
    assert str(err.value).endswith(f"(gcloud storage rsync -r DIR {missing}) or fix the URL")


class _Config:
    """What register_inputs reads of a stage config."""

    def __init__(self, model: str, path: str | None, options: dict) -> None:
        from types import SimpleNamespace

        from crossmodal.store.location import StorageOptions

        self.model = model
        self.data = SimpleNamespace(path=path, audio_root=None)
        self.storage_options = StorageOptions.of(options)


def test_input_urls_are_checked_up_front(s3):
    with pytest.raises(LocationError) as err:
        register_inputs(_Config("organism", "az://b/fleurs", {}))
    assert str(err.value) == (
        "data.path must be one of [a local path, an s3:// URL, a gs:// URL], got "
        "'az://b/fleurs' (scheme az:// is not supported); copy it to s3://, to gs:// or to a "
        "local path"
    )
    with pytest.raises(LocationError) as err:
        register_inputs(_Config("s3://absent-bucket/m", None, s3.options))
    assert str(err.value).startswith("model bucket must exist, got 'absent-bucket'")
    dead = {"endpoint_url": "http://127.0.0.1:9"}  # nothing listens on the discard port
    with pytest.raises(LocationError) as err:
        register_inputs(_Config("organism", "s3://unreached-bucket/fleurs", dead))
    line = str(err.value)
    assert "\n" not in line and line.startswith("storage_options.endpoint_url must be a reachable")


def test_fleurs_at_a_url_reads_like_the_local_copy(service, tmp_path):
    from fleurs_fixture import build_fleurs

    from crossmodal.data.fleurs import FleursParquetSource, FleursSource

    fx = build_fleurs(tmp_path)
    url = f"{service.scheme}://{service.bucket()}/fleurs"
    register(url, service.options)
    for local, name in ((fx.root, "raw"), (fx.parquet_root, "parquet"), (fx.audio_root, "re")):
        upload_tree(local, upath(f"{url}/{name}"))
    pairs = [
        (FleursSource(fx.root), FleursSource(f"{url}/raw")),
        (FleursParquetSource(fx.parquet_root), FleursParquetSource(f"{url}/parquet")),
        (
            FleursSource(fx.root, audio_root=fx.audio_root),
            FleursSource(f"{url}/raw", audio_root=f"{url}/re"),
        ),
    ]
    for local, remote in pairs:
        for language in ("eng", "deu", "cmn") if local.audio_root is None else ("eng",):
            a, b = list(local.records(language, "test")), list(remote.records(language, "test"))
            assert [(r.id, r.text) for r in a] == [(r.id, r.text) for r in b] and a
            assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b, strict=True))
        assert local.skipped.counts == remote.skipped.counts and remote.skipped.total
        assert local.skipped.ids == remote.skipped.ids


def _collect(tmp: Path, model: str, data: str, options: dict | None) -> Path:
    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect

    raw = {
        "model": model,
        "dtype": "float32",
        "languages": ["eng", "deu", "cmn"],
        "tasks": ["x2en"],
        "modalities": ["speech", "text"],
        "families": ["decoder"],
        "steps": [1, 3],
        "n_bins": 8,
        "pilot_size": 3,
        "batch_size": 2,
        "max_new_tokens": 4,
        "data": {"source": "fleurs_parquet", "path": data},
        "output": str(tmp / "c.zarr"),
        "shard_size": 2,
        "keep_parts": False,
        "actors": {"count": 1, "num_cpus": 0.5, "max_restarts": 1, "max_task_retries": 1},
    }
    if options:
        raw["storage_options"] = options
    (tmp / "collect.yaml").write_text(yaml.safe_dump(raw))
    run_collect(load_config(tmp / "collect.yaml"), echo=lambda _: None, progress=False)
    return tmp / "c.zarr"


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {k: np.asarray(v[...]) for k, v in root.members(max_depth=None) if hasattr(v, "dtype")}


@pytest.mark.integration
def test_collect_with_model_and_data_from_s3_equals_the_local_run(s3, tmp_path, monkeypatch):
    from fleurs_fixture import build_fleurs

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    fx = build_fleurs(tmp_path / "data")
    model = _organism_url(s3)
    data = model.rsplit("/", 2)[0] + "/fleurs"
    upload_tree(fx.parquet_root, upath(data))
    (tmp_path / "local").mkdir()
    (tmp_path / "s3").mkdir()
    local = _collect(tmp_path / "local", str(organism_path()), str(fx.parquet_root), None)
    remote = _collect(tmp_path / "s3", model, data, s3.options)
    a, b = _arrays(local), _arrays(remote)
    assert a.keys() == b.keys() and a["stats/decoder/n_examples"].sum() > 0
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    entries = [p for p in (tmp_path / "cache" / "inputs").iterdir()]
    assert len(entries) == 2 and not any(p.name.startswith(".") for p in entries)  # full + configs


def test_collect_refuses_missing_data_at_a_url_before_any_actor(s3, tmp_path):
    data = f"s3://{s3.bucket()}/fleurs-absent"
    with pytest.raises(ValueError) as err:
        _collect(tmp_path, str(organism_path()), data, s3.options)
    assert str(err.value) == (
        f"data.path must be one of [an existing dataset directory], got {data!r} (no objects "
        f"under it); only --dry-run works without the data (upload it: aws s3 sync DIR {data})"
    )
    assert not (tmp_path / "c.zarr").exists()


def test_a_cache_without_room_is_refused_before_downloading(s3, cache, monkeypatch):
    url = _folder(s3, {"a.bin": b"x" * 1000})
    monkeypatch.setattr(inputs.shutil, "disk_usage", lambda _: SimpleNamespace(free=10))
    with pytest.raises(LocationError) as err:
        inputs.sync_folder(url)
    assert str(err.value) == (
        f"input cache must have one of [>= 0.00 GB free] for {url!r}, got 0.00 GB at "
        f"{str(cache)!r}; free space or set CROSSMODAL_CACHE to a larger disk"
    )
    assert list(cache.iterdir()) == []
