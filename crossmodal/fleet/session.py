"""One Ray session per stage: the environment Ray and its actors need, connect, shut down.

Every stage (collect, reduce, steer) reaches Ray through :class:`RaySession`, so the
environment is written once: token auth and usage stats off (an in-process ``ray.init()``
otherwise turns token auth on and later ``ray job submit`` calls fail; docs/design.md,
"Ray"), and the variables actors must see (the Hugging Face offline switch, the fault
switches of :mod:`crossmodal.fleet.faults`, the progress-bar switch) forwarded through the
session's ``runtime_env``. An in-process Ray is started with a watcher
(:mod:`crossmodal.fleet.reaper`) that ends its processes if the driver is killed.

Inside a Ray job (``ray job submit``, a KubeRay ``RayJob``) the driver joins the job's
session and its actors inherit the job's ``runtime_env``; Ray refuses to merge a driver's
``env_vars`` that name a variable the job sets ("Failed to merge the Job's runtime env"), so
the session passes only the variables the job leaves unset, and the job's values win
(docs/platform.md, "Ray jobs").
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any

from crossmodal.fleet.faults import ENV_VARS as FAULT_VARS
from crossmodal.store.location import OPTIONS_ENV

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
"""What ``--no-progress`` sets: no Hugging Face / transformers bars (``Loading weights``)
and no other tqdm bar (tqdm reads ``TQDM_DISABLE`` as its default), in the driver and in
every actor; results are unchanged."""
FORWARDED = ("HF_HUB_OFFLINE", *QUIET, *FAULT_VARS, OPTIONS_ENV)
"""Variables of the driver's environment that actors get too, when they are set."""
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a job's driver: the job's runtime_env (and metadata)."""


def set_ray_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Ray's settings for this project (no auth, no usage stats) unless the caller set them.

    Ray reads them when it is imported and when it starts, so entry points call this first.
    """
    environ = os.environ if environ is None else environ
    for key, value in RAY_ENV.items():
        environ.setdefault(key, value)


def quiet_progress(environ: MutableMapping[str, str] | None = None) -> None:
    """``--no-progress``: set :data:`QUIET` here, so the driver and (forwarded by
    :func:`actor_env`) every actor draw no progress bars. The libraries read it when they
    are imported: one already imported here is switched off directly."""
    (os.environ if environ is None else environ).update(QUIET)
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def actor_env(environ: Mapping[str, str] | None = None, *, progress: bool = True) -> dict[str, str]:
    """The ``env_vars`` of the session's ``runtime_env``: :data:`RAY_ENV`, what is set of
    :data:`FORWARDED`, and :data:`QUIET` when ``progress`` is off."""
    environ = os.environ if environ is None else environ
    quiet = {} if progress else QUIET
    return {**RAY_ENV, **{k: environ[k] for k in FORWARDED if k in environ}, **quiet}


def job_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The ``env_vars`` of the Ray job this driver runs in, or None outside a job."""
    environ = os.environ if environ is None else environ
    if JOB_CONFIG_ENV not in environ:
        return None
    config = json.loads(environ[JOB_CONFIG_ENV] or "{}")
    return dict((config.get("runtime_env") or {}).get("env_vars") or {})


def session_runtime_env(
    environ: Mapping[str, str] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """The ``runtime_env`` :meth:`RaySession.connect` passes: :func:`actor_env`, less every
    variable a surrounding Ray job already sets (its actors inherit the job's values, and
    Ray refuses a driver ``env_vars`` that repeats one); ``{}`` when nothing is left."""
    wanted = actor_env(environ, progress=progress)
    job = job_env_vars(environ) or {}
    env_vars = {k: v for k, v in wanted.items() if k not in job}
    return {"env_vars": env_vars} if env_vars else {}


class RaySession:
    """Connects to Ray on first use and shuts down only what it started.

    ``address=None`` joins the cluster of a ``ray job submit`` (or a session already
    initialised in this process) and otherwise starts an in-process Ray; ``"auto"`` joins
    a running head. Connecting is lazy: a stage with nothing left to do never starts Ray.
    ``progress=False`` silences the actors' progress bars (:data:`QUIET`). ``output``: where
    the session's tasks and actors write; a local path every alive node must see, checked
    once on connecting (:mod:`crossmodal.fleet.shared`).

    Example::

        with RaySession(address) as session:
            ray = session.connect()
    """

    def __init__(
        self, address: str | None = None, *, progress: bool = True, output: Any = None
    ) -> None:
        self.address = address
        self.progress = progress
        self.output = output
        self._checked: set[str] = set()
        self.started = False
        self._ray: ModuleType | None = None
        self._reaper: Any = None  # a crossmodal.fleet.reaper.Reaper

    def connect(self) -> ModuleType:
        """The ``ray`` module, connected."""
        if self._ray is None:
            set_ray_env()
            import ray

            if not ray.is_initialized():
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    runtime_env=session_runtime_env(progress=self.progress) or None,
                )
                self.started = True
                if self.address is None and "RAY_ADDRESS" not in os.environ:
                    from crossmodal.fleet.reaper import Reaper

                    self._reaper = Reaper(str(Path(ray.__file__).parent))  # in-process Ray
            self._ray = ray
            if self.output is not None:
                self._check_shared(self.output)
        return self._ray

    def _check_shared(self, output: Any) -> None:
        """:func:`~crossmodal.fleet.shared.check_output_shared`, once per output."""
        from crossmodal.fleet.shared import check_output_shared

        if str(output) not in self._checked:
            check_output_shared(self._ray, output)
            self._checked.add(str(output))

    def close(self) -> None:
        if self.started and self._ray is not None:
            self._ray.shutdown()
        if self._reaper is not None:
            self._reaper.release()
        self.started, self._ray, self._reaper = False, None, None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def actors(
        self,
        cls: type,
        *args: Any,
        spec: Any,
        count: int | None = None,
        echo: Callable[[str], None] | None = None,
        output: Any = None,
    ) -> Any:
        """An :class:`~crossmodal.fleet.pool.ActorFleet` of ``cls(*args)`` replicas.

        ``output``: where the actors write; a local path must be seen by every node
        (checked first on a cluster of several, :mod:`crossmodal.fleet.shared`).
        """
        from crossmodal.fleet.pool import ActorFleet

        ray = self.connect()
        if output is not None:
            self._check_shared(output)
        return ActorFleet(ray, cls, args, spec, count=count, echo=echo)
