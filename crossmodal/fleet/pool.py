"""Actor pools: replicas of a callable class, each running one job at a time.

A stage's workers are callable classes (load once in ``__init__``, one job per call), so
they run without Ray in tests; :class:`ActorFleet` wraps them in Ray actors with the stage's
resources and restart policy, hands out jobs as actors free up, yields results in completion
order, and kills its actors on exit. Resume is the caller's: it passes only pending jobs and
records each result before asking for the next (the driver fault point ticks after that).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any, Protocol

from tqdm import tqdm

from crossmodal.fleet.faults import FaultPoint


class ActorSpec(Protocol):
    """The ``actors`` section of a stage config."""

    count: int
    num_gpus: float
    num_cpus: float
    max_restarts: int
    max_task_retries: int


class ActorFleet:
    """``count`` (default ``spec.count``) Ray actors of ``cls(*args)``.

    Args:
        ray: the connected ``ray`` module (:meth:`RaySession.connect`).
        cls: a callable class; ``cls(*args)(job)`` runs one job.
        spec: resources and restart policy per actor.
    """

    def __init__(
        self,
        ray: ModuleType,
        cls: type,
        args: Sequence[Any],
        spec: ActorSpec,
        *,
        count: int | None = None,
    ) -> None:
        remote = ray.remote(
            num_gpus=spec.num_gpus,
            num_cpus=spec.num_cpus,
            max_restarts=spec.max_restarts,
            max_task_retries=spec.max_task_retries,
        )(cls)
        self._ray = ray
        self.actors = [remote.remote(*args) for _ in range(spec.count if count is None else count)]

    def map(self, jobs: Iterable[Any], *, fault: FaultPoint | None = None) -> Iterator[Any]:
        """Each job's result, in completion order; ``fault`` ticks once per result, after the
        caller has handled it (when the next one is asked for)."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        for result in pool.map_unordered(lambda actor, job: actor.__call__.remote(job), list(jobs)):
            yield result
            if fault is not None:
                fault.tick()

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
