"""Actor pools: replicas of a callable class, each running one job at a time.

A stage's workers are callable classes (load once in ``__init__``, one job per call), so
they run without Ray in tests; :class:`ActorFleet` wraps them in Ray actors with the stage's
resources and restart policy, hands out jobs as actors free up, yields results in completion
order, and kills its actors on exit. Actors are spread over the cluster's nodes (Ray's
``SPREAD`` strategy), so losing a node loses few of them; Ray restarts those elsewhere. Resume is the caller's: it passes only pending jobs and
records each result before asking for the next (the driver fault point ticks after that).

The fleet knows which job each actor runs, so a failure names it: a job whose actor died
more often than the restart policy allows ends the run with one
:class:`~crossmodal.errors.FleetError` line (the job, how often it was tried, the last cause
Ray gave), an error the job raised carries the job's name, and a job that Ray retried on a
restarted actor is reported in one line when it finishes.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any, Protocol

from tqdm import tqdm

from crossmodal.errors import RESUME, FleetError, note_job, one_line, ray_cause
from crossmodal.fleet.faults import FaultPoint


class ActorSpec(Protocol):
    """The ``actors`` section of a stage config."""

    count: int
    num_gpus: float
    num_cpus: float
    max_restarts: int
    max_task_retries: int


def describe_job(job: Any) -> str:
    """A job's name in one line: its ``describe()`` (work units, pilots, steering cells),
    for a tuple or list of jobs the first three names, else its ``repr``."""
    describe = getattr(job, "describe", None)
    if callable(describe):
        return one_line(describe(), 200)
    if isinstance(job, list | tuple) and job and not hasattr(job, "_fields"):
        names = [describe_job(j) for j in job]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return " + ".join(names[:3]) + more
    return one_line(repr(job), 200)


UNREACHABLE_S = 120
"""How long a job waits for Ray to restart the actor of a lost node before it fails."""


class _Unreachable(Exception):
    """Ray could not reach a job's actor (``ActorUnavailableError``: its node is lost or
    restarting); the job is submitted again (:meth:`ActorFleet._again`)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _warn(line: str) -> None:
    """A line on stderr that leaves the progress bars intact."""
    tqdm.write(line, file=sys.stderr)


class _Replica:
    """The actor around one ``cls(*args)``: each call returns ``(restarted, result)``, where
    ``restarted`` is true for the first call after Ray restarted the actor (Ray's public
    ``was_current_actor_reconstructed``), i.e. a job Ray retried on the new process."""

    def __init__(self, cls: type, args: Sequence[Any]) -> None:
        self._worker = cls(*args)
        self._first = True

    def __call__(self, job: Any) -> tuple[bool, Any]:
        import ray

        first, self._first = self._first, False
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = first and ray.get_runtime_context().was_current_actor_reconstructed
        return restarted, self._worker(job)


