"""Inputs at an object-storage URL: a folder of objects synced once into a local cache.

A model directory at ``s3://bucket/models/m`` is read by transformers from a local folder:
:func:`sync_folder` downloads the folder's objects into
``$CROSSMODAL_CACHE/inputs/<name>-<key>`` (default ``~/.cache/crossmodal``), where the key
is a digest of the URL and every object's name, ETag and size: a changed object gives a new
key, so it is downloaded again; an unchanged folder is not downloaded twice. Each process
(every Ray actor, on its own node) syncs for itself, so no process relies on another's disk.

Crash safety (docs/reliability.md, "Inputs on object storage: the cache"): the objects are
written into a temporary folder beside the cache entry, with a manifest
(``.crossmodal-entry.json``: each object's name and size), and the folder is renamed into
place once every object arrived whole (its size checked, read with ``IfMatch`` on its
listed ETag), so a killed download never leaves a half entry; the temporary folders of dead
processes are removed by the next sync. Two processes syncing the same folder at once both
download and the first rename wins.

An entry is checked before it is reused (every listed file there with its listed size): a
damaged one (a file removed or cut short by hand, or no manifest: an entry of an older
version) is renamed aside, removed and downloaded again, with one ``warning:`` line. Each
reuse touches the entry's ``.last-used``; after each sync, entries least recently used are
removed until ``inputs/`` holds at most ``$CROSSMODAL_CACHE_MAX_GB`` (unset: no limit),
except the entry just returned and any used in the last :data:`IN_USE_S` seconds, which
another process may be loading. Removal is always a rename aside, then a delete, so no
reader ever sees a half entry at an entry's name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossmodal.store.location import (
    LocationError,
    check_reachable,
    copy_command,
    endpoint_name,
    error_code,
    gcs_client,
    s3_client,
    scheme,
    split,
)

CACHE_ENV = "CROSSMODAL_CACHE"
MAX_ENV = "CROSSMODAL_CACHE_MAX_GB"
MANIFEST = ".crossmodal-entry.json"
LAST_USED = ".last-used"
IN_USE_S = 600  # an entry used in the last 10 minutes may be loading: never evicted
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
        f"{endpoint_name(url)}; upload it first ({copy_command(url)}) or fix the URL"
    )


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
    """The local copy of the folder ``url`` (downloaded now unless the cache holds it whole),
    then the least recently used other entries evicted down to ``$CROSSMODAL_CACHE_MAX_GB``.

    Args:
        objects: the folder's listing (:func:`list_folder`), if already made.
        keep: which object names to copy (default all); the key covers only those.
        role: the config field named in error lines.

    Raises:
        LocationError: an unreachable endpoint, a missing bucket, no objects under ``url``,
            an object changed or cut short while it was downloaded, or a bad
            ``$CROSSMODAL_CACHE_MAX_GB`` (one line each).
    """
    limit = max_bytes()  # a bad value is refused before any download
    objects = list_folder(url, role=role) if objects is None else list(objects)
    if not objects:
        raise missing_folder(url, role)
    chosen = [o for o in objects if keep is None or keep(o.name)]
    final = cache_root() / f"{_slug(url)}-{cache_key(url, chosen)}"
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(final.parent)
    if not _reuse(final, chosen):
        _fetch(url, chosen, final)
    if limit is not None:
        evict(limit, keep=final)
    return final


def _fetch(url: str, chosen: Sequence[Object], final: Path) -> None:
    """Download into a temporary folder, write the manifest, rename it to ``final``."""
    _check_space(url, chosen, final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_host()}.{os.getpid()}.", dir=final.parent))
    try:
        _download(url, chosen, tmp)
        listed = [{"name": o.name, "size": o.size} for o in chosen]
        (tmp / MANIFEST).write_text(json.dumps({"url": url, "objects": listed}))
        (tmp / LAST_USED).touch()
        try:
            os.rename(tmp, final)  # atomic: the entry appears whole or not at all
        except OSError:
            if not final.is_dir():  # another process's rename won: use its entry
                raise
            _touch(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reuse(final: Path, chosen: Sequence[Object]) -> bool:
    """Whether ``final`` holds ``chosen`` whole; a damaged entry is moved aside and removed."""
    try:
        ino = final.stat().st_ino
        _touch(final)  # marked in use before the check: an evictor that moved it puts it back
    except (FileNotFoundError, NotADirectoryError):
        return False
    reason = _damage(final, chosen)
    if reason is None:
        return True
    print(
        f"warning: input cache entry {str(final)!r} must hold every listed object whole, got "
        f"{reason}; downloading it again",
        file=sys.stderr,
        flush=True,
    )
    _move_aside(final, still=lambda moved: moved.stat().st_ino == ino)
    return False


def _damage(entry: Path, chosen: Sequence[Object]) -> str | None:
    """Why ``entry`` is not a whole copy of ``chosen`` (None when it is): its manifest must
    list them, and each listed file be there with its listed size (no content read)."""
    try:
        listed = json.loads((entry / MANIFEST).read_text())["objects"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an entry of an older version, or not made by crossmodal)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable {MANIFEST}"
    if listed != [{"name": o.name, "size": o.size} for o in chosen]:
        return f"a {MANIFEST} that does not list the folder's objects"
    for item in listed:
        try:
            size = (entry / item["name"]).stat().st_size
        except OSError:
            return f"{item['name']!r} missing"
        if size != item["size"]:
            return f"{item['name']!r} with {size} of its listed {item['size']} bytes"
    return None


def _touch(entry: Path) -> None:
    """Mark ``entry`` used now (its ``.last-used`` file's mtime)."""
    if not entry.is_dir():
        raise FileNotFoundError(entry)
    (entry / LAST_USED).touch()


def _move_aside(entry: Path, still: Callable[[Path], bool]) -> bool:
    """Rename ``entry`` to a temporary name of this process, then delete it, unless
    ``still(moved)`` is false once it is moved (another process replaced or used it between
    the check and the rename): then it is put back. Whether it was removed. A crash between
    the rename and the delete leaves a temporary of a dead process: the next sync removes it."""
    moved = entry.parent / f".{entry.name}.{_host()}.{os.getpid()}.old{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, moved)
    except FileNotFoundError:
        return False  # another process moved it first
    try:
        keep = not still(moved)
    except OSError:
        keep = False
    if keep:
        try:
            os.rename(moved, entry)
            return False
        except OSError:  # a new entry took the name meanwhile: this copy is not needed
            pass
    shutil.rmtree(moved, ignore_errors=True)
    return True


def max_bytes() -> int | None:
    """``$CROSSMODAL_CACHE_MAX_GB`` in bytes (decimal GB); None (no limit) when unset."""
    raw = os.environ.get(MAX_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise LocationError(
            f"{MAX_ENV} must be one of [a number of GB > 0, unset for no limit], got {raw!r}; "
            f"fix it or unset {MAX_ENV}"
        )
    return int(gb * 1e9)


def evict(limit: int, *, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries of the cache until the entries hold at most
    ``limit`` bytes; ``keep`` and entries used in the last :data:`IN_USE_S` seconds stay even
    over the limit. The entries removed."""
    entries = [p for p in cache_root().iterdir() if not p.name.startswith(".") and p.is_dir()]
    sizes = {p: _entry_size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=_last_used):
        if total <= limit:
            break
        if entry == keep or _recent(entry):
            continue
        gone = _move_aside(entry, still=lambda moved: not _recent(moved))
        if gone or not entry.exists():  # removed here, or by another process first
            total -= sizes[entry]
        if gone:
            removed.append(entry)
            print(
                f"removed input cache entry {str(entry)!r} ({sizes[entry] / 1e9:.2f} GB, least "
                f"recently used) to keep the cache under {MAX_ENV}={limit / 1e9:g}",
                file=sys.stderr,
                flush=True,
            )
    return removed


def _entry_size(entry: Path) -> int:
    """Bytes of an entry: its manifest's sizes, or its files' for an entry without one."""
    try:
        return sum(int(o["size"]) for o in json.loads((entry / MANIFEST).read_text())["objects"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    except OSError:  # removed meanwhile by another process
        return 0


def _last_used(entry: Path) -> float:
    """When ``entry`` was last synced: its ``.last-used``, else its manifest's or its own mtime."""
    for path in (entry / LAST_USED, entry / MANIFEST, entry):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def _recent(entry: Path) -> bool:
    return time.time() - _last_used(entry) < IN_USE_S


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


def _remove_dead_temporaries(root: Path) -> None:
    """Temporary folders (downloads, entries moved aside) left in ``root`` by processes of
    this host that died (a cache on a shared disk: another host's are left alone). Their
    names are ``.<entry>.<host>.<pid>.<suffix>``: host, pid and suffix hold no dot."""
    for tmp in root.glob(".*"):
        parts = tmp.name[1:].rsplit(".", 3)
        mine = len(parts) == 4 and parts[1] == _host() and parts[2].isdigit()
        if mine and not _alive(int(parts[2])):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
