"""Inputs at an object-storage URL: a folder of objects synced once into a local cache.

A model directory at ``s3://bucket/models/m`` is read by transformers from a local folder:
:func:`sync_folder` downloads the folder's objects into
``$CROSSMODAL_CACHE/inputs/<name>-<key>`` (default ``~/.cache/crossmodal``), where the key
is a digest of the URL and every object's name, ETag and size: a changed object gives a new
key, so it is downloaded again; an unchanged folder is not downloaded twice. Each process
(every Ray actor, on its own node) syncs for itself, so no process relies on another's disk.

Crash safety (docs/reliability.md, "Inputs on object storage"): the objects are written into
a temporary folder beside the cache entry and the folder is renamed into place once every
object arrived whole (its size checked, read with ``IfMatch`` on its listed ETag), so a
killed download never leaves a half entry; the temporary folders of dead processes are
removed by the next sync. Two processes syncing the same folder at once both download and
the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossmodal.store.location import (
    LocationError,
    check_reachable,
    endpoint_name,
    error_code,
    gcs_client,
    s3_client,
    scheme,
    split,
)

CACHE_ENV = "CROSSMODAL_CACHE"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Object:
    """One object of a folder: its name relative to the folder, version (the S3 ETag, the
    GCS generation) and size."""

    name: str
    etag: str
    size: int


def cache_root() -> Path:
    """``$CROSSMODAL_CACHE/inputs`` (default ``~/.cache/crossmodal/inputs``)."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/crossmodal")).expanduser() / "inputs"


def list_folder(url: str, *, role: str = "input") -> list[Object]:
    """Every object under the folder ``url`` (sorted by name), after the one-line checks of
    :func:`~crossmodal.store.location.check_reachable` (endpoint, bucket, read access)."""
    check_reachable(url, write=False, role=role)
    bucket, key = split(url)
    prefix = f"{key}/" if key else ""
    if scheme(url) == "gs":
        items = gcs_client(url).list(prefix)
        found = [
            Object(item["name"][len(prefix) :], str(item["generation"]), int(item["size"]))
            for item in items
            if not item["name"].endswith("/")
        ]
        return sorted(found, key=lambda o: o.name)
    pages = s3_client(url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    found = [
        Object(item["Key"][len(prefix) :], item["ETag"].strip('"'), int(item["Size"]))
        for page in pages
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    ]
    return sorted(found, key=lambda o: o.name)


def missing_folder(url: str, role: str) -> LocationError:
    """The line for a folder URL with no object under it."""
    return LocationError(
        f"{role} must be a folder of objects, got {url!r} with none under it at "
        f"{endpoint_name(url)}; upload it first ({_copy_command(url)} DIR {url}) or fix the URL"
    )


def _copy_command(url: str) -> str:
    return "gcloud storage rsync -r" if scheme(url) == "gs" else "aws s3 sync"


def cache_key(url: str, objects: Sequence[Object]) -> str:
    """Digest of the URL and every object's name, ETag and size."""
    listed = [[o.name, o.etag, o.size] for o in sorted(objects, key=lambda o: o.name)]
    return hashlib.sha256(json.dumps([url.rstrip("/"), listed]).encode()).hexdigest()[:24]


def sync_folder(
    url: str,
    objects: Sequence[Object] | None = None,
    *,
    keep: Callable[[str], bool] | None = None,
    role: str = "input",
) -> Path:
    """The local copy of the folder ``url`` (downloaded now unless the cache holds it).

    Args:
        objects: the folder's listing (:func:`list_folder`), if already made.
        keep: which object names to copy (default all); the key covers only those.
        role: the config field named in error lines.

    Raises:
        LocationError: an unreachable endpoint, a missing bucket, no objects under ``url``,
            or an object changed or cut short while it was downloaded (one line each).
    """
    objects = list_folder(url, role=role) if objects is None else list(objects)
    if not objects:
        raise missing_folder(url, role)
    chosen = [o for o in objects if keep is None or keep(o.name)]
    final = cache_root() / f"{_slug(url)}-{cache_key(url, chosen)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(final)
    _check_space(url, chosen, final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_host()}.{os.getpid()}.", dir=final.parent))
    try:
        _download(url, chosen, tmp)
        try:
            os.rename(tmp, final)  # atomic: the entry appears whole or not at all
        except OSError:
            if not final.is_dir():  # another process's rename won: use its entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_space(url: str, objects: Sequence[Object], where: Path) -> None:
    """Refuse a download the cache's disk cannot hold, before any byte is written."""
    need, free = sum(o.size for o in objects), shutil.disk_usage(where).free
    if need > free:
        raise LocationError(
            f"input cache must have one of [>= {need / 1e9:.2f} GB free] for {url!r}, got "
            f"{free / 1e9:.2f} GB at {str(where)!r}; free space or set {CACHE_ENV} to a "
            "larger disk"
        )


def _slug(url: str) -> str:
    """A readable folder name from the URL's last parts."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1].strip("/"))[-60:]


def _download(url: str, objects: Sequence[Object], into: Path) -> None:
    """Each object to ``into/<name>``, streamed, read only if its version (ETag, generation)
    is still the listed one, its size checked."""
    open_object = _gcs_reader(url) if scheme(url) == "gs" else _s3_reader(url)
    for obj in objects:
        target = into / obj.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            chunks = open_object(obj)
        except Exception as err:  # 412 when it changed since the listing
            code = error_code(err) or getattr(err, "status", "") or type(err).__name__
            raise LocationError(
                f"input object {url.rstrip('/')}/{obj.name} must stay as listed while it is "
                f"downloaded, got {code}; run again once the upload to it has finished"
            ) from None
        written = _stream(chunks, target)
        if written != obj.size:
            raise LocationError(
                f"input object {url.rstrip('/')}/{obj.name} must have its listed {obj.size} "
                f"bytes, got {written}; run again (a connection cut the download short)"
            )


def _s3_reader(url: str) -> Callable[[Object], Any]:
    """Object -> its bytes in chunks, read with ``IfMatch`` on its listed ETag."""
    client, (bucket, key) = s3_client(url), split(url)
    prefix = f"{key}/" if key else ""

    def open_object(obj: Object) -> Any:
        body = client.get_object(Bucket=bucket, Key=prefix + obj.name, IfMatch=obj.etag)
        return body["Body"].iter_chunks(_CHUNK)

    return open_object


def _gcs_reader(url: str) -> Callable[[Object], Any]:
    """Object -> its bytes in chunks, read with ``ifGenerationMatch`` on its generation."""
    client, (_, key) = gcs_client(url), split(url)
    prefix = f"{key}/" if key else ""

    def open_object(obj: Object) -> Any:
        response = client.read(prefix + obj.name, obj.etag, stream=True)
        return response.iter_content(_CHUNK)

    return open_object


def _stream(chunks: Any, target: Path) -> int:
    written = 0
    with target.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            written += len(chunk)
    return written


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()) or "host"


def _remove_dead_temporaries(final: Path) -> None:
    """Temporary folders of this entry left by processes of this host that died (a cache on
    a shared disk: another host's are left alone)."""
    for tmp in final.parent.glob(f".{final.name}.{_host()}.*"):
        pid = tmp.name[len(final.name) + len(_host()) + 3 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
