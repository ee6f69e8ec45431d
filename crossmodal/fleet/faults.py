"""Fault injection through one environment switch, to prove that recovery loses nothing.

``CROSSMODAL_FAULT`` holds one or more faults separated by ``;``, each
``<role>:<trigger>=<n>[,mode=exit|sigkill]``::

    CROSSMODAL_FAULT="collector:after_batches=2"       # a collect actor dies after 2 batches
    CROSSMODAL_FAULT="steer_worker:after_batches=1"    # a steering actor dies after 1 batch
    CROSSMODAL_FAULT="driver:after_units=3"            # the collect / steer driver dies after
                                                       # 3 completed work units (steer: tasks)
    CROSSMODAL_FAULT="driver:after_units=3,mode=sigkill;collector:after_batches=2"
    CROSSMODAL_FAULT="driver:at=collect.merge.written"  # the driver dies at a write boundary
    CROSSMODAL_FAULT="driver:at=collect.part.marked,n=2"  # ... the 2nd time it gets there

``at=<boundary>`` names a write boundary: a place between two writes where a stage calls
:meth:`FaultPoint.reached` (each stage lists its boundaries in a ``BOUNDARIES`` tuple), so a
test can kill a process between every pair of writes, not only between work units.

``mode=exit`` (default) ends the process with ``os._exit(FAULT_EXIT_CODE)``: no ``finally``,
no atexit, like a crash; ``mode=sigkill`` sends itself SIGKILL, like the OOM killer.

Each fault fires ONCE: the process that fires it first creates a marker file (``O_EXCL``, so
of several actors only one dies), and a process that finds the marker carries on. A restarted
actor, a retried task and a re-run driver therefore do not die again. Markers live in
``$CROSSMODAL_FAULT_DIR`` if set, else in ``<output>.faults/`` beside the store or steering
output; delete that directory to arm the same fault again. Events are counted per process
(a restarted actor counts from 0). Ray actors get both variables through the drivers'
``runtime_env`` (:data:`ENV_VARS`); under ``ray job submit`` pass them with
``--runtime-env-json '{"env_vars": {"CROSSMODAL_FAULT": "..."}}'``.

One more switch makes a Ray node that does not share the driver's filesystem, on one
machine: start that node with ``CROSSMODAL_FAULT_NODE_ROOT=DIR`` in its environment
(``CROSSMODAL_FAULT_NODE_ROOT=/tmp/elsewhere ray start --address=...``) and its processes
look up the shared-output check's file under ``DIR`` instead of ``/``
(:func:`node_view`, :mod:`crossmodal.fleet.shared`). It is never forwarded to actors: it
must hold on one node only.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "CROSSMODAL_FAULT"
DIR_ENV = "CROSSMODAL_FAULT_DIR"
ENV_VARS = (ENV, DIR_ENV)
FAULT_EXIT_CODE = 86
TRIGGERS = {"collector": "after_batches", "steer_worker": "after_batches", "driver": "after_units"}
MODES = ("exit", "sigkill")


@dataclass(frozen=True)
class Fault:
    """Kill the process of ``role`` when its ``trigger`` count reaches ``n``."""

    role: str
    trigger: str
    n: int
    mode: str = "exit"
    boundary: str | None = None
    """For ``trigger == "at"``: the write boundary; ``n`` counts its occurrences."""

    @property
    def spec(self) -> str:
        if self.boundary is not None:
            return f"{self.role}:at={self.boundary},n={self.n},mode={self.mode}"
        return f"{self.role}:{self.trigger}={self.n},mode={self.mode}"


def _bad(field: str, allowed: object, value: object, spec: str) -> ValueError:
    return ValueError(
        f"{ENV} {field} must be one of {allowed}, got {value!r} in {spec!r}; "
        f"write e.g. {ENV}='collector:after_batches=2'"
    )


def parse(text: str) -> tuple[Fault, ...]:
    """The faults of a ``CROSSMODAL_FAULT`` value (empty: none).

    Raises:
        ValueError: an unknown role, trigger or mode, or a count that is not an int >= 1.
    """
    faults = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        role, sep, rest = spec.partition(":")
        role = role.strip()
        if role not in TRIGGERS or not sep:
            raise _bad("role", sorted(TRIGGERS), role, spec)
        options = dict(item.partition("=")[::2] for item in rest.split(","))
        faults.append(_fault(role, {k.strip(): v.strip() for k, v in options.items()}, spec))
    roles = [f.role for f in faults]
    if len(set(roles)) != len(roles):
        raise _bad("roles", "[each role at most once]", roles, text)
    return tuple(faults)


def _fault(role: str, options: dict[str, str], spec: str) -> Fault:
    """One fault from its parsed ``key=value`` options (see :func:`parse`)."""
    trigger = "at" if "at" in options else TRIGGERS[role]
    allowed = ["at", "n", "mode"] if trigger == "at" else [trigger, "mode"]
    if set(options) - set(allowed) or trigger not in options:
        raise _bad(f"options of {role}", allowed, sorted(options), spec)
    count = options.get("n", "1") if trigger == "at" else options[trigger]
    if not count.isdigit() or int(count) < 1:
        raise _bad("n" if trigger == "at" else trigger, "[an integer >= 1]", count, spec)
    mode = options.get("mode", "exit")
    if mode not in MODES:
        raise _bad("mode", list(MODES), mode, spec)
    boundary = options.get("at")
    if boundary is not None and not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", boundary):
        raise _bad("at", "[a dotted boundary name, e.g. collect.merge.written]", boundary, spec)
    return Fault(role, trigger, int(count), mode, boundary)


def env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The fault variables that are set, for a Ray ``runtime_env`` (actors must see them)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in ENV_VARS if k in environ}


def _kill(mode: str) -> None:  # pragma: no cover - ends the process
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(FAULT_EXIT_CODE)


class FaultPoint:
    """Counts one role's events in this process; kills the process at the armed count, once.

    Args:
        role: ``collector``, ``steer_worker`` or ``driver``.
        output: the store or steering output the process writes (markers go beside it).
        environ: the environment to read (default ``os.environ``).
        kill: what firing does, given the mode (default: end the process; tests record).

    Raises:
        ValueError: ``CROSSMODAL_FAULT`` does not parse (see :func:`parse`).
    """

    def __init__(
        self,
        role: str,
        output: str | Path,
        *,
        environ: Mapping[str, str] | None = None,
        kill: Callable[[str], None] | None = None,
    ) -> None:
        if role not in TRIGGERS:
            raise ValueError(f"role must be one of {sorted(TRIGGERS)}, got {role!r}")
        environ = os.environ if environ is None else environ
        armed = [f for f in parse(environ.get(ENV, "")) if f.role == role]
        self.fault = armed[0] if armed else None
        self.count = 0
        self.marker_dir = Path(environ.get(DIR_ENV) or _beside(output))
        self._kill = kill or _kill

    @property
    def marker(self) -> Path | None:
        """The file whose existence means this fault already fired."""
        if self.fault is None:
            return None
        digest = hashlib.sha256(self.fault.spec.encode()).hexdigest()[:8]
        return self.marker_dir / f"{self.fault.role}-{digest}.fired"

    def tick(self, n: int = 1) -> bool:
        """Count ``n`` events; fire if the count reached the armed one and no one fired yet.

        Returns:
            whether it fired (only seen when ``kill`` returns, i.e. in tests).
        """
        if self.fault is None or self.fault.boundary is not None:
            return False
        return self._count(n)

    def reached(self, boundary: str) -> bool:
        """Count one arrival at write boundary ``boundary``; fire at the armed occurrence.

        Returns:
            whether it fired (only seen when ``kill`` returns, i.e. in tests).
        """
        if self.fault is None or self.fault.boundary != boundary:
            return False
        return self._count(1)

    def _count(self, n: int) -> bool:
        self.count += n
        marker = self.marker
        if marker is None or self.count < self.fault.n or not _claim(marker, self.fault):
            return False
        print(
            f"crossmodal fault injection: {self.fault.mode} {self.fault.role} pid {os.getpid()} "
            f"after {self.count} {self._events()} ({ENV})",
            file=sys.stderr,
            flush=True,
        )
        self._kill(self.fault.mode)
        return True

    def _events(self) -> str:
        fault = self.fault
        if fault is not None and fault.boundary is not None:
            return f"arrivals at {fault.boundary}"
        return fault.trigger.removeprefix("after_") if fault is not None else ""


def _claim(marker: Path, fault: Fault) -> bool:
    """Create ``marker``; False if another process (or an earlier attempt) already did."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {time.time():.3f} {fault.spec}\n")
    return True


NODE_ROOT_ENV = "CROSSMODAL_FAULT_NODE_ROOT"
"""Set in one Ray node's environment: that node sees the filesystem rooted at this directory
(for the shared-output check only; see the module docstring). Not in :data:`ENV_VARS`."""


def node_view(path: str | Path, environ: Mapping[str, str] | None = None) -> Path:
    """``path`` as this node sees it: under ``$CROSSMODAL_FAULT_NODE_ROOT`` when that is set
    (a node without the driver's volume), else unchanged."""
    environ = os.environ if environ is None else environ
    root, p = environ.get(NODE_ROOT_ENV), Path(path)
    return Path(root, *p.parts[1:]) if root and p.is_absolute() else p


def _beside(output: Any) -> Path:
    """``<output>.faults`` beside a local output; for a URL (``s3://b/x``), a local folder
    named after it in the temporary directory (markers are plain files on this host)."""
    text = str(output)
    if "://" in text:
        import tempfile

        name = text.replace("://", "_").replace("/", "_")
        return Path(tempfile.gettempdir(), "crossmodal-faults", name + ".faults")
    out = Path(output)
    return out.with_name(out.name + ".faults")
