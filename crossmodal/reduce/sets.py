"""Reduce pass 3: the exact selected sets, their CSVs, roles and cross-modal overlap.

:func:`crossmodal.reduce.selection.finalize_selection` turns each (pooling, scope) plan and
the exact AP of its candidates into the sets exact AP selects -> ``sets/<family>``; one CSV
per set with the reference's expertise columns; ``roles/<family>`` (when both x2en and en2x
were collected); ``overlap/<family>/{sets, sets_by_layer, spearman}`` (when some task has
both modalities). The driver redoes the pass when k, the scopes or widen change.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from crossmodal.reduce.labels import COND, UNIT_COORDS
from crossmodal.reduce.overlap import overlap, spearman_matrix
from crossmodal.reduce.roles import ROLE_TASKS, roles
from crossmodal.reduce.selection import finalize_selection, parse_scope, write_csv
from crossmodal.store.datasets import write_dataset
from crossmodal.store.names import overlap_group, roles_group

_CSV_STATS = ["ap", "on_p50", "on_p90", "off_mean"]


def final_sets(
    plans: Mapping[tuple[str, str], xr.Dataset],
    exact_ap: xr.DataArray,
    poolings: Sequence[str],
    scopes: Sequence[str],
) -> xr.DataArray:
    """Exact sets ``[scope, pooling, task, modality, step, language, kind, rank]``."""
    per_scope = []
    for s in scopes:
        per_pool = [
            finalize_selection(plans[(p, s)], exact_ap.sel(pooling=p, drop=True)) for p in poolings
        ]
        per_scope.append(
            xr.concat(per_pool, pd.Index(list(poolings), name="pooling"), combine_attrs="drop")
        )
    out = xr.concat(per_scope, pd.Index(list(scopes), name="scope"), combine_attrs="drop")
    return out.assign_coords(rank=np.arange(out.sizes["rank"])).transpose("scope", "pooling", ...)


def write_csvs(views: Mapping[str, xr.Dataset], sets: xr.DataArray, dest: Path) -> int:
    """One CSV per set (expertise-file columns, :data:`crossmodal.reduce.selection.CSV_COLUMNS`):
    ``dest/<pooling>/<scope>/<task>_<modality>_step<step>_<language>_<kind>.csv``."""
    n = 0
    for pooling, ds in views.items():
        coords = {c: ("unit", ds[c].values) for c in UNIT_COORDS}
        for labels in itertools.product(*(ds[d].values for d in COND)):
            at = dict(zip(COND, labels, strict=True))
            block = sets.sel(pooling=pooling, **at)
            if not (block >= 0).any():
                continue
            sub = ds[_CSV_STATS].reset_coords(drop=True).sel(at).load().assign_coords(coords)
            for scope in block["scope"].values:
                for kind in block["kind"].values:
                    name = "_".join(
                        [
                            str(at["task"]),
                            str(at["modality"]),
                            f"step{at['step']}",
                            str(at["language"]),
                            str(kind),
                        ]
                    )
                    path = dest / str(pooling) / str(scope) / f"{name}.csv"
                    write_csv(sub, block.sel(scope=scope), path, kind=kind)
                    n += 1
    return n


def paired_tasks(view: xr.Dataset) -> list[str]:
    """Tasks measured in every (modality, step, language) block of some condition, when the
    store has both modalities: the tasks whose text and speech sets can be compared."""
    n_pos = view["n_pos"].load()
    has = (n_pos > 0).any(["step", "language"])
    if not {"text", "speech"} <= {str(m) for m in has["modality"].values}:
        return []
    return [str(t) for t in has["task"].values if bool(has.sel(task=t).all())]


def _scoped(sets: xr.DataArray, pooling: str, scope: str, tasks: list[str], k: int) -> xr.DataArray:
    """One (pooling, scope)'s sets of ``tasks``, with the scope attrs overlap reads."""
    da = sets.sel(pooling=pooling, scope=scope, task=tasks, drop=True)
    group, layer = parse_scope(scope)
    return da.assign_attrs(k=int(k), group=group, layer="all" if layer is None else layer)


def overlap_datasets(
    views: Mapping[str, xr.Dataset], sets: xr.DataArray, tasks: list[str], k: int
) -> dict[str, xr.Dataset]:
    """``sets`` (per scope), ``sets_by_layer`` (scope ``all``, when present) and
    ``spearman`` (AP vectors), each over ``pooling``."""
    poolings = list(views)
    idx = pd.Index(poolings, name="pooling")
    scopes = pd.Index([str(s) for s in sets["scope"].values], name="scope")
    out = {}
    out["sets"] = xr.concat(
        [
            xr.concat(
                [overlap(_scoped(sets, p, s, tasks, k), views[p]) for s in scopes],
                scopes,
                combine_attrs="drop",
            )
            for p in poolings
        ],
        idx,
    )
    if "all" in scopes:
        by_layer = [
            overlap(_scoped(sets, p, "all", tasks, k), views[p], by_layer=True) for p in poolings
        ]
        out["sets_by_layer"] = xr.concat(by_layer, idx, combine_attrs="drop")
    rho = []
    for p in poolings:
        ap = views[p]["ap"].sel(task=tasks)
        rho.append(
            xr.Dataset(
                {
                    "spearman": spearman_matrix(ap),
                    "spearman_by_layer": spearman_matrix(ap, by="layer"),
                    "spearman_by_submodule": spearman_matrix(ap, by="submodule"),
                }
            )
        )
    out["spearman"] = xr.concat(rho, idx)
    return out


def write_analyses(
    store: str, family: str, views: Mapping[str, xr.Dataset], sets: xr.DataArray, k: int
) -> list[str]:
    """Roles and overlap groups; returns the groups written (none without paired tasks)."""
    written = []
    if set(ROLE_TASKS.values()) <= {str(t) for t in sets["task"].values}:
        write_dataset(store, roles_group(family), roles(sets).rename("units"))
        written.append(roles_group(family))
    tasks = paired_tasks(views[next(iter(views))])
    if not tasks:
        return written
    for kind, ds in overlap_datasets(views, sets, tasks, k).items():
        write_dataset(store, overlap_group(family, kind), ds.assign_attrs(k=int(k)))
        written.append(overlap_group(family, kind))
    return written
