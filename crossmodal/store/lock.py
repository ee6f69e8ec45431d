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
