"""One Ray session per stage: the environment Ray and its actors need, connect, shut down.

Every stage (collect, reduce, steer) reaches Ray through :class:`RaySession`, so the
environment is written once: token auth and usage stats off (an in-process ``ray.init()``
otherwise turns token auth on and later ``ray job submit`` calls fail; docs/design.md,
"Ray"), and the variables actors must see (the Hugging Face offline switch, the fault
switches of :mod:`crossmodal.fleet.faults`) forwarded through the session's ``runtime_env``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import ModuleType
from typing import Any

from crossmodal.fleet.faults import ENV_VARS as FAULT_VARS

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
FORWARDED = ("HF_HUB_OFFLINE", *FAULT_VARS)
"""Variables of the driver's environment that actors get too, when they are set."""


def set_ray_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Ray's settings for this project (no auth, no usage stats) unless the caller set them.

    Ray reads them when it is imported and when it starts, so entry points call this first.
    """
    environ = os.environ if environ is None else environ
    for key, value in RAY_ENV.items():
        environ.setdefault(key, value)


def actor_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``env_vars`` of the session's ``runtime_env``: :data:`RAY_ENV` and what is set of
    :data:`FORWARDED`."""
    environ = os.environ if environ is None else environ
    return {**RAY_ENV, **{k: environ[k] for k in FORWARDED if k in environ}}


class RaySession:
    """Connects to Ray on first use and shuts down only what it started.

    ``address=None`` joins the cluster of a ``ray job submit`` (or a session already
    initialised in this process) and otherwise starts an in-process Ray; ``"auto"`` joins
    a running head. Connecting is lazy: a stage with nothing left to do never starts Ray.

    Example::

        with RaySession(address) as session:
            ray = session.connect()
    """

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.started = False
        self._ray: ModuleType | None = None

    def connect(self) -> ModuleType:
        """The ``ray`` module, connected."""
        if self._ray is None:
            set_ray_env()
            import ray

            if not ray.is_initialized():
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    runtime_env={"env_vars": actor_env()},
                )
                self.started = True
            self._ray = ray
        return self._ray

    def close(self) -> None:
        if self.started and self._ray is not None:
            self._ray.shutdown()
        self.started, self._ray = False, None

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def actors(self, cls: type, *args: Any, spec: Any, count: int | None = None) -> Any:
        """An :class:`~crossmodal.fleet.pool.ActorFleet` of ``cls(*args)`` replicas."""
        from crossmodal.fleet.pool import ActorFleet

        return ActorFleet(self.connect(), cls, args, spec, count=count)
