"""Selected unit sets (top-k / bottom-k / both by AP), made exact despite histogram AP.

Input convention (shared by selection, roles, overlap and report): an ``xr.Dataset``
"selectivity" with variables ``ap``, ``ap_lo``, ``ap_hi``, ``auroc``, ``on_p50``, ``on_p90``,
``off_mean`` over dims ``(task, modality, step, language, unit)``; NaN where a condition does
not exist (en2x has no ``eng``, asr has no ``text``). The ``unit`` dim carries coordinates
``layer`` (int, -1 outside layers, e.g. the final norm), ``submodule`` (``self_attn``,
``cross_attn``, ``ffn`` or ``other``), ``site`` (module path) and ``feature`` (int), and may
carry an integer ``unit`` coordinate (the flat unit index); without it positions are used.

Sets are unit ids (``unit`` coordinate values), not masks, so memory grows with k, not with
the units: :func:`select_sets` returns int64 ``[*condition dims, kind, rank]``, -1 padded.
``top`` lists units best first, ``bottom`` worst first, ``both`` is top then the bottom
units not already in top (the reference's top-k + bottom-k union).

Ties (deterministic, unlike the reference's unstable ``sort_values``): by AP, then by the
smaller unit id, for top-k and bottom-k alike. Units with NaN AP are never selected.

Exact selection (docs/method.md, "Selectivity"): histogram AP only brackets the exact AP,
which lies in ``[ap_lo, ap_hi]``, so the sets histogram AP ranks need not be the sets exact
AP ranks. :func:`plan_exact` splits each condition's units into certainly in the top-k,
certainly out, and *candidates* (in the top-k for some values inside the intervals, out for
others); the candidates of all conditions are stored one after another (ragged), since their
number varies by orders of magnitude between conditions. The reduce job measures exact AP
for the candidates and the certain members (its exact pass); :func:`finalize_selection`
then returns the sets exact AP would select.
Membership is exact; within a set, units are ordered by exact AP where it was measured (every
member, in the reduce job) and by histogram ``ap`` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from crossmodal.store.location import upath, write_whole

UNIT = "unit"
KINDS = ("top", "bottom", "both")
SIDES = ("top", "bottom")
_PLAN_VARS = ("certain", "certain_ap", "candidate", "candidate_lo", "candidate_hi")
CANDIDATE_VARS = _PLAN_VARS[2:]
"""The plan's ragged variables, over its ``entry`` dim (:func:`plan_exact`)."""
GROUPS = {
    "all": None,
    "attention": ("self_attn", "cross_attn"),
    "self_attn": ("self_attn",),
    "cross_attn": ("cross_attn",),
    "ffn": ("ffn",),
    "dynamic": None,
}
"""Unit groups a ranking can run over: submodule groups, and ``dynamic`` (every unit whose
value can depend on the decoding step: all but the ``step_invariant`` ones, the
cross-attention k/v projections of the encoder output; docs/method.md, "Units"). A scope is a
group, optionally restricted to one layer: ``ffn@3`` ranks layer 3's FFN units only
(``group@*``: one scope per layer)."""
STEP_DEPENDENT = "dynamic"
"""The group that leaves the step-invariant units out."""


def parse_scope(scope: str) -> tuple[str, int | None]:
    """``"group"`` or ``"group@layer"`` -> ``(group, layer or None)``."""
    group, at, layer = str(scope).partition("@")
    if group not in GROUPS or (at and not layer.isdigit()):
        raise ValueError(
            f"scope must be one of {list(GROUPS)}, optionally with '@<layer>' or '@*', got "
            f"{scope!r}; e.g. ffn or all@3"
        )
    return group, int(layer) if at else None


