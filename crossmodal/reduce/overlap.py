"""Cross-modal comparison of selected sets and AP vectors, with random baselines; v1 analyses.

Inputs follow :mod:`crossmodal.reduce.selection`: the selectivity dataset (dims ``task, modality,
step, language, unit`` plus unit coordinates) and sets of unit ids (``kind``, ``rank`` dims,
-1 padded). Matrices have rows ``text_language`` and columns ``speech_language`` (the
reference's orientation: rows text, columns speech).

Baselines (not in the reference): two random subsets of sizes a and b of N units share
a*b/N units on average (k*k/N for k-sets); the p-value of an observed intersection x is the
hypergeometric tail P(X >= x). Per layer, N, a and b are the layer's units and the parts of
the two sets inside it. The off-diagonal cells (different languages) give an empirical one.

Spearman follows ``scipy.stats.spearmanr`` (average ranks for ties, Pearson of ranks) but
ranks each AP vector once and correlates all language pairs with one matrix product.

:func:`count_by` counts selected units per layer, submodule or site.

v1: :func:`modality_selectivity` scores "from the speech task" against "from the text task"
with any AP finalizer (histograms or exact values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.stats import hypergeom, rankdata

from crossmodal.reduce.selection import UNIT, iter_conditions, scope_mask, scope_of, unit_ids

TEXT, SPEECH = "text", "speech"
ROW, COL = "text_language", "speech_language"


# ----------------------------------------------------------------------------- baselines


def expected_overlap(n_a: Any, n_b: Any, n_universe: Any) -> np.ndarray:
    """Mean intersection of random subsets of sizes ``n_a`` and ``n_b`` of ``n_universe``."""
    n = np.asarray(n_universe, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.asarray(n_a, np.float64) * np.asarray(n_b, np.float64) / n, 0.0)


def overlap_p_value(observed: Any, n_a: Any, n_b: Any, n_universe: Any) -> np.ndarray:
    """Hypergeometric P(X >= observed) for random subsets; NaN where ``observed`` is NaN."""
    x = np.asarray(observed, dtype=np.float64)
    safe = np.where(np.isfinite(x), x, 0.0)
    p = hypergeom.sf(safe - 1, np.asarray(n_universe), np.asarray(n_a), np.asarray(n_b))
    return np.where(np.isfinite(x), p, np.nan)


# ----------------------------------------------------------------------------- overlap


def _modality_rows(sets: xr.DataArray, cond: dict[str, int], modality: str) -> list[np.ndarray]:
    block = np.asarray(sets.isel(cond).sel(modality=modality).transpose("language", "rank").values)
    return [row[row >= 0] for row in block]


class _UnitGroups:
    """The units of a scope, as one group or one group per layer, and the group of each id."""

    def __init__(self, units: xr.Dataset, group: str, layer: int | None, by_layer: bool) -> None:
        scope = scope_mask(units, group, layer)
        layers = np.asarray(units["layer"].values)
        if by_layer:
            self.labels, codes = np.unique(layers[scope], return_inverse=True)
        else:
            self.labels, codes = np.array([0]), np.zeros(int(scope.sum()), dtype=np.int64)
        self.full = np.full(scope.size, -1, dtype=np.int64)
        self.full[scope] = codes
        self.size = self.labels.size
        self.n_universe = np.bincount(codes, minlength=self.size)
        self.lookup = pd.Index(unit_ids(units))
        self.scope = (group, layer)

    def codes(self, ids: np.ndarray) -> np.ndarray:
        """The group of each unit id; every id must lie inside the scope."""
        pos = self.lookup.get_indexer(ids)
        c = np.where(pos >= 0, self.full[pos], -1)
        if np.any(c < 0):
            group, layer = self.scope
            raise ValueError(
                f"sets must be one of [ids inside the scope {group!r}/{layer!r} of units], got "
                f"ids {ids[c < 0][:5].tolist()}; pass the units the sets were selected from"
            )
        return c

    def count(self, ids: np.ndarray) -> np.ndarray:
        """Units of ``ids`` per group."""
        return np.bincount(self.codes(ids), minlength=self.size)


def _intersections(
    sets: xr.DataArray, groups: _UnitGroups, outer: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per outer condition and group, text-by-speech intersection counts (NaN where either set
    is missing) and the sizes of the text and speech sets: ``[*outer, group, text, speech]``."""
    n_lang = sets.sizes["language"]
    count = np.full((*[sets.sizes[d] for d in outer], groups.size, n_lang, n_lang), np.nan)
    n_a, n_b = np.zeros_like(count), np.zeros_like(count)
    for cond in iter_conditions(sets, outer):
        at = tuple(cond[d] for d in outer)
        text, speech = _modality_rows(sets, cond, TEXT), _modality_rows(sets, cond, SPEECH)
        n_text = [groups.count(r) for r in text]
        n_speech = [groups.count(r) for r in speech]
        for i, a in enumerate(text):
            for j, b in enumerate(speech):
                cell = (*at, slice(None), i, j)
                n_a[cell], n_b[cell] = n_text[i], n_speech[j]
                if a.size and b.size:
                    count[cell] = groups.count(np.intersect1d(a, b, assume_unique=True))
    return count, n_a, n_b


