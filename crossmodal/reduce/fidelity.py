"""Pass 3's fidelity outputs: Spearman bounds, exemplars and set stability of one family.

Run by the sets pass after the overlap analyses (:mod:`crossmodal.reduce.sets`):

* ``overlap/<family>/spearman``: ``<var>_bound`` beside every Spearman variable and the
  attr ``ap`` (:mod:`crossmodal.reduce.ap_accuracy`);
* ``exemplars/<family>``: the highest/lowest-value examples of every final-set unit
  (:mod:`crossmodal.reduce.exemplars`);
* ``stability/<family>``: top/bottom-k overlap between two halves of the examples, when the
  exact pass measured every unit on each half (:mod:`crossmodal.reduce.stability`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import xarray as xr
import zarr

from crossmodal.reduce.ap_accuracy import with_exact_ap, write_spearman_bounds
from crossmodal.reduce.exemplars import write_exemplars
from crossmodal.reduce.sets import paired_tasks
from crossmodal.reduce.stability import stability, with_unit_coords
from crossmodal.store.datasets import write_dataset
from crossmodal.store.location import zarr_store
from crossmodal.store.names import stability_group


def exact_views(
    views: Mapping[str, xr.Dataset], exact: xr.Dataset, every_unit: bool
) -> dict[str, xr.Dataset]:
    """The selectivity views the sets pass works with: every unit's exact AP when the exact
    pass measured every unit, else the histogram views unchanged (``exact["ap"]`` is read
    once: the driver has already loaded it for the sets)."""
    if not every_unit:
        return dict(views)
    ap = exact["ap"].load()
    return {p: with_exact_ap(v, ap.sel(pooling=p, drop=True)) for p, v in views.items()}


def write_fidelity(
    store: str,
    family: str,
    views: Mapping[str, xr.Dataset],
    sets: xr.DataArray,
    exact: xr.Dataset,
    scopes: Sequence[str],
    k: int,
    every_unit: bool,
) -> list[str]:
    """Write the three outputs above (``views``: :func:`exact_views`); returns the groups."""
    written = []
    tasks = paired_tasks(views[next(iter(views))])
    if tasks:
        write_spearman_bounds(store, family, dict(views), tasks, every_unit)
        written.append(f"overlap/{family}/spearman")
    write_exemplars(store, family, sets)
    written.append(f"exemplars/{family}")
    if "ap_half" in exact:
        per = [_pooling_stability(exact["ap_half"], p, v, scopes, k) for p, v in views.items()]
        ds = xr.concat(per, "pooling", combine_attrs="override")
        write_dataset(store, stability_group(family), ds.transpose("pooling", "scope", ...))
        written.append(stability_group(family))
    else:  # measured on histograms only: no halves, and no stale stability of an earlier run
        g = zarr.open_group(zarr_store(store), mode="r+")
        if stability_group(family) in g:
            del g[stability_group(family)]
    return written


def _pooling_stability(
    ap_half: xr.DataArray, pooling: str, view: xr.Dataset, scopes: Sequence[str], k: int
) -> xr.Dataset:
    """Set stability of one pooling; reads only that pooling's halves (``ap_half`` lazy:
    one pooling in memory at a time)."""
    half = ap_half.sel(pooling=pooling, drop=True).load()
    return stability(with_unit_coords(half, view), scopes, k).expand_dims(pooling=[pooling])
