"""Where an output lives: a local path or an object-storage URL, opened one way everywhere.

An output (the collect store, the steering directory, the report) is a local path, an
``s3://`` URL (AWS S3 or an S3-compatible service) or a ``gs://`` URL (Google Cloud Storage).
This module is the one place that turns it into what the code writes through:

- :func:`upath`: a :class:`pathlib.Path` for a local path (unchanged behaviour), a
  :class:`upath.UPath` over s3fs or gcsfs for a URL (the same ``/``, ``open``, ``exists``,
  ``glob``);
- :func:`zarr_store`: the string path for a local store (Zarr's ``LocalStore``, as before), a
  :class:`zarr.storage.FsspecStore` on that UPath's filesystem for a URL.

``storage_options`` (a config field, :class:`StorageOptions`) names only the endpoint, the
region and anonymous reads; credentials come from the environment and the provider chain
(docs/design.md, "Object storage"). Options are registered per URL prefix by the driver
(:func:`register`) and travel to Ray actors inside the stage config, which registers them
again there.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SUPPORTED = ("s3", "gs")
ALLOWED = "[a local path, an s3:// URL, a gs:// URL]"
"""What an output or input may be, in the one-line refusals."""


@dataclass(frozen=True)
class StorageOptions:
    """The validated ``storage_options`` of a config (schema: ``storage_options``)."""

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False

    @classmethod
    def of(cls, raw: Mapping[str, Any] | StorageOptions | None) -> StorageOptions:
        """From a config mapping (missing keys: defaults), or as it is."""
        if isinstance(raw, StorageOptions):
            return raw
        raw = raw or {}
        return cls(
            endpoint_url=raw.get("endpoint_url"),
            region=raw.get("region"),
            anon=bool(raw.get("anon", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fsspec(self, scheme: str = "s3") -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem`` (``gcsfs.GCSFileSystem`` for ``gs``;
        it has no region), only what is set."""
        out: dict[str, Any] = {}
        if scheme == "gs":
            return {
                **({"token": "anon"} if self.anon else {}),
                **({"endpoint_url": self.endpoint_url} if self.endpoint_url else {}),
            }
        if self.anon:
            out["anon"] = True
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        if self.region:
            out["client_kwargs"] = {"region_name": self.region}
        return out


def scheme(output: Any) -> str | None:
    """The URL scheme of ``output`` (``s3``, ``gs``), or None for a local path."""
    m = URL.match(str(output))
    return m.group(1).lower() if m else None


def is_url(output: Any) -> bool:
    return scheme(output) is not None


class LocationError(ValueError):
    """An output URL that cannot be used: unsupported scheme, unreachable endpoint, missing
    bucket, denied credentials (one line naming the value and the fix)."""


_OPTIONS: dict[str, StorageOptions] = {}
"""``s3://bucket`` -> the options registered for it in this process (:func:`register`)."""
OPTIONS_ENV = "CROSSMODAL_STORAGE_OPTIONS"
"""The registered options as JSON (``{"s3://bucket": {...}}``): set by :func:`register` in
the driver's environment and forwarded to every Ray actor and task (fleet/session.py), which
read them back in :func:`options_for`. Endpoint, region and anon only: never credentials."""


def _bucket(url: str) -> str:
    """``s3://bucket/key...`` -> ``s3://bucket``."""
    m = URL.match(url)
    rest = url[m.end() :] if m else url
    return f"{m.group(1).lower() if m else ''}://{rest.split('/', 1)[0]}"


def register(output: Any, options: Mapping[str, Any] | StorageOptions | None) -> None:
    """Remember ``options`` for the bucket of URL ``output`` (a local path: nothing), so every
    later :func:`upath` / :func:`zarr_store` of a path under it uses them."""
    if is_url(output):
        check_scheme(str(output))
        _OPTIONS[_bucket(str(output))] = StorageOptions.of(options)
        shared = {k: v.to_dict() for k, v in _OPTIONS.items()}
        os.environ[OPTIONS_ENV] = json.dumps(shared, sort_keys=True)