def _with_diagonal(ds: xr.Dataset, langs: list) -> xr.Dataset:
    """Add the same-language cells (``diagonal*``) and the mean off-diagonal count."""
    idx = xr.DataArray(langs, dims="language", coords={"language": langs})
    for name, src in (
        ("diagonal", "count"),
        ("diagonal_expected", "expected"),
        ("diagonal_p", "p_value"),
    ):
        ds[name] = ds[src].sel({ROW: idx, COL: idx}).drop_vars([ROW, COL])
    off = ds[ROW] != ds[COL]
    ds["offdiag_mean"] = ds["count"].where(off).mean([ROW, COL], skipna=True)
    return ds


def overlap(sets: xr.DataArray, units: xr.Dataset, *, by_layer: bool = False) -> xr.Dataset:
    """Text-by-speech intersection counts of selected sets, with baselines.

    Args:
        sets: unit-id sets with dims ``modality``, ``language``, ``rank`` and any others
            (task or role, step, kind); their scope attrs define the universe of units.
        units: the selectivity dataset (or anything with the unit coordinates).
        by_layer: split every set by the ``layer`` coordinate (the reference's per-layer
            overlap: the global sets restricted to each layer).

    Returns:
        Dataset over ``[*other dims, (layer,) text_language, speech_language]`` with
        ``count`` (NaN where either set is missing, e.g. en2x/eng), ``expected``, ``p_value``,
        ``n_text``, ``n_speech`` and ``n_universe``; plus ``diagonal``, ``diagonal_expected``,
        ``diagonal_p`` over ``language`` and ``offdiag_mean`` (mean off-diagonal count).
    """
    for d in ("modality", "language", "rank"):
        if d not in sets.dims:
            raise ValueError(f"sets dims must be one of [.. {d} ..], got {sets.dims!r}; pass sets")
    _, group, layer = scope_of(sets)
    groups = _UnitGroups(units, group, layer, by_layer)
    outer = [d for d in sets.dims if d not in ("modality", "language", "rank")]
    langs = list(sets["language"].values)
    count, n_a, n_b = _intersections(sets, groups, outer)
    n_u = groups.n_universe.reshape(groups.size, 1, 1)
    dims = [*outer, "layer", ROW, COL]
    coords = {d: sets[d].values for d in outer if d in sets.coords}
    coords.update(layer=groups.labels, **{ROW: langs, COL: langs})
    expected = np.where(np.isfinite(count), expected_overlap(n_a, n_b, n_u), np.nan)
    ds = xr.Dataset(
        {
            "count": (dims, count),
            "expected": (dims, expected),
            "p_value": (dims, overlap_p_value(count, n_a, n_b, np.broadcast_to(n_u, count.shape))),
            "n_text": (dims, n_a.astype(np.int64)),
            "n_speech": (dims, n_b.astype(np.int64)),
            "n_universe": (("layer",), groups.n_universe),
        },
        coords=coords,
    )
    if not by_layer:
        ds = ds.isel(layer=0, drop=True)
    ds = _with_diagonal(ds, langs)
    ds.attrs.update(sets.attrs)
    return ds


def count_by(
    sets: xr.DataArray, units: xr.Dataset | xr.DataArray, coord: str = "layer"
) -> xr.DataArray:
    """Selected units per value of a unit coordinate (layer, submodule, site).

    Returns an int DataArray ``[*set dims except rank, coord]``.
    """
    ids = unit_ids(units)
    labels, codes = np.unique(np.asarray(units[coord].values), return_inverse=True)
    lookup = pd.Index(ids)
    dims = [d for d in sets.dims if d != "rank"]
    rows = []
    for cond in iter_conditions(sets, dims):
        row = np.asarray(sets.isel(cond).values)
        pos = lookup.get_indexer(row[row >= 0])
        rows.append(np.bincount(codes[pos], minlength=labels.size))
    shape = [sets.sizes[d] for d in dims] + [labels.size]
    coords = {d: sets[d].values for d in dims if d in sets.coords} | {coord: labels}
    return xr.DataArray(np.stack(rows).reshape(shape), dims=[*dims, coord], coords=coords)


# ----------------------------------------------------------------------------- Spearman


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of ``a [m, n]`` with every row of ``b [p, n]``.

    Rows that are all NaN (missing conditions) give NaN; otherwise only columns finite in
    every remaining row are used. Constant rows give NaN, as scipy does.
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b.shape[1] must be one of [{a.shape[1]}], got {b.shape[1]!r}")
    va, vb = ~np.all(np.isnan(a), axis=1), ~np.all(np.isnan(b), axis=1)
    keep = np.all(np.isfinite(a[va]), axis=0) & np.all(np.isfinite(b[vb]), axis=0)
    out = np.full((a.shape[0], b.shape[0]), np.nan)
    if keep.sum() < 2 or not va.any() or not vb.any():
        return out
    za, zb = (_standardised_ranks(x[:, keep]) for x in (a[va], b[vb]))
    out[np.ix_(va, vb)] = np.clip(za @ zb.T, -1.0, 1.0)
    return out


