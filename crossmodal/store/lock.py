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
    :class:`ObjectLock` (conditional create and a lease) for an ``s3://`` URL."""
    from crossmodal.store.location import is_url

    return ObjectLock(output, job, echo) if is_url(output) else OutputLock(output, job, echo)


class ObjectLock:
    """Exclusive lock of an output on object storage for one run; a context manager.

    ``<output>/crossmodal.lock`` is created with ``If-None-Match: *`` (the service refuses
    the create when the object exists, atomically), holding the :class:`LockInfo` JSON and the
    lease. A heartbeat thread rewrites it every lease/4 with ``If-Match`` on its ETag. When
    the create is refused, the existing lock is read: last written (the service's own
    ``Last-Modified``, compared with the service's ``Date``: no client clock involved) less
    than a lease ago -> the holder is alive -> :class:`LockError` with the local lock's line;
    older -> the holder died -> taken over with ``If-Match`` on the stale ETag (of two runs
    taking over at once, one wins) and a one-line message. Released by deleting the object.
    """

    def __init__(self, output: Any, job: str, echo: Callable[[str], None] = print) -> None:
        from crossmodal.store.location import s3_client, split

        self.output = str(output).rstrip("/")
        self.path = f"{self.output}/{LOCK_NAME}"
        self.bucket, self.key = split(self.path)
        self.job, self.echo = job, echo
        self.lease = lease_seconds()
        self.client = s3_client(self.output)
        self.took_over: LockInfo | None = None
        self.lost = False
        self._etag: str | None = None
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

    def _put(self, **condition: str) -> str:
        out = self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=self._body(), **condition
        )
        return out["ETag"]

    def acquire(self) -> None:
        """Take the lock (see the class docstring), then start the heartbeat."""
        from crossmodal.store.location import error_code

        self._started = datetime.now(UTC).isoformat(timespec="seconds")
        for _ in range(_RETRIES):
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except self.client.exceptions.ClientError as err:
                if error_code(err) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
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
        from crossmodal.store.location import error_code

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.ClientError as err:
            if error_code(err) in ("404", "NoSuchKey"):
                return False
            raise
        text = got["Body"].read().decode(errors="replace")
        held, lease = _parse(text), _lease_of(text, self.lease)
        server_now = _server_time(got)
        age = (server_now - got["LastModified"]).total_seconds()
        if age < lease + 1:  # HTTP dates count whole seconds: one second of margin
            raise LockError(_busy_line(self.output, held, "is locked"))
        try:
            self._etag = self._put(IfMatch=got["ETag"])
        except self.client.exceptions.ClientError as err:
            if error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "404"):
                return False  # another run took it over first: try again (it will be live)
            raise
        self.took_over = held
        who = held.describe() if held else "a run (no owner recorded)"
        self.echo(
            f"taking over the stale lock of {self.output!r}: {who} sent no heartbeat for "
            f"{age:.0f} s (lease {lease:.0f} s; it did not finish; this run resumes what it left)"
        )
        return True

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="crossmodal-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renew the lease every lease/4 with ``If-Match``; a refused renewal means another run
        took the lock over (this one was presumed dead): say so once and stop renewing."""
        from crossmodal.store.location import error_code

        while not self._stop.wait(self.lease / 4):
            try:
                self._etag = self._put(IfMatch=self._etag or "*")
            except self.client.exceptions.ClientError as err:
                if error_code(err) in ("PreconditionFailed", "404", "NoSuchKey"):
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
        if self._etag is None:
            return
        self._stop.set()
        self._thread.join()
        etag, self._etag = self._etag, None
        if self.lost:
            return
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.ClientError:
            return
        if head["ETag"] == etag:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)

    @property
    def held(self) -> bool:
        return self._etag is not None


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