def input_urls(config: Any) -> dict[str, str]:
    """The URLs a stage config reads from (``model``, ``data.path``, ``data.audio_root``):
    config field -> URL."""
    data = getattr(config, "data", None)
    fields = {
        "model": getattr(config, "model", None),
        "data.path": getattr(data, "path", None),
        "data.audio_root": getattr(data, "audio_root", None),
    }
    return {name: str(value) for name, value in fields.items() if value and is_url(value)}


def register_inputs(config: Any) -> None:
    """Register the config's ``storage_options`` for each input URL it names and check each
    up front, one line each (scheme, endpoint, bucket, read access), before any actor starts.
    Data URLs are read through s3fs (data/fleurs.py); a model URL is synced into the local
    cache by each process that loads it (store/inputs.py)."""
    for role, url in input_urls(config).items():
        check_scheme(url, role=role)
        register(url, config.storage_options)
        check_reachable(url, write=False, role=role)


def options_for(output: Any) -> StorageOptions:
    """The options registered for ``output``'s bucket in this process, else in
    :data:`OPTIONS_ENV` (a Ray worker), else defaults (the provider chain alone)."""
    bucket = _bucket(str(output))
    if bucket in _OPTIONS:
        return _OPTIONS[bucket]
    shared = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    return StorageOptions.of(shared.get(bucket))


def check_scheme(output: str, *, role: str = "output") -> None:
    """Raises :class:`LocationError` for a URL scheme outputs (or inputs: ``role``) cannot
    use."""
    found = scheme(output)
    if found is not None and found not in SUPPORTED:
        fix = (
            "write to s3:// (an S3-compatible service: storage_options.endpoint_url), to gs:// "
            "or to a local or shared path"
            if role == "output"
            else "copy it to s3://, to gs:// or to a local path"
        )
        raise LocationError(
            f"{role} must be one of {ALLOWED}, got {output!r} (scheme {found}:// is not "
            f"supported); {fix}"
        )


def fs_kwargs(output: Any) -> dict[str, Any]:
    """s3fs (gcsfs) keyword arguments for ``output``: the registered options, no listings
    cache (other processes write the same prefixes: a cached listing would hide their
    objects), and for s3fs one request per read (``max_concurrency=1``: s3fs otherwise sends
    a HEAD before every GET to size it; Zarr's chunks and shards are far below its 50 MB
    split size)."""
    found = scheme(output) or "s3"
    out = {**options_for(output).fsspec(found), "use_listings_cache": False}
    return out if found == "gs" else {**out, "max_concurrency": 1}


def upath(output: Any) -> Any:
    """``output`` as a path object: :class:`pathlib.Path` for a local path (as before), an
    s3fs- or gcsfs-backed :class:`upath.UPath` for a URL (same API: ``/``, ``open``,
    ``exists``, ``glob``, ``read_text``...)."""
    from pathlib import Path

    if not is_url(output):
        return Path(output)
    check_scheme(str(output))
    from upath import UPath

    return UPath(str(output), **fs_kwargs(output))


def zarr_store(output: Any, *, read_only: bool = False) -> Any:
    """What ``zarr.open_group`` opens for the store at ``output``: its path string for a
    local store (Zarr's ``LocalStore``), a :class:`zarr.storage.FsspecStore` for a URL; an
    already opened Zarr store as it is."""
    from zarr.abc.store import Store

    if isinstance(output, Store):
        return output
    if not is_url(output):
        return str(output)
    check_scheme(str(output))
    key_store = _key_store_class()
    return key_store.from_url(str(output), storage_options=fs_kwargs(output), read_only=read_only)