def expand_scopes(scopes: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Scopes with every ``group@*`` replaced by ``group@L`` for each layer in ``layers``;
    each checked by :func:`parse_scope`; duplicates dropped, order kept."""
    out: list[str] = []
    for scope in scopes:
        group, at, rest = str(scope).partition("@")
        names = [f"{group}@{layer}" for layer in layers] if at and rest == "*" else [scope]
        for name in names:
            parse_scope(name)
            if name not in out:
                out.append(name)
    return out


CSV_COLUMNS = ("ap", "on_p50", "on_p90", "off_mean", "layer", "unit", "site", "feature")
"""Columns of the reference expertise files plus module path and feature. Note: in the
reference, ``layer`` is the module path and ``unit`` the feature; here ``layer`` is the layer
number, ``unit`` the flat unit id, ``site`` the module path and ``feature`` the feature."""


def unit_ids(obj: xr.Dataset | xr.DataArray) -> np.ndarray:
    """Unit ids (int64): the ``unit`` coordinate, or positions when it is absent."""
    if UNIT in obj.coords:
        ids = np.asarray(obj[UNIT].values)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"unit coordinate dtype must be one of [integer], got {ids.dtype!r}; "
                "use the flat unit index as the unit coordinate"
            )
        return ids.astype(np.int64)
    return np.arange(obj.sizes[UNIT], dtype=np.int64)


def scope_mask(
    obj: xr.Dataset | xr.DataArray, group: str = "all", layer: int | None = None
) -> np.ndarray:
    """Bool ``[unit]``: units of a group (:data:`GROUPS`) and optional layer."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {list(GROUPS)}, got {group!r}; pick a group")
    mask = np.ones(obj.sizes[UNIT], dtype=bool)
    if group == STEP_DEPENDENT:
        if "step_invariant" not in obj.coords:
            raise ValueError(
                f"scope {group!r} must be one of [scopes of data with a step_invariant unit "
                "coordinate], got none; reduce the store again with this version"
            )
        mask &= ~np.asarray(obj["step_invariant"].values, dtype=bool)
    if GROUPS[group] is not None:
        mask &= np.isin(np.asarray(obj["submodule"].values).astype(str), GROUPS[group])
    if layer is not None:
        layers = np.asarray(obj["layer"].values)
        if layer not in set(layers.tolist()):
            raise ValueError(
                f"layer must be one of {sorted(set(layers.tolist()))}, got {layer!r}; "
                "pick a layer of the unit coordinate"
            )
        mask &= layers == layer
    return mask


def _tie_ranks(ids: np.ndarray) -> np.ndarray:
    """Rank of each (unique) id among ``ids``, 0 = smallest: the tie-break order."""
    return np.argsort(np.argsort(ids, kind="stable"), kind="stable")


def iter_conditions(da: xr.DataArray, dims: Sequence[str]) -> Iterator[dict[str, int]]:
    """Every combination of positions along ``dims``, as ``isel`` dicts (one load at a time)."""
    for idx in np.ndindex(*(da.sizes[d] for d in dims)):
        yield dict(zip(dims, idx, strict=True))


def _cond_dims(da: xr.DataArray) -> list[str]:
    if UNIT not in da.dims:
        raise ValueError(f"dims must be one of [.. with 'unit'], got {da.dims!r}; pass unit data")
    return [d for d in da.dims if d != UNIT]


def _pad(rows: list[np.ndarray], width: int, fill: float) -> np.ndarray:
    dtype = np.int64 if isinstance(fill, int) else np.float64
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def _labelled(
    template: xr.DataArray, dims: list[str], flat: np.ndarray, extra: dict[str, Sequence]
) -> xr.DataArray:
    """Reshape ``[n_cond * prod(extra), width]`` rows into a labelled DataArray."""
    shape = [template.sizes[d] for d in dims] + [len(v) for v in extra.values()]
    coords = {d: template[d].values for d in dims if d in template.coords}
    coords.update({k: list(v) for k, v in extra.items() if k != "rank" and k != "slot"})
    return xr.DataArray(flat.reshape(*shape), dims=[*dims, *extra], coords=coords)


