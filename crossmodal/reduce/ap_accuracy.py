"""How exact the all-unit AP behind the Spearman analyses is, and the bound on each Spearman.

Two cases (docs/method.md, "Accuracy of all-unit AP"):

* The exact pass re-collected every unit (the plan's spill fits :data:`EVERY_UNIT_BYTES` and
  the disk): the selectivity views get every unit's exact AP (:func:`with_exact_ap`) before
  the overlap pass, so each Spearman is that of exact AP; its bound is 0.
* Otherwise the AP of most units comes from histograms with guaranteed intervals
  ``[ap_lo, ap_hi]``. :func:`spearman_bounds` turns them into a bound on each Spearman: a
  unit's rank among the units lies between the number of units whose interval lies wholly
  below its own and ``n`` minus those wholly above it, whatever the exact values are; the
  Pearson correlation of ranks (distinct values: mean and spread of ranks fixed) then lies
  between the correlations of the lowest and the highest rank products, and the bound is
  the larger distance of the estimate to those two.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

from crossmodal.reduce.overlap import COL, ROW, SPEECH, TEXT, spearman_rows
from crossmodal.reduce.selection import UNIT, iter_conditions, scope_mask
from crossmodal.store.datasets import put_array
from crossmodal.store.location import zarr_store
from crossmodal.store.names import overlap_group

EVERY_UNIT_BYTES = 4 << 30
"""Largest spill (float32 values of every unit, example and slot) for which the exact pass
re-collects every unit; larger plans fall back to histogram AP with bounds."""
SPEARMAN_VARS = {
    "spearman": None,
    "spearman_by_layer": "layer",
    "spearman_by_submodule": "submodule",
}
"""The Spearman variables of ``overlap/<family>/spearman`` and what each is split by."""


def every_unit_bytes(n_examples: int, n_units: int, n_slots: int) -> int:
    """Bytes the exact pass spills when it re-collects every unit (float32)."""
    return 4 * int(n_examples) * int(n_units) * int(n_slots)


def fits_every_unit(need: int, free: int, budget: int = EVERY_UNIT_BYTES) -> bool:
    """Whether the every-unit spill fits the budget and half the free disk."""
    return need <= budget and need <= free // 2


def with_exact_ap(view: xr.Dataset, exact_ap: xr.DataArray) -> xr.Dataset:
    """``view`` with ``ap``, ``ap_lo``, ``ap_hi`` replaced by ``exact_ap`` (one pooling,
    ``[task, modality, step, language, unit]`` over a subset of units) where it is finite.

    Memory: the exact AP over the view's units, one array being read, and the new arrays:
    three, or one shared read-only array when the exact AP covers every value the view
    has (the every-unit exact pass: then the three are equal); ``view`` itself is not
    loaded (a store-backed view stays lazy). docs/benchmarks.md, "Reduce driver memory at
    the real shapes"."""
    dims = view["ap"].dims
    exact = exact_ap.reindex(unit=view["unit"].values).transpose(*dims).values
    have = np.isfinite(exact)
    out: dict[str, xr.DataArray] = {}
    shared = None  # the overlaid ``ap`` when it is exact AP or NaN everywhere
    for name in ("ap", "ap_lo", "ap_hi"):
        # a shallow copy reads the store without caching the values in ``view``
        v = view[name].copy(deep=False)
        raw = v.values
        dtype = np.result_type(v.dtype, exact.dtype)
        covered = bool(np.isnan(raw[~have]).all())  # so the overlay is exact AP or NaN
        if shared is not None and covered and shared.dtype == dtype:
            out[name] = v.copy(data=shared)  # equal to the overlaid ``ap``
            continue
        values = np.array(raw, dtype=dtype, copy=True)
        del raw
        np.copyto(values, exact, where=have)
        out[name] = v.copy(data=values)
        if name == "ap" and covered:
            shared = values
            shared.flags.writeable = False  # may back three variables: never written
    return view.assign(out)


