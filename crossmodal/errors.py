"""Expected failures and the one line each becomes: what failed, what is allowed, the fix.

A user meets a small set of failures: a bad config, store or data (the ``ValueError`` family
every stage raises: ``ConfigError``, ``StoreError``, ``DataError``, ``LockError``,
``SteeringError``, ...), a full disk, a read-only output, and a work unit whose actor died
more often than ``actors.max_restarts`` / ``actors.max_task_retries`` allow
(:class:`FleetError`). :func:`explain` turns each into ONE line with exit status 2, looking
through Ray's wrappers (an error raised in an actor arrives as ``RayTaskError(<cause>)``,
whose text is the whole remote traceback). Anything else is unexpected: one line naming its
type, exit status 1, and the traceback behind ``--debug`` / ``CROSSMODAL_DEBUG=1``. The CLI
calls :func:`explain` in one place (``crossmodal.cli.Command``); docs/reliability.md lists
the failures and their tests.
"""

from __future__ import annotations

import errno
import getpass
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEBUG_ENV = "CROSSMODAL_DEBUG"
EXPECTED_EXIT = 2
UNEXPECTED_EXIT = 1
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
RESUME = "re-run the same command: finished work units are kept and not redone"


class FleetError(RuntimeError):
    """A job failed for good on a Ray actor: its actor died more often than the restart
    policy allows, or the actors could not start. The message is one line: the job, how
    often it was tried, the last cause Ray gave, and the fix."""

    def __init__(self, line: str, *, job: str = "", attempts: int = 0, cause: str = "") -> None:
        super().__init__(line)
        self.job, self.attempts, self.cause = job, attempts, cause


@dataclass(frozen=True)
class Failure:
    """The line a failure prints (without the ``error: `` prefix) and the exit status."""

    line: str
    code: int
    expected: bool


def one_line(text: object, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def note_job(err: BaseException, job: str) -> None:
    """Record on ``err`` which job raised it (shown in its line and in a ``--debug``
    traceback)."""
    err.crossmodal_job = job  # type: ignore[attr-defined]
    err.add_note(f"while running {job}")


@contextmanager
def disk_need(need_bytes: int, what: str) -> Iterator[None]:
    """Attach how many bytes the work inside needs to a disk-full error raised there, so
    its line says how much to free (``what`` names the estimate, e.g. "the plan's
    compressed estimate")."""
    try:
        yield
    except OSError as err:
        if _errno(err) in DISK_FULL:
            err.crossmodal_need = (int(need_bytes), what)  # type: ignore[attr-defined]
        raise


def _ray_errors() -> tuple[type, type, tuple[type, ...]]:
    """Ray's task-error and actor-error classes, and the other system failures; empty
    stand-ins when Ray was never imported (then none of its errors can exist)."""
    if "ray" not in sys.modules:
        return _Never, _Never, ()
    from ray import exceptions as rx

    system = (rx.WorkerCrashedError, rx.OutOfMemoryError, rx.NodeDiedError, rx.ObjectLostError)
    return rx.RayTaskError, rx.RayActorError, system


class _Never(Exception):
    """Matches nothing: the Ray classes before Ray is imported."""


def root_cause(err: BaseException) -> BaseException:
    """``err`` without Ray's ``RayTaskError`` wrappers (the exception the actor or task
    raised), keeping the job :func:`note_job` recorded on a wrapper."""
    task_error, _, _ = _ray_errors()
    job = getattr(err, "crossmodal_job", None)
    while isinstance(err, task_error) and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    if job and not getattr(err, "crossmodal_job", None):
        err.crossmodal_job = job  # type: ignore[attr-defined]
    return err


def _errno(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if code is None and isinstance(getattr(err, "cause", None), OSError):
        code = err.cause.errno  # a RayTaskError(OSError) keeps errno on its cause
    return code


def explain(err: BaseException) -> Failure:
    """The one line and exit status of any failure (see the module docstring)."""
    _, actor_error, system = _ray_errors()
    cause = root_cause(err)
    where = (
        f" (while running {cause.crossmodal_job})" if getattr(cause, "crossmodal_job", "") else ""
    )
    if isinstance(cause, FleetError):  # already one line, with the job
        return Failure(str(cause), EXPECTED_EXIT, True)
    if isinstance(cause, OSError) and _errno(cause) in DISK_FULL:
        return Failure(disk_full_line(cause, where), EXPECTED_EXIT, True)
    if isinstance(cause, OSError) and _errno(cause) in READ_ONLY:
        return Failure(read_only_line(cause, where), EXPECTED_EXIT, True)
    if isinstance(cause, ValueError):  # config, store, data, lock, steering, model errors
        text = str(cause).strip() or type(cause).__name__
        return Failure(text + where, EXPECTED_EXIT, True)
    if isinstance(cause, actor_error):
        return Failure(actor_line(cause, where), EXPECTED_EXIT, True)
    if isinstance(cause, system):
        line = f"Ray failed: {one_line(cause, 300)}{where}; {RESUME}"
        return Failure(line, EXPECTED_EXIT, True)
    line = (
        f"unexpected {type(cause).__name__}: {one_line(cause, 300)}{where} "
        f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
    )
    return Failure(line, UNEXPECTED_EXIT, False)


def _path(err: OSError) -> str:
    return str(err.filename) if err.filename is not None else "the output"


def disk_full_line(err: OSError, where: str = "") -> str:
    """No space left: the path, how much the run needs (if a stage said so), how much is
    free now, and that finished work is kept."""
    need = getattr(err, "crossmodal_need", None)
    parts = [f"disk full: no space left on device writing {_path(err)!r}{where}"]
    if need:
        parts.append(f"this run needs about {need[0] / 1e9:.2f} GB ({need[1]})")
    if err.filename is not None:
        existing = next((p for p in Path(err.filename).parents if p.exists()), None)
        if existing is not None:
            free = shutil.disk_usage(existing).free
            parts.append(f"{free / 1e9:.2f} GB free now on {str(existing)!r}")
    return "; ".join(parts) + f"; free space (or choose another output), then {RESUME}"


def read_only_line(err: OSError, where: str = "") -> str:
    """A read-only file system or missing permission: the path and the fix."""
    path = _path(err)
    if _errno(err) == errno.EROFS:
        what = f"read-only file system: cannot write {path!r}{where}"
        fix = "choose an output on a writable disk (the config's `output` or --output) or "
        fix += "remount it read-write"
    else:
        what = f"permission denied on {path!r} for user {getpass.getuser()!r}{where}"
        fix = "make it writable for this user (chmod/chown) or choose another output"
    return f"{what}; {fix}, then {RESUME}"


def actor_line(err: BaseException, where: str = "") -> str:
    """A Ray actor that died outside :class:`~crossmodal.fleet.pool.ActorFleet`."""
    return f"a Ray actor died{where}: {ray_cause(err)}; {RESUME}"


def ray_cause(err: BaseException) -> str:
    """The cause Ray gives for an actor's death, on one line: the last line of the error
    its constructor raised, or the worker's exit detail (without Ray's list of common
    causes)."""
    text = str(err)
    if getattr(err, "actor_init_failed", False):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return one_line(lines[-1] if lines else text, 300)
    body = [ln for ln in text.splitlines()[1:] if not ln.startswith("\t")] or [text]
    cause = one_line(" ".join(body), 1000).split(" Some common causes", 1)[0]
    return one_line(cause.removeprefix("The actor is dead because "), 300)
