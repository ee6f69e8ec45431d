"""What a steering grid reads from its selectivity store: checked whole, identified by content.

:func:`selectivity_digest` is the identity every cell id hashes (:meth:`SteerConfig.context`):
for a store written by ``crossmodal collect`` and ``crossmodal reduce`` it is the digest the
reduce job recorded for that selectivity group when its pass finished, and the store is
refused, with one line naming the missing pass and the command that finishes it, until the
reduce job has finished the passes steering depends on (selectivity, exact, sets). Another
Dataset (a NetCDF file, a Zarr group without collect's attrs) is hashed here. The content,
not the path: results of an earlier reduce are never reused for a different one, and a moved
store keeps its results (docs/design.md, "Crash safety and resume").

:func:`check_grid_values` refuses, in one line, a grid asking for a task, modality, step or
language the store does not have, or a forcing variable it lacks; :func:`check_sets` a cell
that would force no unit (unless ``allow_empty_sets``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr

from crossmodal.steer.grid import ROLE_TASK, Cell, SelectivitySource, SteerConfig
from crossmodal.steer.parts import CELL_FIELDS
from crossmodal.store.location import upath, zarr_store

STEER_PASSES = ("selectivity", "exact", "sets")
"""The reduce passes a steering grid depends on, in the order reduce runs them."""
HASHED = ("ap", "on_p50", "on_p90", "off_mean")
"""The variables (with every coordinate) hashed for a Dataset not written by reduce."""


class SelectivityError(ValueError):
    """The selectivity store cannot serve this grid (one line: what, what is allowed, fix)."""


def _group(source: SelectivitySource) -> str:
    return (source.group or "").strip("/")


def selectivity_digest(source: SelectivitySource) -> str:
    """The content digest of the grid's selectivity (see the module docstring).

    Raises:
        SelectivityError: missing store, or a reduce that has not finished what steering reads.
    """
    path = upath(str(source.path))  # a local path or an s3:// URL (store/location.py)
    if not path.exists():
        raise SelectivityError(
            f"selectivity.path must be an existing store, got {str(path)!r}; run the collect "
            "and reduce jobs first"
        )
    if path.is_dir() and (path / "zarr.json").is_file():
        attrs = zarr.open_group(zarr_store(path), mode="r").attrs.asdict()
        if "layout_version" in attrs:
            return _reduced_digest(path, _group(source), attrs.get("reduce") or {})
    from crossmodal.steer.worker import open_selectivity

    return dataset_digest(open_selectivity(source))


def _reduced_digest(path: Any, group: str, log: dict) -> str:
    """The digest reduce recorded for ``group``, once the passes steering reads are done."""
    parts = group.split("/")
    if len(parts) < 2 or parts[0] != "selectivity":
        raise SelectivityError(
            f"selectivity.group must be one of [selectivity/<family>[/<pooling>]], got "
            f"{group!r} in reduced store {str(path)!r}; e.g. selectivity/decoder"
        )
    family = parts[1]
    for name in STEER_PASSES:
        if family not in (log.get(name) or {}):
            raise SelectivityError(
                f"selectivity store {str(path)!r} must be reduced (passes "
                f"{list(STEER_PASSES)}) for {family}, got pass {name!r} unfinished; finish it "
                f"with `crossmodal reduce {path}`"
            )
    digests = log["selectivity"][family].get("digests") or {}
    if group not in digests:
        raise SelectivityError(
            f"selectivity.group must be one of {sorted(digests)} (groups reduce recorded), got "
            f"{group!r}; pick one, or run `crossmodal reduce {path}` again to record digests"
        )
    return f"reduce:{digests[group]}"


def dataset_digest(ds: xr.Dataset) -> str:
    """sha256 (16 hex) of the values of :data:`HASHED` present in ``ds`` and its coords."""
    h = hashlib.sha256()
    names = [n for n in HASHED if n in ds] + sorted(str(c) for c in ds.coords)
    for name in names:
        values = np.asarray(ds[name].values)
        if values.dtype.kind in "OTU":
            values = np.asarray(values.astype(str).tolist(), dtype=str)
        h.update(f"{name}:{values.shape}:{values.dtype}".encode())
        h.update(np.ascontiguousarray(values).tobytes())
    return f"content:{h.hexdigest()[:16]}"


def _allowed(ds: xr.Dataset, dim: str) -> list:
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(ds[dim].values)]


def check_grid_values(config: SteerConfig, ds: xr.Dataset) -> None:
    """Every task (from the roles), unit modality, step and language of the grid, and every
    forcing variable, is in ``ds``.

    Raises:
        SelectivityError: the first value absent, with what the store has.
    """
    wanted: Sequence[tuple[str, str, Sequence]] = (
        ("roles", "task", [ROLE_TASK[r] for r in config.roles]),
        ("unit_modalities", "modality", config.unit_modalities),
        ("steps", "step", config.steps),
        ("languages", "language", config.languages),
    )
    where = f"selectivity store {str(config.selectivity.path)!r}"
    for field, dim, values in wanted:
        have = _allowed(ds, dim) if dim in ds.coords else []
        for value in values:
            if value not in have:
                shown = f"{value!r} (task of its role)" if field == "roles" else repr(value)
                raise SelectivityError(
                    f"steering {field} must be one of {have} ({dim}s of {where}), got {shown}; "
                    "drop it from the grid or collect and reduce it"
                )
    needed = [f for f in config.forcing if f != "zero"] + ["ap"]
    missing = [v for v in needed if v not in ds]
    if missing:
        raise SelectivityError(
            f"selectivity variables must include {needed}, got {sorted(map(str, ds.data_vars))} "
            f"in {where}; point selectivity.group at a reduce selectivity group"
        )


def check_sets(config: SteerConfig, cells: Sequence[Cell], ds: xr.Dataset) -> None:
    """Refuse (one line) a selected or random cell that would force no unit, unless
    ``config.allow_empty_sets``: its rows would silently equal the baseline's."""
    if config.allow_empty_sets:
        return
    from crossmodal.steer.units import UnitForcing

    forcing = UnitForcing(ds, None)
    seen: set[tuple] = set()
    for cell in cells:
        key = (cell.kind, cell.role, cell.unit_modality, cell.step, cell.language,
               cell.set_kind, cell.scope, cell.k, cell.forcing, cell.seed)  # fmt: skip
        if cell.kind == "baseline" or key in seen:
            continue
        seen.add(key)
        if forcing.n_forced(cell) == 0:
            what = {f: getattr(cell, f) for f in CELL_FIELDS if getattr(cell, f) is not None}
            raise SelectivityError(
                f"steering cell sets must force >= 1 unit, got 0 for {what} (its set is empty "
                f"or every unit's {cell.forcing} is NaN in {config.selectivity.path!r}); "
                "drop that value from the grid, or set allow_empty_sets: true"
            )
