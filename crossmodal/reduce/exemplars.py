"""Exemplars: the examples on which each selected unit takes its highest and lowest values.

The exact pass re-runs every example of every (task, modality); there each work unit keeps,
per (family, step, pooling) and per *member* unit (a unit some scope's plan holds surely in
or as a candidate, so a superset of the final sets), the ``n`` highest and ``n`` lowest values
and which example gave them (:class:`Extremes`: ``[n, member]`` arrays, never all values).
The driver merges the work units of a pair (:class:`PairExemplars`, keeping only the example
texts still referenced), writes each finished pair under ``exact/<family>/exemplars`` (so a
resumed pass loses nothing), and the sets pass keeps the units of the final sets in
``exemplars/<family>`` (:func:`exemplar_dataset`).

Order: higher value first for ``top``, lower first for ``bottom``; equal values keep the
example that came first in the plan (work unit, then row). Every language of the pair's
examples competes: the ``language`` column says which language each exemplar is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr
import zarr

from crossmodal.store.datasets import read_dataset, write_dataset
from crossmodal.store.names import exact_group, exemplars_group

N_EXEMPLARS = 5
"""Examples kept per unit and side (highest values, lowest values)."""
SIDES = ("top", "bottom")
ROW_BITS = 20
"""A global example reference is ``part << ROW_BITS | row``: rows per work unit < 2**20."""
TEXTS = ("example_id", "language", "input", "output")
"""What is kept of each exemplar besides its value."""
PAIRS = "exemplars"
"""Subgroup of ``exact/<family>``: one group per finished (task, modality, step, pooling)."""


def _keep(values: np.ndarray, refs: np.ndarray, n: int, sign: float) -> tuple[np.ndarray, ...]:
    """Per column, the ``n`` rows with the highest ``sign * value`` (ties: lower ref first;
    NaN values are empty slots and go last)."""
    key = np.where(np.isnan(values), np.inf, -sign * values)
    order = np.lexsort((refs, key), axis=0)[:n]
    return np.take_along_axis(values, order, 0), np.take_along_axis(refs, order, 0)


@dataclass
class Extremes:
    """The ``n`` highest and lowest values of each of ``units`` and the example references
    that gave them (``-1`` / NaN where fewer than ``n`` examples were seen)."""

    units: np.ndarray
    top: np.ndarray
    top_ref: np.ndarray
    bottom: np.ndarray
    bottom_ref: np.ndarray

    @classmethod
    def empty(cls, units: np.ndarray, n: int = N_EXEMPLARS) -> Extremes:
        shape = (n, len(units))
        nan, none = np.full(shape, np.nan, np.float32), np.full(shape, -1, np.int64)
        return cls(np.asarray(units, np.int64), nan, none, nan.copy(), none.copy())

    @property
    def n(self) -> int:
        return self.top.shape[0]

    def update(self, values: np.ndarray, refs: np.ndarray) -> None:
        """Fold ``values [example, unit]`` whose examples have references ``refs [example]``
        (all larger than any reference folded before, for the tie order)."""
        values = np.asarray(values, np.float32)
        refs = np.broadcast_to(np.asarray(refs, np.int64)[:, None], values.shape)
        self._fold(values, refs)

    def merge(self, other: Extremes) -> None:
        """Fold another's extremes of the same units (references already global)."""
        if not np.array_equal(self.units, other.units):
            raise ValueError("units must be one of [identical], got different member units")
        self._fold(other.top, other.top_ref)
        self._fold(other.bottom, other.bottom_ref)

    def _fold(self, values: np.ndarray, refs: np.ndarray) -> None:
        for side, sign in (("top", 1.0), ("bottom", -1.0)):
            v = np.concatenate([getattr(self, side), values])
            r = np.concatenate([getattr(self, f"{side}_ref"), refs])
            kept, kept_ref = _keep(v, r, self.n, sign)
            setattr(self, side, kept)
            setattr(self, f"{side}_ref", kept_ref)

    def shifted(self, offset: int) -> Extremes:
        """A copy with every reference moved by ``offset`` (part-local -> global)."""
        move = lambda r: np.where(r >= 0, r + offset, -1)  # noqa: E731
        return Extremes(
            self.units, self.top, move(self.top_ref), self.bottom, move(self.bottom_ref)
        )

    def refs(self) -> np.ndarray:
        """The references in use."""
        both = np.concatenate([self.top_ref.ravel(), self.bottom_ref.ravel()])
        return np.unique(both[both >= 0])


@dataclass
class PairExemplars:
    """The merged extremes of one (task, modality) per (family, step, pooling) slot, and the
    texts of the examples they reference (pruned to those after every merge)."""

    extremes: dict[tuple[str, object], Extremes] = field(default_factory=dict)
    examples: dict[int, tuple[str, str, str, str]] = field(default_factory=dict)

    def add(
        self,
        part: int,
        language: str,
        extremes: Mapping[tuple[str, object], Extremes],
        examples: Sequence[tuple[str, str, str]],
    ) -> None:
        """Merge one work unit: ``examples[row] = (id, input, output)``."""
        offset = part << ROW_BITS
        for key, ex in extremes.items():
            moved = ex.shifted(offset)
            if key in self.extremes:
                self.extremes[key].merge(moved)
            else:
                self.extremes[key] = moved
        for row, (eid, text, out) in enumerate(examples):
            self.examples[offset + row] = (eid, language, text, out)
        used = set().union(*(set(e.refs().tolist()) for e in self.extremes.values()))
        self.examples = {r: t for r, t in self.examples.items() if r in used}


