"""One writer per output: a lock file in the store (or steering output) held while a run writes.

Two collect (or reduce, or steer) drivers writing one output at once would interleave
manifests and shards (Zarr metadata is last-writer-wins; docs/platform.md, "Zarr"). :class:`OutputLock`
makes the second one refuse with one line naming the holder.

How: ``<output>/crossmodal.lock`` holds JSON (pid, host, start time, job, command) and the
holder keeps an exclusive ``flock`` on it for the whole run. The kernel drops a ``flock``
when its process dies, however it dies, so:

- lock held (``flock`` busy): another live run -> :class:`LockError`;
- ``flock`` free but the file names a process on THIS host: if that pid is gone (or is now
  another process: its start time differs) the lock is stale -> taken over, with a message;
  if it is somehow still alive -> refused;
- ``flock`` free and the file names ANOTHER host: nothing here can tell whether that run
  is alive (``flock`` may not span hosts on a network file system) -> refused, and the
  message says which file to delete once that run is known to be gone.

The file is removed on release. Acquiring re-checks that the path still names the inode it
locked, so a release racing with an acquire cannot hand out two locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_NAME = "crossmodal.lock"
_RETRIES = 5


class LockError(ValueError):
    """The output is locked by another run (one line: who, since when, the fix)."""


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started: str
    job: str
    pid_start: str | None = None  # /proc start time of the pid: tells a reused pid apart
    command: str = ""

    def describe(self) -> str:
        return f"{self.job} run pid {self.pid} on host {self.host!r} since {self.started}"


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name (field 2) may hold spaces


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, when ``start`` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _pid_start(pid)
    return start is None or now is None or now == start


def read_lock(output: str | Path) -> LockInfo | None:
    """The lock file's content, or None when there is no (readable) lock file."""
    try:
        return _parse((Path(output) / LOCK_NAME).read_text())
    except OSError:
        return None


def _parse(text: str) -> LockInfo | None:
    try:
        raw = json.loads(text)
        return LockInfo(**{k: raw[k] for k in LockInfo.__dataclass_fields__ if k in raw})
    except (json.JSONDecodeError, TypeError, KeyError):
        return None  # empty (a crash between create and write) or foreign: no owner to name


