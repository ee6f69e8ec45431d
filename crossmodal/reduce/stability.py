"""Set stability: do two disjoint halves of the examples select the same top/bottom-k units?

Each condition's examples are split in two halves by a fixed seed (:func:`example_halves`:
the ids ordered by a seeded hash, the first half of that order is half 0; the hash depends on
the id only, so parallel sentences of different languages fall in the same half). When the
exact pass re-collects every unit (docs/method.md, "Accuracy of all-unit AP") it also computes
each unit's exact AP on each half (``exact/<family>/ap_half``); :func:`stability` selects the
top-k and bottom-k of every scope on each half and counts the units both halves select,
beside the count two random k-sets of the N ranked units share on average (k*k/N). Memory:
the AP of the two halves, ``2 x`` the exact AP; nothing per example.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from crossmodal.reduce.labels import UNIT_COORDS
from crossmodal.reduce.selection import SIDES, parse_scope, scope_mask, select_sets
from crossmodal.store.names import PLAN, condition_key

HALVES = (0, 1)


def _rank(seed: int, example_id: str) -> str:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()


def split_halves(ids: Sequence[str], seed: int) -> dict[str, int]:
    """``{id: half}``: the first ``len(ids) // 2`` ids in seeded-hash order are half 0."""
    order = sorted(dict.fromkeys(ids), key=lambda i: _rank(seed, i))
    return {i: int(r >= len(order) // 2) for r, i in enumerate(order)}


def example_halves(root: zarr.Group, seed: int) -> dict[str, dict[str, dict[str, int]]]:
    """``{"task/modality": {language: {id: half}}}`` over the store plan's conditions."""
    ids: dict[tuple[str, str], list[str]] = {}
    for w in root[PLAN].attrs["work_units"]:
        key = (condition_key(w["task"], w["modality"]), w["language"])
        ids.setdefault(key, []).extend(w["ids"])
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (key, language), every in ids.items():
        out.setdefault(key, {})[language] = split_halves(every, seed)
    return out


def _scope_stability(ap_half: xr.DataArray, scope: str, k: int) -> xr.Dataset:
    """Overlap, chance and pool size of one scope, ``[*condition dims, kind]``."""
    group, layer = parse_scope(scope)
    pos = scope_mask(ap_half, group, layer)
    finite = np.isfinite(ap_half).all("half").isel(unit=np.flatnonzero(pos))
    n_units = finite.sum("unit")
    sets = [
        select_sets(ap_half.sel(half=h, drop=True), k=k, group=group, layer=layer) for h in HALVES
    ]
    a, b = (s.sel(kind=list(SIDES)) for s in sets)
    shared = xr.apply_ufunc(
        lambda x, y: np.intersect1d(x[x >= 0], y[y >= 0]).size,
        a,
        b,
        input_core_dims=[["rank"], ["rank"]],
        vectorize=True,
    )
    k_eff = np.minimum(k, n_units)
    expected = (k_eff * k_eff / n_units.where(n_units > 0)).broadcast_like(shared)
    has = (n_units > 0).broadcast_like(shared)
    out = xr.Dataset({"overlap": shared.where(has), "expected": expected, "n_units": n_units})
    return out.assign(k=k_eff.broadcast_like(shared))


def stability(ap_half: xr.DataArray, scopes: Sequence[str], k: int) -> xr.Dataset:
    """``[scope, *condition dims, kind (top, bottom)]``: ``overlap`` (units both halves
    select), ``expected`` (k*k/N), ``k`` (min(k, N)) and ``n_units`` (N, units with an AP on
    both halves). ``ap_half``: ``[half, *condition dims, unit]`` with the unit coordinates.
    Conditions without AP give NaN overlap and expected."""
    per = [_scope_stability(ap_half, s, k) for s in scopes]
    out = xr.concat(per, pd.Index(list(scopes), name="scope"), combine_attrs="drop")
    return out.assign_attrs(k=int(k), halves="seeded hash of the example id, first half = 0")


def with_unit_coords(ap_half: xr.DataArray, view: xr.Dataset) -> xr.DataArray:
    """``ap_half`` (exact group: bare unit ids) labelled with the view's unit coordinates
    (read from the coordinates alone: the view's AP arrays are neither copied nor loaded).

    Raises:
        KeyError: a unit of ``ap_half`` the view does not have.
    """
    ids = np.asarray(ap_half["unit"].values)
    pos = pd.Index(np.asarray(view["unit"].values)).get_indexer(ids)
    if np.any(pos < 0):
        raise KeyError(
            f"ap_half units must be one of [the view's units], got {ids[pos < 0][:5].tolist()}; "
            "pass the selectivity view of the store the exact pass measured"
        )
    return ap_half.assign_coords(
        {c: ("unit", np.asarray(view[c].values)[pos]) for c in UNIT_COORDS}
    )


def stability_frame(ds: xr.Dataset, **where: object) -> pd.DataFrame:
    """One row per condition and kind: overlap, expected, k, N (for the report)."""
    sub = ds.sel({d: v for d, v in where.items() if d in ds.dims})
    return sub[["overlap", "expected", "k", "n_units"]].to_dataframe().reset_index()