def _pair_name(key: str, step: int, pooling: str) -> str:
    return f"{key.replace('/', '.')}.{step}.{pooling}"


def write_pair(store: str, family: str, key: str, pair: PairExemplars) -> None:
    """Write a finished pair's extremes of ``family`` under ``exact/<family>/exemplars``:
    ``value``/``ref`` ``[side, rank, unit]`` and the referenced examples' texts."""
    refs = np.array(sorted(pair.examples), np.int64)
    table = np.array([pair.examples[r] for r in refs], dtype=object).reshape(-1, 4)
    for (fam, slot), ex in pair.extremes.items():
        if fam != family:
            continue
        ds = xr.Dataset(
            {
                "value": (("side", "rank", "unit"), np.stack([ex.top, ex.bottom])),
                "ref": (("side", "rank", "unit"), np.stack([ex.top_ref, ex.bottom_ref])),
                **{name: ("example", table[:, i].astype(str)) for i, name in enumerate(TEXTS)},
            },
            coords={"side": list(SIDES), "unit": ex.units, "example": refs},
        )
        path = f"{exact_group(family)}/{PAIRS}/{_pair_name(key, slot.step, slot.pooling)}"
        write_dataset(store, path, ds.assign_attrs(key=key, step=slot.step, pooling=slot.pooling))


def _pair_frames(store: str, family: str) -> dict[tuple[str, str, int, str], xr.Dataset]:
    """The written pairs, keyed by (task, modality, step, pooling)."""
    try:
        sub = zarr.open_group(store, path=f"{exact_group(family)}/{PAIRS}", mode="r")
    except FileNotFoundError:
        return {}
    out = {}
    for name in sub.group_keys():
        ds = read_dataset(store, f"{exact_group(family)}/{PAIRS}/{name}")
        task, modality = ds.attrs["key"].split("/")
        out[(task, modality, int(ds.attrs["step"]), str(ds.attrs["pooling"]))] = ds
    return out


def exemplar_dataset(store: str, family: str, sets: xr.DataArray) -> xr.Dataset:
    """``[pooling, task, modality, step, unit, side, rank]`` exemplars of the units of the
    final top and bottom sets (any scope and language) of each (pooling, task, modality,
    step): ``value`` (NaN where none) and the texts of :data:`TEXTS` ("" where none)."""
    pairs = _pair_frames(store, family)
    top_bottom = sets.sel(kind=list(SIDES)).values
    units = np.unique(top_bottom[top_bottom >= 0])
    dims = ("pooling", "task", "modality", "step")
    labels = {d: sets[d].values for d in dims}
    n = max([ds.sizes["rank"] for ds in pairs.values()], default=N_EXEMPLARS)
    shape = (*(len(v) for v in labels.values()), units.size, len(SIDES), n)
    value = np.full(shape, np.nan, np.float32)
    texts = {name: np.full(shape, "", dtype=object) for name in TEXTS}
    for (task, modality, step, pooling), ds in pairs.items():
        if pooling not in labels["pooling"] or task not in labels["task"]:
            continue
        at = tuple(
            int(np.flatnonzero(labels[d] == v)[0])
            for d, v in zip(dims, (pooling, task, modality, step), strict=True)
        )
        chosen = sets.isel(dict(zip(dims, at, strict=True))).sel(kind=list(SIDES)).values
        keep = np.intersect1d(chosen[chosen >= 0], ds["unit"].values)
        _fill(value, texts, at, np.searchsorted(units, keep), ds.sel(unit=keep).load())
    full = (*dims, "unit", "side", "rank")
    data = {"value": (full, value), **{k: (full, v.astype(str)) for k, v in texts.items()}}
    coords = {**labels, "unit": units, "side": list(SIDES), "rank": np.arange(n)}
    return xr.Dataset(data, coords=coords).assign_attrs(n=int(n))


def _fill(
    value: np.ndarray,
    texts: dict[str, np.ndarray],
    at: tuple[int, ...],
    cols: np.ndarray,
    ds: xr.Dataset,
) -> None:
    """Put one pair-slot's extremes of the chosen units (``ds``, unit-selected) into place."""
    v = ds["value"].transpose("unit", "side", "rank").values
    ref = ds["ref"].transpose("unit", "side", "rank").values
    value[(*at, cols)] = v
    row = np.searchsorted(ds["example"].values, ref)
    has = ref >= 0
    for name in TEXTS:
        col = np.asarray(ds[name].values, dtype=object)
        picked = np.where(has, col[np.clip(row, 0, max(0, col.size - 1))] if col.size else "", "")
        texts[name][(*at, cols)] = picked


def write_exemplars(store: str, family: str, sets: xr.DataArray) -> xr.Dataset:
    """Write ``exemplars/<family>`` from the pairs the exact pass wrote; returns it."""
    ds = exemplar_dataset(store, family, sets)
    write_dataset(store, exemplars_group(family), ds)
    return ds