class OutputLock:
    """Exclusive lock of an output directory for one run; a context manager.

    Args:
        output: the store or steering output directory (created if missing).
        job: what holds it (``collect``, ``reduce``, ``steer``), for the messages.
        echo: where the stale-lock takeover message goes.

    Raises:
        LockError: on enter, when another run holds the output (see the module docstring).
    """

    def __init__(self, output: str | Path, job: str, echo: Callable[[str], None] = print) -> None:
        self.output = Path(output)
        self.path = self.output / LOCK_NAME
        self.job = job
        self.echo = echo
        self.took_over: LockInfo | None = None
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> LockInfo:
        """Take the lock (see the class docstring); returns what it wrote."""
        self.output.mkdir(parents=True, exist_ok=True)
        for _ in range(_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _parse(_read(fd))
                os.close(fd)
                raise LockError(self._busy(held, "is locked")) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and removed (or replaced) between open and flock: again
        else:
            raise LockError(f"{self._where()} lock could not be taken in {_RETRIES} tries; retry")
        try:
            self._check_previous(_parse(_read(fd)))
        except LockError:
            os.close(fd)
            raise
        info = LockInfo(
            pid=os.getpid(),
            host=socket.gethostname(),
            job=self.job,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            pid_start=_pid_start(os.getpid()),
            command=" ".join(sys.argv)[:300],
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(info)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return info

    def _check_previous(self, old: LockInfo | None) -> None:
        """A lock file left behind by a run that did not release it: take over or refuse."""
        if old is None:
            return
        if old.host != socket.gethostname():
            raise LockError(
                self._busy(old, "was locked")
                + f" (another host: cannot check it); if that run is gone, delete {str(self.path)!r}"
            )
        if pid_alive(old.pid, old.pid_start):
            raise LockError(self._busy(old, "is locked"))
        self.took_over = old
        self.echo(
            f"taking over the stale lock of {str(self.output)!r}: {old.describe()} is gone "
            "(it did not finish; this run resumes what it left)"
        )

    def release(self) -> None:
        """Remove the lock file and drop the ``flock`` (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _where(self) -> str:
        return f"output {str(self.output)!r}"

    def _busy(self, held: LockInfo | None, verb: str) -> str:
        who = held.describe() if held else "another run (no owner recorded)"
        return (
            f"{self._where()} {verb} by {who}; only one run may write an output at a time: "
            f"wait for it to finish or choose another output"
        )


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode(errors="replace")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


LEASE_ENV = "CROSSMODAL_LOCK_LEASE_S"
LEASE_S = 60.0
"""How long an object-storage lock stays valid without a heartbeat (docs/reliability.md)."""


def lease_seconds(environ: dict[str, str] | None = None) -> float:
    """The lease: :data:`LEASE_S`, or ``$CROSSMODAL_LOCK_LEASE_S`` (tests use a short one)."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    return float(environ.get(LEASE_ENV) or LEASE_S)


def output_lock(output: Any, job: str, echo: Callable[[str], None] = print) -> Any:
    """The lock of ``output``: :class:`OutputLock` (``flock``) for a local path,
    :class:`ObjectLock` (conditional create and a lease) for an ``s3://`` or ``gs://`` URL."""
    from crossmodal.store.location import is_url

    return ObjectLock(output, job, echo) if is_url(output) else OutputLock(output, job, echo)


class _Conflict(Exception):
    """The service refused a conditional write: the object exists, changed, or is gone."""


@dataclass(frozen=True)
class _Found:
    """The lock object as read: its text, version and age on the service's own clock."""

    text: str
    version: str
    age_s: float


class _S3LockObject:
    """The lock object on S3: versions are ETags, "only if absent" is ``If-None-Match: *``."""

    def __init__(self, path: str) -> None:
        from crossmodal.store.location import s3_client, split

        self.client = s3_client(path)
        self.bucket, self.key = split(path)

    def _put(self, body: bytes, **condition: str) -> str:
        from crossmodal.store.location import error_code

        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except self.client.exceptions.ClientError as err:
            conflicts = ("PreconditionFailed", "ConditionalRequestConflict", "404", "NoSuchKey")
            if error_code(err) in conflicts:
                raise _Conflict from None
            raise
        return out["ETag"]

    def create(self, body: bytes) -> str:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, IfMatch=version)

    def read(self) -> _Found | None:
        from crossmodal.store.location import error_code

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.ClientError as err:
            if error_code(err) in ("404", "NoSuchKey"):
                return None
            raise
        age = (_server_time(got) - got["LastModified"]).total_seconds()
        return _Found(got["Body"].read().decode(errors="replace"), got["ETag"], age)

    def version(self) -> str | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key)["ETag"]
        except self.client.exceptions.ClientError:
            return None

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _GcsLockObject:
    """The lock object on GCS: versions are generations, "only if absent" is
    ``ifGenerationMatch=0`` (crossmodal/store/gcs.py)."""

    def __init__(self, path: str) -> None:
        from crossmodal.store.location import gcs_client, split

        self.client = gcs_client(path)
        self.key = split(path)[1]

    def _put(self, body: bytes, generation: str) -> str:
        from crossmodal.store.gcs import GcsError

        try:
            return self.client.put(self.key, body, if_generation=generation)
        except GcsError as err:
            if err.status in (404, 409, 412):
                raise _Conflict from None
            raise

    def create(self, body: bytes) -> str:
        return self._put(body, "0")

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, version)

    def read(self) -> _Found | None:
        from crossmodal.store.gcs import GcsError

        stat = self.client.stat(self.key)
        if stat is None:
            return None
        try:
            text = self.client.read(self.key, stat.generation).decode(errors="replace")
        except GcsError as err:  # rewritten or deleted between the two requests
            if err.status in (404, 412):
                return self.read()
            raise
        return _Found(text, stat.generation, (stat.server_now - stat.updated).total_seconds())

    def version(self) -> str | None:
        stat = self.client.stat(self.key)
        return stat.generation if stat else None

    def delete(self) -> None:
        self.client.delete(self.key)