@functools.cache
def _key_store_class() -> type:
    from zarr.storage import FsspecStore

    class KeyStore(FsspecStore):
        """FsspecStore whose ``exists`` is one request: a Zarr key is an object, never a
        "directory", so the LIST that s3fs and gcsfs send after a 404 (to find a prefix)
        is never needed (docs/benchmarks.md, "Outputs on object storage")."""

        async def exists(self, key: str) -> bool:
            if not key:
                return bool(await self.fs._exists(self.path))
            path = f"{self.path}/{key}"
            try:  # both map a 404 to FileNotFoundError; other errors pass up
                if "gs" in self.fs.protocol:
                    await self.fs._get_object(path)  # one GET of the object's metadata
                else:
                    bucket, name, _ = self.fs.split_path(path)
                    await self.fs._call_s3("head_object", Bucket=bucket, Key=name)
            except FileNotFoundError:
                return False
            return True

    return KeyStore


def as_str(output: Any) -> str:
    """The canonical string of a path or URL (a UPath's URL keeps its ``s3://``)."""
    return str(output)


def resolve(output: Any) -> str:
    """A local path made absolute (symlinks resolved, as before); a URL as it is."""
    from pathlib import Path

    return str(output) if is_url(output) else str(Path(output).resolve())


def write_whole(path: Any, write: Any) -> None:
    """Write a file whole: ``write(target)`` writes it to a local path. Local: to a temporary
    name beside ``path``, then an atomic rename. URL: to memory, then ONE object PUT, so a
    killed writer leaves the old object or the new one, never half of one."""
    import os
    import tempfile

    if not is_url(path):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)
        return
    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        local = Path(d) / path.name
        write(local)
        path.write_bytes(local.read_bytes())  # one put_object (s3fs pipe)


def is_local(output: Any) -> bool:
    return not is_url(output)


def split(output: Any) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    m = URL.match(str(output))
    rest = str(output)[m.end() :] if m else str(output)
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_client(output: Any) -> Any:
    """A plain (synchronous) botocore S3 client with ``output``'s registered options and the
    environment's credentials: for the lock's conditional writes and the up-front checks."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    opts = options_for(output)
    config = Config(
        signature_version=UNSIGNED if opts.anon else None,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=30,
    )
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=opts.endpoint_url, region_name=opts.region, config=config
    )


def error_code(err: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` (``PreconditionFailed``, ``404``...)."""
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def check_reachable(output: Any, *, write: bool = True, role: str = "output") -> None:
    """For a URL: the endpoint answers, the bucket exists, the credentials may list it (and
    write it, when ``write``); each failure one :class:`LocationError` line naming the value
    and the fix, before any actor starts. A local path: nothing to check. ``role`` names the
    value in the lines (``output``, ``model``, ``data.path``)."""
    if not is_url(output):
        return
    if scheme(output) == "gs":
        _check_gcs(output, write=write, role=role)
        return
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = split(output)
    client, where = s3_client(output), endpoint_name(output)
    try:
        client.head_bucket(Bucket=bucket)
        if write:  # a HEAD passes with read-only credentials: try a tiny write too
            probe = f"{key}/.crossmodal-write-check" if key else ".crossmodal-write-check"
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
    except NoCredentialsError:
        raise LocationError(_credentials_line(output, "none found", write)) from None
    except ClientError as err:
        code = error_code(err)
        if code in ("404", "NoSuchBucket"):
            raise LocationError(
                f"{role} bucket must exist, got {bucket!r} at {where} (no such bucket); "
                "create it first (aws s3 mb s3://" + bucket + ") or fix the URL"
            ) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise LocationError(_credentials_line(output, f"denied ({code})", write)) from None
        raise LocationError(f"{role} {str(output)!r} at {where}: {err}; check it") from None
    except BotoCoreError as err:  # EndpointConnectionError, timeouts, bad URL
        raise LocationError(
            f"storage_options.endpoint_url must be a reachable S3 endpoint, got {where} "
            f"({type(err).__name__}); start the service or fix endpoint_url (or AWS_ENDPOINT_URL)"
        ) from None


def copy_command(url: str) -> str:
    """The command that uploads a local folder DIR to ``url``, for the fix in messages."""
    if scheme(url) == "gs":
        return f"gcloud storage rsync -r DIR {url}"
    return f"aws s3 sync DIR {url}"