def _standardised_ranks(x: np.ndarray) -> np.ndarray:
    r = rankdata(x, axis=1)
    r -= r.mean(axis=1, keepdims=True)
    norm = np.sqrt((r * r).sum(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, r / norm, np.nan)


def spearman_matrix(ap: xr.DataArray, *, by: str | None = None, group: str = "all") -> xr.DataArray:
    """Spearman of text vs speech AP vectors per language pair, over units of a scope.

    Args:
        ap: AP with dims ``modality``, ``language``, ``unit`` and any others (task, step).
        by: None (all units of the scope), ``layer`` or ``submodule``: one matrix per value.
        group: unit group restricting the pool (all / attention / ffn).

    Returns:
        ``[*other dims, (by,) text_language, speech_language]``.
    """
    if by not in (None, "layer", "submodule"):
        raise ValueError(f"by must be one of [None, 'layer', 'submodule'], got {by!r}")
    scope = scope_mask(ap, group)
    if by is None:
        labels, members = [None], [np.flatnonzero(scope)]
    else:
        coord = np.asarray(ap[by].values)
        labels = np.unique(coord[scope]).tolist()
        members = [np.flatnonzero(scope & (coord == v)) for v in labels]
    outer = [d for d in ap.dims if d not in ("modality", "language", UNIT)]
    langs = list(ap["language"].values)
    res = np.full([ap.sizes[d] for d in outer] + [len(labels), len(langs), len(langs)], np.nan)
    for cond in iter_conditions(ap, outer):
        block = ap.isel(cond)
        text = np.asarray(block.sel(modality=TEXT).transpose("language", UNIT).values)
        speech = np.asarray(block.sel(modality=SPEECH).transpose("language", UNIT).values)
        for g, pos in enumerate(members):
            res[(*(cond[d] for d in outer), g)] = spearman_rows(text[:, pos], speech[:, pos])
    coords = {d: ap[d].values for d in outer if d in ap.coords}
    coords.update({ROW: langs, COL: langs})
    out = xr.DataArray(res, dims=[*outer, by or "scope", ROW, COL], coords=coords)
    out = out.isel(scope=0, drop=True) if by is None else out.assign_coords({by: labels})
    return out.rename("spearman")


# ----------------------------------------------------------------------------- v1 analyses


APFinalizer = Callable[[Any, Any], Any]
"""``(positives, negatives) -> ap`` or ``(ap, ap_lo, ap_hi)`` per unit: a histogram finalizer
(per-modality histograms with shared edges) or an exact one (per-example values)."""


def modality_selectivity(
    get: Callable[[str, str, int, str], Any],
    ap_fn: APFinalizer,
    *,
    tasks: Sequence[str],
    steps: Sequence[int],
    languages: Sequence[str],
    units: xr.Dataset | xr.DataArray,
) -> xr.Dataset:
    """AP of "example comes from the speech task" vs the text task (v1 modality-selective units).

    Positives are the speech examples and negatives the text examples of the same task
    (direction), step and language. ``get(task, modality, step, language)`` returns the
    per-modality statistic ``ap_fn`` consumes; histograms must share bin edges across the
    two modalities (choose edges per (task, step) over both modalities' pilot) or the
    comparison is meaningless -- exact values have no such constraint.

    Returns:
        Dataset ``ap``, ``ap_lo``, ``ap_hi`` over ``(task, step, language, unit)`` with the
        unit coordinates of ``units``, ready for :func:`crossmodal.reduce.selection.select_sets` and
        :func:`count_by` (e.g. by ``site``: cross-attention k/v).
    """
    n_units = units.sizes[UNIT]
    out = np.full((3, len(tasks), len(steps), len(languages), n_units), np.nan)
    for ti, task in enumerate(tasks):
        for si, step in enumerate(steps):
            for li, lang in enumerate(languages):
                res = ap_fn(get(task, SPEECH, step, lang), get(task, TEXT, step, lang))
                res = res if isinstance(res, tuple) else (res, res, res)
                for v, arr in enumerate(res[:3]):
                    vals = np.asarray(arr.cpu() if isinstance(arr, torch.Tensor) else arr)
                    if vals.shape != (n_units,):
                        raise ValueError(
                            f"ap_fn output shape must be one of [({n_units},)], got "
                            f"{vals.shape!r}; return one AP per unit"
                        )
                    out[v, ti, si, li] = vals
    dims = ("task", "step", "language", UNIT)
    coords = {"task": list(tasks), "step": list(steps), "language": list(languages)}
    coords.update({c: (UNIT, v.values) for c, v in units.coords.items() if v.dims == (UNIT,)})
    names = ("ap", "ap_lo", "ap_hi")
    return xr.Dataset({n: (dims, out[i]) for i, n in enumerate(names)}, coords=coords)