def _top_k(values: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best (largest value, then smallest id), best first; O(n + k log k)."""
    fin = np.flatnonzero(np.isfinite(values))
    v, i = values[fin], ids[fin]
    if v.size > k:
        thr = -np.partition(-v, k - 1)[k - 1]
        strict = np.flatnonzero(v > thr)
        eq = np.flatnonzero(v == thr)
        eq = eq[np.argsort(i[eq], kind="stable")][: k - strict.size]
        keep = np.concatenate([strict, eq])
    else:
        keep = np.arange(v.size)
    order = np.lexsort((i[keep], -v[keep]))
    return fin[keep[order]]


def _classify(lo: np.ndarray, hi: np.ndarray, tie: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """(certainly in, candidate) bool masks for top-k of values known to lie in [lo, hi].

    j beats i when (v_j, -tie_j) > (v_i, -tie_i). Values and ties pack into one int64 score
    per endpoint (dense value rank * m + reversed tie), so counts are binary searches. i is
    surely in when fewer than k units could beat it (v_i = lo_i, others at hi), and surely
    out when at least k surely beat it (v_i = hi_i, others at lo). Only units with hi >= T,
    the k-th largest lo, are counted: the others are surely out (k units have lo >= T) and
    cannot beat a unit with lo >= T, while a kept unit with lo < T has k kept units that
    could beat it. So work and memory scale with k + candidates, not with n.
    """
    n = lo.size
    certain, cand = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if n <= k:
        return ~certain, cand
    keep = np.flatnonzero(hi >= np.partition(lo, n - k)[n - k])
    lo, hi, m = lo[keep], hi[keep], keep.size
    _, inv = np.unique(np.concatenate([lo, hi]), return_inverse=True)
    rev = (m - 1 - _tie_ranks(tie[keep])).astype(np.int64)
    s_lo = inv[:m].astype(np.int64) * m + rev
    s_hi = inv[m:].astype(np.int64) * m + rev
    could = m - np.searchsorted(np.sort(s_hi), s_lo, side="right") - (s_hi > s_lo)
    surely = m - np.searchsorted(np.sort(s_lo), s_hi, side="right")
    certain[keep] = could < k
    cand[keep] = (could >= k) & (surely < k)
    return certain, cand


def _union(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    return np.concatenate([top, bottom[~np.isin(bottom, top)]])


def check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be one of [int >= 1], got {k!r}; use e.g. k=1000")


def select_sets(
    ap: xr.DataArray, *, k: int = 1000, group: str = "all", layer: int | None = None
) -> xr.DataArray:
    """Top-k, bottom-k and both sets per condition, as unit ids (-1 padded).

    Args:
        ap: AP over ``unit`` and any condition dims (with the unit coordinates).
        k: units per side.
        group: ``all``, ``attention`` (self+cross attention) or ``ffn``.
        layer: restrict the pool to one layer (None: every layer).

    Returns:
        int64 DataArray ``[*condition dims, kind, rank]`` with ``rank`` of length 2k; attrs
        ``k``, ``group`` and ``layer`` (``"all"`` when unrestricted; see :func:`scope_of`).
    """
    check_k(k)
    dims = _cond_dims(ap)
    pos = np.flatnonzero(scope_mask(ap, group, layer))
    ids = unit_ids(ap)[pos]
    rows: list[np.ndarray] = []
    for cond in iter_conditions(ap, dims):
        vec = np.asarray(ap.isel(cond).values, dtype=np.float64)[pos]
        top = ids[_top_k(vec, ids, k)]
        bottom = ids[_top_k(-vec, ids, k)]
        rows += [top, bottom, _union(top, bottom)]
    out = _labelled(ap, dims, _pad(rows, 2 * k, -1), {"kind": KINDS, "rank": range(2 * k)})
    out.attrs.update(_scope_attrs(k, group, layer))
    return out.rename("units")


def _scope_attrs(k: int, group: str, layer: int | None) -> dict:
    return {"k": int(k), "group": group, "layer": "all" if layer is None else int(layer)}


def scope_of(sets: xr.DataArray | xr.Dataset) -> tuple[int, str, int | None]:
    """(k, group, layer) a set or plan was selected with, read back from its attrs."""
    layer = sets.attrs["layer"]
    return int(sets.attrs["k"]), str(sets.attrs["group"]), None if layer == "all" else int(layer)


def set_ids(sets: xr.DataArray, **where: str | int) -> np.ndarray:
    """The unit ids of one set, e.g. ``set_ids(sets, task="x2en", ..., kind="top")``."""
    row = np.asarray(sets.sel(where).values)
    if row.ndim != 1:
        raise ValueError(
            f"where must be one of [a full condition + kind], got {where!r}; name every dim "
            f"of {sets.dims!r} except rank"
        )
    return row[row >= 0]


def plan_exact(
    ds: xr.Dataset,
    *,
    k: int = 1000,
    group: str = "all",
    layer: int | None = None,
    widen: float = 0.0,
) -> xr.Dataset:
    """Units surely in the top/bottom-k, and the candidates needing exact AP, per condition.

    Args:
        ds: selectivity dataset with ``ap``, ``ap_lo``, ``ap_hi``.
        widen: added to both sides of every interval (absorbs rounding between the
            histogram bounds and the exact pass; 0 when the bounds are guaranteed).

    Returns:
        Dataset with ``certain`` / ``certain_ap`` ``[*conditions, side, rank]`` (k ranks; ids
        padded with -1, values with NaN) and the candidates, ragged: ``candidate`` /
        ``candidate_lo`` / ``candidate_hi`` over ``entry``, the rows of ``[*conditions,
        side]`` one after another in C order, each row's ``candidate_count`` entries from
        ``candidate_start``. Memory: k per row plus the candidates (a padded layout would be
        as wide as the condition with the most: 5x the memory at the real shapes,
        docs/benchmarks.md, "Reduce driver memory at the real shapes"). Read a row with
        :func:`plan_candidates`.
    """
    check_k(k)
    if not widen >= 0:
        raise ValueError(f"widen must be one of [>= 0], got {widen!r}; pass a margin >= 0")
    dims = _cond_dims(ds["ap"])
    pos = np.flatnonzero(scope_mask(ds, group, layer))
    ids = unit_ids(ds)[pos]
    rows: dict[str, list[np.ndarray]] = {n: [] for n in _PLAN_VARS}
    for cond in iter_conditions(ds["ap"], dims):
        v, lo, hi = (
            np.asarray(ds[n].isel(cond).values, np.float64)[pos] for n in ("ap", "ap_lo", "ap_hi")
        )
        ok = np.isfinite(v) & np.isfinite(lo) & np.isfinite(hi)
        if np.any(lo[ok] > hi[ok]):
            raise ValueError(
                f"ap_lo must be one of [<= ap_hi], got ap_lo > ap_hi at {cond!r}; fix the bounds"
            )
        fin = np.flatnonzero(ok)
        tie = _tie_ranks(ids[fin])
        for sign in (1.0, -1.0):  # bottom-k is top-k of -AP with [lo, hi] -> [-hi, -lo]
            a, b = (lo, hi) if sign > 0 else (-hi, -lo)
            surely, maybe = _classify(a[fin] - widen, b[fin] + widen, tie, k)
            c, m = fin[surely], fin[maybe]
            c = c[np.lexsort((ids[c], -sign * v[c]))]
            for name, vals in zip(_PLAN_VARS, (ids[c], v[c], ids[m], lo[m], hi[m]), strict=True):
                rows[name].append(vals)
    out = xr.Dataset()
    for name in ("certain", "certain_ap"):
        padded = _pad(rows[name], k, -1 if name == "certain" else np.nan)
        out[name] = _labelled(ds["ap"], dims, padded, {"side": SIDES, "rank": range(k)})
    out = out.assign(_ragged(rows, ds["ap"], dims))
    out.attrs.update(_scope_attrs(k, group, layer), widen=float(widen))
    return out


def _ragged(rows: dict[str, list[np.ndarray]], template: xr.DataArray, dims: list[str]) -> dict:
    """The candidate rows of :func:`plan_exact`, one after another, with start and count."""
    count = np.array([c.size for c in rows["candidate"]], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    out: dict = {
        name: _labelled(template, dims, flat, {"side": SIDES})
        for name, flat in (("candidate_start", start), ("candidate_count", count))
    }
    for name in CANDIDATE_VARS:
        empty = np.zeros(0, np.int64 if name == "candidate" else np.float64)
        out[name] = ("entry", np.concatenate([empty, *rows[name]]))
    return out


def plan_candidates(plan: xr.Dataset, at: dict[str, int]) -> tuple[np.ndarray, ...]:
    """One row's candidate ids, ``candidate_lo`` and ``candidate_hi``; ``at``: positions
    along every dim of ``candidate_count`` (the conditions and ``side``)."""
    start = int(plan["candidate_start"].isel(at).values)
    stop = start + int(plan["candidate_count"].isel(at).values)
    return tuple(np.asarray(plan[n].values[start:stop]) for n in CANDIDATE_VARS)


def _entries_at(plan: xr.Dataset, at: dict[str, int]) -> np.ndarray:
    """Bool ``[entry]``: the candidates of the rows ``at`` selects (positions along some of
    the row dims; the others are all taken)."""
    count = plan["candidate_count"]
    rows = np.zeros(count.shape, dtype=bool)
    rows[tuple(at.get(d, slice(None)) for d in count.dims)] = True
    return np.repeat(rows.ravel(), np.asarray(count.values).ravel())


def exact_units(
    plan: xr.Dataset,
    by: Sequence[str] = ("task", "modality"),
    members: Sequence[str] = ("candidate",),
) -> dict[tuple, np.ndarray]:
    """Sorted unit ids to re-collect in exact mode, per value of the ``by`` dims.

    One exact pass per (task, modality) yields every step and language at once, so the
    default unions candidates over steps, languages and sides. ``members``: the plan's id
    variables to include; ``("candidate", "certain")`` also re-measures the units surely in
    a set, so every member of the final sets has an exact AP (what the reduce job does).
    """
    rows = plan["candidate_count"]
    missing = [d for d in by if d not in rows.dims]
    if missing:
        raise ValueError(f"by must be one of {list(rows.dims)}, got {missing!r}; pick plan dims")
    out: dict[tuple, np.ndarray] = {}
    for cond in iter_conditions(rows, list(by)):
        vals = np.concatenate(
            [
                np.asarray(plan[m].values)[_entries_at(plan, cond)]
                if m == "candidate"
                else np.asarray(plan[m].isel(cond).values).ravel()
                for m in members
            ]
        )
        key = tuple(rows[d].values[i].item() for d, i in cond.items())
        out[key] = np.unique(vals[vals >= 0])
    return out


def finalize_selection(plan: xr.Dataset, exact_ap: xr.DataArray) -> xr.DataArray:
    """The sets exact AP selects, from a plan and the exact AP of its candidates.

    Args:
        plan: output of :func:`plan_exact`.
        exact_ap: exact AP with the plan's condition dims and a ``unit`` dim whose
            coordinate holds unit ids; it must cover every candidate of each condition
            (other units may be absent: the exact pass only measures candidates).

    Returns:
        Sets in the layout of :func:`select_sets`.

    Raises:
        ValueError: a candidate has no finite exact AP, or exact AP lies outside its
            (widened) interval, which would void the certain/out split.
    """
    k, _, _ = scope_of(plan)
    widen = float(plan.attrs["widen"])
    dims = [d for d in plan["certain"].dims if d not in ("side", "rank")]
    lookup = pd.Index(unit_ids(exact_ap))
    rows: list[np.ndarray] = []
    for cond in iter_conditions(plan["certain"], dims):
        labels = {d: plan[d].values[i] for d, i in cond.items() if d in plan.coords}
        exact_row = None  # loaded once per condition with members
        sides = []
        for side, sign in enumerate((1.0, -1.0)):
            cert, cert_v = _valid(plan, {**cond, "side": side}, "certain", "certain_ap")
            cand, lo, hi = plan_candidates(plan, {**cond, "side": side})
            if exact_row is None and (cand.size or cert.size):
                exact_row = _exact_row(exact_ap, labels, required=bool(cand.size))
            val = _lookup(exact_row, lookup, cand)
            known = _lookup(exact_row, lookup, cert)  # exact where measured: orders the set
            cert_v = np.where(np.isfinite(known), known, cert_v)
            _check_exact(val, lo - widen, hi + widen, cand, labels)
            chosen = _top_k(sign * val, cand, k - cert.size) if k > cert.size else np.arange(0)
            members = np.concatenate([cert, cand[chosen]])
            score = np.concatenate([cert_v, val[chosen]])
            sides.append(members[np.lexsort((members, -sign * score))])
        rows += [sides[0], sides[1], _union(sides[0], sides[1])]
    out = _labelled(
        plan["certain"], dims, _pad(rows, 2 * k, -1), {"kind": KINDS, "rank": range(2 * k)}
    )
    out.attrs.update({n: plan.attrs[n] for n in ("k", "group", "layer")})
    return out.rename("units")


def _exact_row(exact_ap: xr.DataArray, labels: dict, required: bool) -> np.ndarray | None:
    """One condition's exact AP over its units; None when absent and not ``required``
    (a condition without candidates whose members were not re-measured)."""
    try:
        return np.asarray(exact_ap.sel(labels).transpose(..., UNIT).values, float)
    except KeyError:
        if required:
            raise
        return None


def _lookup(row: np.ndarray | None, index: pd.Index, ids: np.ndarray) -> np.ndarray:
    """The values of ``row`` (over ``index``'s unit ids) at ``ids``; NaN where absent."""
    if row is None or not ids.size:
        return np.full(ids.size, np.nan)
    pos = index.get_indexer(ids)
    return np.where(pos >= 0, row[np.maximum(pos, 0)], np.nan)


def _valid(plan: xr.Dataset, at: dict, ids: str, *names: str) -> tuple[np.ndarray, ...]:
    """A plan row's ids (padding dropped) and the matching values of ``names``."""
    row = np.asarray(plan[ids].isel(at).values)
    keep = row >= 0
    return (row[keep], *(np.asarray(plan[n].isel(at).values)[keep] for n in names))


def _check_exact(
    val: np.ndarray, lo: np.ndarray, hi: np.ndarray, ids: np.ndarray, where: dict
) -> None:
    bad = ~np.isfinite(val)
    if bad.any():
        raise ValueError(
            f"exact_ap must be one of [finite for every candidate], got NaN/missing for units "
            f"{ids[bad][:5].tolist()} at {where!r}; run the exact pass on exact_units(plan)"
        )
    out = (val < lo) | (val > hi)
    if out.any():
        raise ValueError(
            f"exact_ap must be one of [within [ap_lo, ap_hi]], got {val[out][:3].tolist()} for "
            f"units {ids[out][:3].tolist()} at {where!r}; the re-run does not reproduce the "
            "collected statistics: check the store with `crossmodal verify STORE` (damage: "
            "collect again), else re-plan with a larger widen"
        )


def sets_frame(ds: xr.Dataset, sets: xr.DataArray, **where: str | int) -> pd.DataFrame:
    """One set as a table with :data:`CSV_COLUMNS`, in set order.

    ``where`` names the condition and kind, e.g. ``task="x2en", modality="speech", step=1,
    language="deu", kind="top"``; the statistics are read from ``ds`` for that condition.
    """
    ids = set_ids(sets, **where)
    pos = pd.Index(unit_ids(ds)).get_indexer(ids)
    cond = {d: v for d, v in where.items() if d in ds["ap"].dims}
    sub = ds.sel(cond).isel({UNIT: pos})
    data = {c: np.asarray(sub[c].values) for c in ("ap", "on_p50", "on_p90", "off_mean", "layer")}
    data.update(
        unit=ids, site=np.asarray(sub["site"].values), feature=np.asarray(sub["feature"].values)
    )
    return pd.DataFrame(data, columns=list(CSV_COLUMNS))


def write_csv(ds: xr.Dataset, sets: xr.DataArray, path: str | Path, **where: str | int) -> Path:
    """Write :func:`sets_frame` to ``path`` (no index column, as the reference's files)."""
    path = upath(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda target: sets_frame(ds, sets, **where).to_csv(target, index=False))
    return path