def _rank_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``[m, n]`` intervals, the lowest and highest rank (1-based) of each unit."""
    n = lo.shape[1]
    below = np.stack([np.searchsorted(np.sort(h), x, "left") for h, x in zip(hi, lo, strict=True)])
    above = np.stack(
        [n - np.searchsorted(np.sort(x), h, "right") for x, h in zip(lo, hi, strict=True)]
    )
    return below + 1.0, n - above


def spearman_bound_rows(est: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
    """Bound on ``|spearman(exact a_i, exact b_j) - spearman(est a_i, est b_j)|`` for every
    row pair; ``a``, ``b``: ``(ap, lo, hi)`` of ``[m, n]`` / ``[p, n]``; ``est``: the
    estimated Spearman ``[m, p]``. Columns as :func:`crossmodal.reduce.overlap.spearman_rows`
    (finite in every non-empty row); NaN where the estimate is."""
    va = ~np.all(np.isnan(a[0]), axis=1)
    vb = ~np.all(np.isnan(b[0]), axis=1)
    keep = np.ones(a[0].shape[1], bool)
    for x, ok in ((a, va), (b, vb)):
        keep &= np.all(np.isfinite(np.stack(x)[:, ok]), axis=(0, 1))
    out = np.full(est.shape, np.nan)
    n = int(keep.sum())
    if n < 2 or not va.any() or not vb.any():
        return out
    lo_a, hi_a = _rank_bounds(a[1][va][:, keep], a[2][va][:, keep])
    lo_b, hi_b = _rank_bounds(b[1][vb][:, keep], b[2][vb][:, keep])
    centre, spread = n * ((n + 1) / 2) ** 2, n * (n * n - 1) / 12.0
    rho_lo = np.clip((lo_a @ lo_b.T - centre) / spread, -1, 1)
    rho_hi = np.clip((hi_a @ hi_b.T - centre) / spread, -1, 1)
    e = est[np.ix_(va, vb)]
    out[np.ix_(va, vb)] = np.maximum(e - rho_lo, rho_hi - e)
    return np.where(np.isnan(est), np.nan, np.maximum(out, 0.0))


def _bound_matrix(view: xr.Dataset, by: str | None) -> xr.DataArray:
    """The bound of each cell of ``spearman_matrix(view.ap, by=by)``."""
    ap = view["ap"]
    scope = scope_mask(ap, "all")
    if by is None:
        members = [np.flatnonzero(scope)]
    else:
        coord = np.asarray(ap[by].values)
        members = [np.flatnonzero(scope & (coord == v)) for v in np.unique(coord[scope])]
    outer = [d for d in ap.dims if d not in ("modality", "language", UNIT)]
    n_lang = ap.sizes["language"]
    res = np.full([ap.sizes[d] for d in outer] + [len(members), n_lang, n_lang], np.nan)
    for cond in iter_conditions(ap, outer):
        block = view[["ap", "ap_lo", "ap_hi"]].isel(cond)
        rows = {
            m: tuple(
                np.asarray(block[v].sel(modality=m).transpose("language", UNIT).values)
                for v in ("ap", "ap_lo", "ap_hi")
            )
            for m in (TEXT, SPEECH)
        }
        for g, pos in enumerate(members):
            a, b = (tuple(x[:, pos] for x in rows[m]) for m in (TEXT, SPEECH))
            res[(*(cond[d] for d in outer), g)] = spearman_bound_rows(
                spearman_rows(a[0], b[0]), a, b
            )
    dims = [*outer, by or "scope", ROW, COL]
    out = xr.DataArray(res, dims=dims)
    return out.isel(scope=0, drop=True) if by is None else out


def spearman_bounds(view: xr.Dataset) -> dict[str, xr.DataArray]:
    """Per Spearman variable of the overlap pass, the bound of histogram AP over ``view``'s
    conditions (NaN where the Spearman is)."""
    return {f"{name}_bound": _bound_matrix(view, by) for name, by in SPEARMAN_VARS.items()}


def write_spearman_bounds(
    store: str, family: str, views: dict[str, xr.Dataset], tasks: list[str], exact: bool
) -> None:
    """Add ``<var>_bound`` next to each Spearman variable of ``overlap/<family>/spearman``
    (same dims; 0 for exact AP, else :func:`spearman_bounds` per pooling) and the group
    attr ``ap`` (``exact`` or ``histogram``)."""
    g = zarr.open_group(zarr_store(store), path=overlap_group(family, "spearman"), mode="r+")
    per = [] if exact else [spearman_bounds(v.sel(task=tasks)) for v in views.values()]
    for name in SPEARMAN_VARS:
        dims = list(g[name].metadata.dimension_names)
        if exact:
            rho = np.asarray(g[name][...])
            bound = np.where(np.isnan(rho), np.nan, 0.0)
        else:
            bound = xr.concat([p[f"{name}_bound"] for p in per], "pooling")
            bound = bound.transpose(*dims).values
        put_array(g, f"{name}_bound", bound, dims)
    g.attrs["ap"] = "exact" if exact else "histogram"
