"""Where relative outputs go: the output root, and a refusal inside a Ray job's temporary copy.

A relative ``output`` (a collect store, a steering directory, a report) is resolved against
the output root: the config's ``output_root`` when set, else ``$CROSSMODAL_OUTPUT_ROOT``,
else the working directory. Under ``ray job submit --working-dir .`` (and a KubeRay
``RayJob``) the working directory is Ray's temporary copy of the job's files, deleted when
the cluster stops (docs/platform.md, "Ray jobs"), so an output resolved into it is refused
with the fix instead of being lost silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

OUTPUT_ROOT_ENV = "CROSSMODAL_OUTPUT_ROOT"
RAY_COPY_PARTS = ("runtime_resources", "working_dir_files")
"""Path components of Ray's per-job copy of ``--working-dir`` (``<temp>/session_*/...``)."""


class OutputRootError(ValueError):
    """A relative output would land in Ray's temporary copy of the job's working directory."""


def in_ray_job_copy(path: Path) -> bool:
    """Whether ``path`` lies inside Ray's temporary copy of a job's working directory."""
    parts = path.parts
    return any(parts[i : i + 2] == RAY_COPY_PARTS for i in range(len(parts) - 1))


def output_root(root: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The directory relative outputs resolve against: ``root``, else the environment's
    :data:`OUTPUT_ROOT_ENV`, else the working directory (made absolute)."""
    environ = os.environ if environ is None else environ
    chosen = root or environ.get(OUTPUT_ROOT_ENV) or os.getcwd()
    return Path(chosen).expanduser().absolute()


def resolve_output(
    path: str,
    root: str | None = None,
    *,
    field: str = "output",
    environ: Mapping[str, str] | None = None,
) -> str:
    """``path`` made absolute against :func:`output_root` (a URL such as ``s3://...`` or an
    absolute path is returned as it is).

    Raises:
        OutputRootError: the result lies in Ray's temporary copy of the job's working
            directory (one line naming ``field`` and the fix).
    """
    if "://" in path or Path(path).expanduser().is_absolute():
        return path
    resolved = output_root(root, environ) / path
    if in_ray_job_copy(resolved):
        raise OutputRootError(
            f"{field} must be one of [an absolute path, a path under {OUTPUT_ROOT_ENV} or "
            f"output_root], got {path!r}: relative to Ray's temporary copy of the job's "
            f"working directory ({resolved.parent}), deleted when the cluster stops; set "
            f"{OUTPUT_ROOT_ENV} in the job's --runtime-env-json env_vars (or output_root in "
            "the config) to storage that outlives the job"
        )
    return str(resolved)