class ObjectLock:
    """Exclusive lock of an output on object storage for one run; a context manager.

    ``<output>/crossmodal.lock`` is created only if absent (S3: ``If-None-Match: *``; GCS:
    ``ifGenerationMatch=0``: the service refuses the create when the object exists,
    atomically), holding the :class:`LockInfo` JSON and the lease. A heartbeat thread
    rewrites it every lease/4, only if it is still the version this run wrote (S3:
    ``If-Match`` on its ETag; GCS: ``ifGenerationMatch`` on its generation). When the create
    is refused, the existing lock is read: last written (the service's own last-modified
    time, compared with the service's ``Date``: no client clock involved) less than a lease
    ago -> the holder is alive -> :class:`LockError` with the local lock's line; older -> the
    holder died -> taken over with a write conditional on the stale version (of two runs
    taking over at once, one wins) and a one-line message. Released by deleting the object.
    """

    def __init__(self, output: Any, job: str, echo: Callable[[str], None] = print) -> None:
        from crossmodal.store.location import scheme

        self.output = str(output).rstrip("/")
        self.path = f"{self.output}/{LOCK_NAME}"
        self.job, self.echo = job, echo
        self.lease = lease_seconds()
        gcs = scheme(self.output) == "gs"
        self.object = _GcsLockObject(self.path) if gcs else _S3LockObject(self.path)
        self.took_over: LockInfo | None = None
        self.lost = False
        self._version: str | None = None
        self._stop: Any = None
        self._thread: Any = None

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        self.release()

    def _body(self) -> bytes:
        info = LockInfo(
            pid=os.getpid(),
            host=socket.gethostname(),
            job=self.job,
            started=self._started,
            pid_start=_pid_start(os.getpid()),
            command=" ".join(sys.argv)[:300],
        )
        return json.dumps({**asdict(info), "lease_s": self.lease}).encode()

    def acquire(self) -> None:
        """Take the lock (see the class docstring), then start the heartbeat."""
        self._started = datetime.now(UTC).isoformat(timespec="seconds")
        for _ in range(_RETRIES):
            try:
                self._version = self.object.create(self._body())
                break
            except _Conflict:
                pass
            if self._take_over_stale():
                break
        else:
            raise LockError(
                f"output {self.output!r} lock could not be taken in {_RETRIES} tries; retry"
            )
        self._start_heartbeat()

    def _take_over_stale(self) -> bool:
        """The lock exists: refuse a live holder, take over a stale one (True), or False when
        it vanished meanwhile (create again)."""
        found = self.object.read()
        if found is None:
            return False
        held, lease = _parse(found.text), _lease_of(found.text, self.lease)
        if found.age_s < lease + 1:  # HTTP dates count whole seconds: one second of margin
            raise LockError(_busy_line(self.output, held, "is locked"))
        try:
            self._version = self.object.replace(self._body(), found.version)
        except _Conflict:
            return False  # another run took it over first: try again (it will be live)
        self.took_over = held
        who = held.describe() if held else "a run (no owner recorded)"
        self.echo(
            f"taking over the stale lock of {self.output!r}: {who} sent no heartbeat for "
            f"{found.age_s:.0f} s (lease {lease:.0f} s; it did not finish; this run resumes "
            "what it left)"
        )
        return True

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="crossmodal-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renew the lease every lease/4, only if the lock is still this run's version; a
        refused renewal means another run took the lock over (this one was presumed dead):
        say so once and stop renewing."""
        while not self._stop.wait(self.lease / 4):
            try:
                self._version = self.object.replace(self._body(), str(self._version))
            except _Conflict:
                self.lost = True
                self.echo(
                    f"lost the lock of {self.output!r}: another run took it over (this one "
                    f"sent no heartbeat for over {self.lease:.0f} s); stop this run"
                )
                return
            except Exception:  # noqa: BLE001 - a transient network error: the next beat retries
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still ours (idempotent)."""
        if self._version is None:
            return
        self._stop.set()
        self._thread.join()
        version, self._version = self._version, None
        if not self.lost and self.object.version() == version:
            self.object.delete()

    @property
    def held(self) -> bool:
        return self._version is not None


def _busy_line(output: str, held: LockInfo | None, verb: str) -> str:
    """The refusal line of a live holder: the same words as :meth:`OutputLock._busy`."""
    who = held.describe() if held else "another run (no owner recorded)"
    return (
        f"output {output!r} {verb} by {who}; only one run may write an output at a time: "
        "wait for it to finish or choose another output"
    )


def _lease_of(text: str, default: float) -> float:
    try:
        return float(json.loads(text).get("lease_s", default))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return default


def _server_time(response: dict[str, Any]) -> datetime:
    """The service's clock from the response's ``Date`` header (else this host's)."""
    from email.utils import parsedate_to_datetime

    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(date) if date else datetime.now(UTC)