def gcs_client(output: Any) -> Any:
    """A :class:`~crossmodal.store.gcs.GcsClient` of ``output``'s bucket with its registered
    options and the environment's credentials (the lock, the checks, the input cache)."""
    from crossmodal.store.gcs import GcsClient

    opts = options_for(output)
    return GcsClient(split(output)[0], endpoint_url=opts.endpoint_url, anon=opts.anon)


def _check_gcs(output: Any, *, write: bool, role: str) -> None:
    """:func:`check_reachable` for a ``gs://`` URL."""
    import requests
    from google.auth.exceptions import DefaultCredentialsError

    from crossmodal.store.gcs import GcsError

    bucket, key = split(output)
    where = endpoint_name(output)
    try:
        client = gcs_client(output)
        client.bucket_exists()
        if write:  # reading the bucket passes with read-only credentials: try a tiny write
            probe = f"{key}/.crossmodal-write-check" if key else ".crossmodal-write-check"
            client.delete(probe, if_generation=client.put(probe, b"ok"))
    except DefaultCredentialsError:
        raise LocationError(_credentials_line(output, "none found", write)) from None
    except GcsError as err:
        if err.status == 404:
            raise LocationError(
                f"{role} bucket must exist, got {bucket!r} at {where} (no such bucket); "
                f"create it first (gcloud storage buckets create gs://{bucket}) or fix the URL"
            ) from None
        if err.status in (401, 403):
            raise LocationError(
                _credentials_line(output, f"denied ({err.status})", write)
            ) from None
        raise LocationError(f"{role} {str(output)!r} at {where}: {err}; check it") from None
    except requests.RequestException as err:
        raise LocationError(
            f"storage_options.endpoint_url must be a reachable GCS endpoint, got {where} "
            f"({type(err).__name__}); start the service or fix endpoint_url (or "
            "STORAGE_EMULATOR_HOST)"
        ) from None


def endpoint_name(output: Any) -> str:
    """The service ``output`` is on, for messages: its endpoint URL, else the public one."""
    opts = options_for(output)
    if scheme(output) == "gs":
        from crossmodal.store.gcs import endpoint

        return repr(endpoint(opts.endpoint_url))
    return repr(opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")


def _credentials_line(output: Any, what: str, write: bool = True) -> str:
    if scheme(output) == "gs":
        need = "storage.objects.list, storage.objects.get" + (
            ", storage.objects.create, storage.objects.delete" if write else ""
        )
        verb = "reading and writing" if write else "reading"
        return (
            f"credentials for {str(output)!r} must allow {verb} it, got {what}; set "
            "GOOGLE_APPLICATION_CREDENTIALS (or run gcloud auth application-default login, or "
            f"use a workload identity) to an account with {need} on it"
            + ("" if write else ", or storage_options.anon: true for a public bucket")
        )
    if not write:  # an input: reading is all it needs (or storage_options.anon for a public one)
        return (
            f"credentials for {str(output)!r} must allow reading it, got {what}; set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance or pod "
            "role) to credentials with s3:ListBucket, s3:GetObject on it, or "
            "storage_options.anon: true for a public bucket"
        )
    return (
        f"credentials for {str(output)!r} must allow reading and writing it, got {what}; set "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance or pod role) "
        "to credentials with s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject on it"
    )


def read_parquet(path: Any) -> Any:
    """``pd.read_parquet`` of a file or a folder of files; a URL is read whole into memory
    (each Parquet file of this project is one small table: sets, steering summaries)."""
    import io

    import pandas as pd

    if not is_url(path):
        return pd.read_parquet(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(".parquet"))
        return pd.concat([read_parquet(p) for p in files], ignore_index=True)
    return pd.read_parquet(io.BytesIO(path.read_bytes()))


def upload_tree(local: Any, dest: Any) -> list[Any]:
    """Copy every file under the local folder ``local`` to ``dest`` (a URL), one whole PUT
    each; the destination paths, in the order of the local files."""
    out = []
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        target = dest.joinpath(*file.relative_to(local).parts)
        target.write_bytes(file.read_bytes())
        out.append(target)
    return out