class ActorFleet:
    """``count`` (default ``spec.count``) Ray actors of ``cls(*args)``.

    Args:
        ray: the connected ``ray`` module (:meth:`RaySession.connect`).
        cls: a callable class; ``cls(*args)(job)`` runs one job.
        spec: resources and restart policy per actor.
        echo: where a restarted actor's line goes (default: stderr, above the bars).
    """

    def __init__(
        self,
        ray: ModuleType,
        cls: type,
        args: Sequence[Any],
        spec: ActorSpec,
        *,
        count: int | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        replica = type(cls.__name__, (_Replica,), {"__qualname__": cls.__qualname__})
        remote = ray.remote(
            num_gpus=spec.num_gpus,
            num_cpus=spec.num_cpus,
            max_restarts=spec.max_restarts,
            max_task_retries=spec.max_task_retries,
            scheduling_strategy="SPREAD",  # over nodes: a lost node takes few actors with it
        )(replica)
        self._ray, self.spec, self.name = ray, spec, cls.__name__
        self.echo = echo or _warn
        self.actors = [
            remote.remote(cls, args) for _ in range(spec.count if count is None else count)
        ]
        self.restarts = [0] * len(self.actors)
        """Restarts seen per actor (a job that finished on a restarted actor)."""
        self._unreachable = [0] * len(self.actors)
        """Seconds each actor's current job has waited for its lost node (:meth:`_again`)."""

    def map(self, jobs: Iterable[Any], *, fault: FaultPoint | None = None) -> Iterator[Any]:
        """Each job's result, in completion order; ``fault`` ticks once per result, after the
        caller has handled it (when the next one is asked for).

        Raises:
            FleetError: a job's actor died more often than the restart policy allows, or
                the actors could not start.
            Exception: what a job raised (Ray's ``RayTaskError(<cause>)``), with the job
                recorded on it (:func:`crossmodal.errors.note_job`).
        """
        queue, idle = deque(jobs), deque(range(len(self.actors)))
        running: dict[Any, tuple[int, Any]] = {}

        def hand_out() -> None:  # every free actor gets the next job at once
            while queue and idle:
                i, job = idle.popleft(), queue.popleft()
                running[self.actors[i].__call__.remote(job)] = (i, job)

        hand_out()
        while running:
            [ref], _ = self._ray.wait(list(running), num_returns=1)
            i, job = running.pop(ref)
            try:
                result = self._result(ref, i, job)
            except _Unreachable as gone:  # its node is lost: the same job again, same actor
                running[self._again(gone, i, job)] = (i, job)
                continue
            self._unreachable[i] = 0
            idle.append(i)
            hand_out()  # before the caller handles the result: the actor stays busy
            yield result
            if fault is not None:
                fault.tick()

    def _result(self, ref: Any, i: int, job: Any) -> Any:
        """The result of ``job`` on actor ``i``; a failure as described in :meth:`map`."""
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        try:
            restarted, result = self._ray.get(ref)
        except ActorUnavailableError as err:
            raise _Unreachable(err) from err
        except RayActorError as err:
            raise self._died(err, i, job) from err
        except RayTaskError as err:
            note_job(err, describe_job(job))
            raise
        if restarted:
            self.restarts[i] += 1
            self.echo(self._restart_line(i, job))
        return result

    def _again(self, gone: _Unreachable, i: int, job: Any) -> Any:
        """Submit ``job`` to actor ``i`` again after its node became unreachable.

        Until Ray's health check declares the node dead (seconds), calls to the actor fail
        at once as "unavailable" (Ray spends ``max_task_retries`` on them); after that Ray
        restarts the actor on another node and a call waits for it. So the job is resubmitted
        once a second; a job whose actor stays unreachable for :data:`UNREACHABLE_S` fails
        like a dead actor. Jobs are idempotent (each rewrites only what it owns).
        """
        self._unreachable[i] += 1
        if self._unreachable[i] > UNREACHABLE_S:
            raise self._died(gone.cause, i, job) from gone.cause
        time.sleep(1.0)
        return self.actors[i].__call__.remote(job)

    def _attempts(self, i: int) -> int:
        """How often a job that killed actor ``i`` ran: once, plus Ray's retries, each on a
        restart (bounded by the restarts this actor had left)."""
        spec = self.spec
        left = spec.max_restarts - self.restarts[i] if spec.max_restarts >= 0 else math.inf
        retries = spec.max_task_retries if spec.max_task_retries >= 0 else math.inf
        return int(1 + max(0, min(left, retries)))

    def _policy(self) -> str:
        spec = self.spec
        return f"actors.max_restarts={spec.max_restarts}, actors.max_task_retries={spec.max_task_retries}"

    def _died(self, err: BaseException, i: int, job: Any) -> FleetError:
        """The one-line error of a job whose actor died for good."""
        name, cause = describe_job(job), ray_cause(err)
        if getattr(err, "actor_init_failed", False):
            line = (
                f"the {self.name} actors could not start ({name} was waiting): {cause}; "
                f"fix that, then {RESUME}"
            )
            return FleetError(line, job=name, attempts=0, cause=cause)
        attempts = self._attempts(i)
        line = (
            f"{name} failed {attempts} time(s): its {self.name} actor died each time "
            f"({self._policy()}); last cause: {cause}; if that is memory, lower batch_size "
            f"or actors.count, else raise actors.max_restarts/max_task_retries; {RESUME}"
        )
        return FleetError(line, job=name, attempts=attempts, cause=cause)

    def _restart_line(self, i: int, job: Any) -> str:
        return (
            f"warning: {describe_job(job)} ran again on a restarted {self.name} actor and "
            f"finished (restart {self.restarts[i]} of actors.max_restarts="
            f"{self.spec.max_restarts}); Ray gives the driver no cause for a restart (the "
            "actor table keeps none): see Ray's '(raylet)' lines, e.g. an OOM kill"
        )

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []

    def __enter__(self) -> ActorFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, *, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """The progress bar every stage shows (off with ``--no-progress``)."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True
    )
