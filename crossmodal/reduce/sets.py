"""Reduce pass 3: the exact selected sets, their table and CSVs, roles and cross-modal overlap.

:func:`crossmodal.reduce.selection.finalize_selection` turns each (pooling, scope) plan and
the exact AP of its members into the sets exact AP selects -> ``sets/<family>``; the same
sets as one long-format table (:func:`sets_table`, one row per member with its unit
coordinates, histogram AP and bounds and exact AP), written whole as
``<store>-sets/<family>.parquet`` (:func:`write_sets_table`); optionally one CSV per set
with the reference's expertise columns (:func:`write_csvs`); ``roles/<family>`` (when both
x2en and en2x were collected); ``overlap/<family>/{sets, sets_by_layer, spearman}`` (when
some task has both modalities). The driver redoes the pass when k, the scopes or widen
change, and then replaces the family's table and CSV folder whole: nothing stale remains.
"""

from __future__ import annotations

import itertools
import shutil
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
from crossmodal.store.location import is_url, upath, write_whole
from crossmodal.store.names import overlap_group, roles_group

_CSV_STATS = ["ap", "on_p50", "on_p90", "off_mean"]
SET_KEYS = ("task", "modality", "step", "pooling", "scope", "language", "kind")
"""The columns naming one set in :func:`sets_table`, in sort order (``rank`` follows)."""
_BOUNDS = ("ap", "ap_lo", "ap_hi")


def sets_table(
    views: Mapping[str, xr.Dataset], sets: xr.DataArray, exact_ap: xr.DataArray, family: str
) -> pd.DataFrame:
    """Every member of every set, one row each (columns: outputs.schema.json,
    ``reduce/sets.parquet``), ordered by set then rank (exact-AP order within a side).

    Memory: the members, plus one condition's AP vectors at a time.

    Raises:
        ValueError: a member without a finite exact AP (the exact pass did not measure it).
    """
    frames = []
    exact_ids = pd.Index(np.asarray(exact_ap["unit"].values, dtype=np.int64))
    for pooling, ds in views.items():
        index = pd.Index(np.asarray(ds["unit"].values, dtype=np.int64))
        coords = {c: _plain(ds[c].values) for c in UNIT_COORDS}
        block = sets.sel(pooling=pooling).transpose(*COND, "scope", "kind", "rank")
        scopes, kinds = _plain(block["scope"].values), _plain(block["kind"].values)
        for at in itertools.product(*(block[d].values for d in COND)):
            cond = dict(zip(COND, at, strict=True))
            ids = np.asarray(block.sel(cond).values)
            scope_i, kind_i, rank = np.nonzero(ids >= 0)
            if not rank.size:
                continue
            units = ids[scope_i, kind_i, rank]
            pos = index.get_indexer(units)
            row = {
                "family": family,
                **cond,
                "pooling": pooling,
                "scope": scopes[scope_i],
                "kind": kinds[kind_i],
                "k": int(sets.attrs["k"]),
                "rank": rank.astype(np.int64),
                "unit": units.astype(np.int64),
                **{c: v[pos] for c, v in coords.items()},
            }
            for name in _BOUNDS:
                row[name] = np.asarray(ds[name].sel(cond).values, dtype=np.float64)[pos]
            exact = np.asarray(exact_ap.sel(pooling=pooling, **cond).values, dtype=np.float64)
            epos = exact_ids.get_indexer(units)
            row["exact_ap"] = np.where(epos >= 0, exact[np.maximum(epos, 0)], np.nan)
            frames.append(pd.DataFrame(row))
    table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    missing = table["exact_ap"].isna()
    if missing.any():
        first = table.loc[missing].iloc[0]
        raise ValueError(
            f"exact_ap must be one of [finite for every set member], got NaN for unit "
            f"{int(first['unit'])} of {dict(first[list(SET_KEYS)])!r}; re-run the exact pass"
        )
    return _typed(table).sort_values([*SET_KEYS, "rank"], ignore_index=True)


def _plain(values: np.ndarray) -> np.ndarray:
    """Labels as numpy can index and pandas can hold: strings (numpy StringDType from the
    store included) as an object array of ``str``, anything else unchanged."""
    values = np.asarray(values)
    if values.dtype.kind in "OUT":
        return np.asarray([str(v) for v in values], dtype=object)
    return values


def _empty_table() -> pd.DataFrame:
    cols = ["family", *SET_KEYS, "k", "rank", "unit", *UNIT_COORDS, *_BOUNDS, "exact_ap"]
    return pd.DataFrame({c: [] for c in cols})


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """The declared column types: strings, int64/int32 ids and positions, bool, float64."""
    types = {"step": "int32", "k": "int64", "rank": "int64", "unit": "int64"}
    types.update(layer="int32", feature="int32", step_invariant="bool")
    strings = ["family", "task", "modality", "pooling", "scope", "language", "kind"]
    types.update({c: "object" for c in [*strings, "submodule", "site"]})
    types.update({c: "float64" for c in [*_BOUNDS, "exact_ap"]})
    out = table.astype(types)
    for c in [*strings, "submodule", "site"]:
        out[c] = out[c].astype(str)
    order = ["family", *SET_KEYS, "k", "rank", "unit", *UNIT_COORDS, *_BOUNDS, "exact_ap"]
    return out[order]


def sets_table_path(store: str | Path, family: str) -> Path:
    """``<store parent>/<store name>-sets/<family>.parquet``: one family's part of the sets
    dataset (read the folder with ``pd.read_parquet`` for every family)."""
    store = upath(store)
    return store.parent / f"{store.stem}-sets" / f"{family}.parquet"


def write_sets_table(table: pd.DataFrame, path: Path, metadata: Mapping[str, str]) -> Path:
    """Write ``table`` to ``path`` whole (temporary name, then rename): a re-run replaces it.
    ``metadata``: extra key/values of the Parquet file metadata (k, scopes, store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = {
        **(arrow.schema.metadata or {}),
        **{k.encode(): v.encode() for k, v in metadata.items()},
    }
    write_whole(path, lambda target: pq.write_table(arrow.replace_schema_metadata(meta), target))
    return path


def clear_csvs(dest: Path) -> None:
    """Remove a family's CSV folder: the sets pass rewrites it whole (or not at all)."""
    if dest.is_dir():
        if is_url(dest):
            dest.fs.rm(dest.path, recursive=True)
        else:
            shutil.rmtree(dest)


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
