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

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
import zarr

from crossmodal.store.datasets import put_array, unicode, write_dataset
from crossmodal.store.location import zarr_store
from crossmodal.store.names import exact_group, exemplars_group

N_EXEMPLARS = 5
"""Examples kept per unit and side (highest values, lowest values)."""
SIDES = ("top", "bottom")
ROW_BITS = 20
"""A global example reference is ``part << ROW_BITS | row``: rows per work unit < 2**20."""
TEXTS = ("example_id", "language", "input", "output")
"""What is kept of each exemplar besides its value."""
PAIRS = "exemplars"
"""Subgroup of ``exact/<family>``: the arrays of every finished (task, modality, step,
pooling), prefixed ``<task>.<modality>.<step>.<pooling>.``."""
DIMS = ("side", "rank", "unit")


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
        """Fold another's extremes of the same units (references already global): the top-n
        of the union is the top-n of both tops, likewise the bottom."""
        if not np.array_equal(self.units, other.units):
            raise ValueError("units must be one of [identical], got different member units")
        self._fold(other.top, other.top_ref, ("top",))
        self._fold(other.bottom, other.bottom_ref, ("bottom",))

    def _fold(self, values: np.ndarray, refs: np.ndarray, sides: Sequence[str] = SIDES) -> None:
        for side in sides:
            v = np.concatenate([getattr(self, side), values])
            r = np.concatenate([getattr(self, f"{side}_ref"), refs])
            kept, kept_ref = _keep(v, r, self.n, 1.0 if side == "top" else -1.0)
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
    """Write a finished pair's extremes of ``family`` into ``exact/<family>/exemplars``, per
    slot ``<task>.<modality>.<step>.<pooling>``: arrays ``<slot>.value`` / ``<slot>.ref``
    ``[side, rank, unit]``, ``<slot>.unit``, and the referenced examples (``<slot>.example``,
    the references, and one array per text of :data:`TEXTS`)."""
    refs = np.array(sorted(pair.examples), np.int64)
    table = np.array([pair.examples[r] for r in refs], dtype=object).reshape(-1, 4)
    g = zarr.open_group(zarr_store(store), path=f"{exact_group(family)}/{PAIRS}", mode="a")
    for (fam, slot), ex in pair.extremes.items():
        if fam != family:
            continue
        name = _pair_name(key, slot.step, slot.pooling)
        where = {"key": key, "step": int(slot.step), "pooling": str(slot.pooling)}
        put_array(g, f"{name}.ref", np.stack([ex.top_ref, ex.bottom_ref]), DIMS)
        put_array(g, f"{name}.unit", ex.units, ["unit"])
        put_array(g, f"{name}.example", refs, ["example"])
        for i, text in enumerate(TEXTS):
            put_array(g, f"{name}.{text}", table[:, i].astype(str), ["example"])
        put_array(g, f"{name}.value", np.stack([ex.top, ex.bottom]), DIMS, **where)


def _pair_frames(store: str, family: str) -> dict[tuple[str, str, int, str], xr.Dataset]:
    """The written pairs, keyed by (task, modality, step, pooling)."""
    try:
        g = zarr.open_group(zarr_store(store), path=f"{exact_group(family)}/{PAIRS}", mode="r")
    except FileNotFoundError:
        return {}
    out = {}
    for name, arr in g.arrays():
        if not name.endswith(".value"):
            continue  # the value array is written last: a pair without it is incomplete
        slot, a = name.removesuffix(".value"), arr.attrs
        read = lambda v: np.asarray(g[f"{slot}.{v}"][...])  # noqa: B023, E731
        ds = xr.Dataset(
            {
                "value": (DIMS, arr[...]),
                "ref": (DIMS, read("ref")),
                **{t: ("example", unicode(read(t))) for t in TEXTS},
            },
            coords={"side": list(SIDES), "unit": read("unit"), "example": read("example")},
        )
        task, modality = a["key"].split("/")
        out[(task, modality, int(a["step"]), str(a["pooling"]))] = ds
    return out


SLOT_DIMS = ("pooling", "task", "modality", "step")
"""The dims of ``exemplars/<family>`` before ``unit``: one exact-pass slot of a pair."""


@dataclass(frozen=True)
class _Layout:
    """What ``exemplars/<family>`` holds: the written pairs, the units of the final top and
    bottom sets, the slot labels and the exemplars kept per side (``n``)."""

    pairs: dict[tuple[str, str, int, str], xr.Dataset]
    units: np.ndarray
    labels: dict[str, np.ndarray]
    n: int

    @classmethod
    def of(cls, store: str, family: str, sets: xr.DataArray) -> _Layout:
        pairs = _pair_frames(store, family)
        top_bottom = sets.sel(kind=list(SIDES)).values
        units = np.unique(top_bottom[top_bottom >= 0])
        n = max([ds.sizes["rank"] for ds in pairs.values()], default=N_EXEMPLARS)
        return cls(pairs, units, {d: sets[d].values for d in SLOT_DIMS}, n)

    def shape(self, slot_dims: Sequence[str] = SLOT_DIMS) -> tuple[int, ...]:
        return (*(len(self.labels[d]) for d in slot_dims), self.units.size, len(SIDES), self.n)

    def slots(self, sets: xr.DataArray, within: tuple[slice, ...] | None = None) -> Iterator:
        """``(at, cols, ds)`` per written pair slot (inside the block ``within`` of
        :data:`SLOT_DIMS` positions only, when given): its positions along
        :data:`SLOT_DIMS`, the columns of its chosen units and their extremes (``ds``,
        unit-selected)."""
        labels = self.labels
        for (task, modality, step, pooling), ds in self.pairs.items():
            if pooling not in labels["pooling"] or task not in labels["task"]:
                continue
            at = tuple(
                int(np.flatnonzero(labels[d] == v)[0])
                for d, v in zip(SLOT_DIMS, (pooling, task, modality, step), strict=True)
            )
            if within is not None and not all(
                b.start <= a < b.stop for a, b in zip(at, within, strict=True)
            ):
                continue
            chosen = sets.isel(dict(zip(SLOT_DIMS, at, strict=True))).sel(kind=list(SIDES)).values
            keep = np.intersect1d(chosen[chosen >= 0], ds["unit"].values)
            yield at, np.searchsorted(self.units, keep), ds.sel(unit=keep).load()


def exemplar_dataset(store: str, family: str, sets: xr.DataArray) -> xr.Dataset:
    """``[pooling, task, modality, step, unit, side, rank]`` exemplars of the units of the
    final top and bottom sets (any scope and language) of each (pooling, task, modality,
    step): ``value`` (NaN where none) and the texts of :data:`TEXTS` ("" where none), all in
    memory (:func:`write_exemplars` writes the same group a block of chunks at a time)."""
    lay = _Layout.of(store, family, sets)
    value = np.full(lay.shape(), np.nan, np.float32)
    texts = {name: np.full(lay.shape(), "", dtype=object) for name in TEXTS}
    for at, cols, ds in lay.slots(sets):
        _fill(value, texts, at, cols, ds)
    full = (*SLOT_DIMS, "unit", "side", "rank")
    data = {"value": (full, value), **{k: (full, v) for k, v in texts.items()}}
    return xr.Dataset(data, coords=_coords(lay)).assign_attrs(n=int(lay.n))


def _coords(lay: _Layout) -> dict[str, Any]:
    return {**lay.labels, "unit": lay.units, "side": list(SIDES), "rank": np.arange(lay.n)}


def write_exemplars(store: str, family: str, sets: xr.DataArray) -> str:
    """Write ``exemplars/<family>`` (:func:`exemplar_dataset`) from the pairs the exact pass
    wrote; returns the group. Memory: the float32 values, and the texts of one block of
    whole chunks along :data:`SLOT_DIMS` at a time, as object arrays of the strings (never
    fixed-width copies, which take the longest text's width in every cell: 10.6 GB at
    492,544 units; docs/benchmarks.md, "Reduce driver memory at the real shapes")."""
    lay = _Layout.of(store, family, sets)
    value = np.full(lay.shape(), np.nan, np.float32)
    for at, cols, ds in lay.slots(sets):
        value[(*at, cols)] = ds["value"].transpose("unit", "side", "rank").values
    full = (*SLOT_DIMS, "unit", "side", "rank")
    group = exemplars_group(family)
    ds = xr.Dataset({"value": (full, value)}, coords=_coords(lay)).assign_attrs(n=int(lay.n))
    write_dataset(store, group, ds)
    g = zarr.open_group(zarr_store(store), path=group, mode="r+")
    shape = lay.shape()
    arrays = {
        name: g.create_array(
            name, shape=shape, dtype=str, dimension_names=list(full), attributes={}, overwrite=True
        )
        for name in TEXTS
    }  # as :func:`crossmodal.store.datasets.put_array` creates a text array
    for block in _chunk_blocks(shape[: len(SLOT_DIMS)], arrays[TEXTS[0]].chunks):
        one = (*(b.stop - b.start for b in block), *shape[len(SLOT_DIMS) :])
        if not math.prod(one):
            continue  # nothing to write (no units): as put_array, which skips empty data
        texts = {name: np.full(one, "", dtype=object) for name in TEXTS}
        spare = np.zeros(one, np.float32)  # _fill's values of this block (already written)
        for at, cols, pair in lay.slots(sets, block):
            _fill(
                spare, texts, tuple(a - b.start for a, b in zip(at, block, strict=True)), cols, pair
            )
        for name, arr in arrays.items():
            arr[block] = texts[name]
    return group


def _chunk_blocks(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The blocks of whole chunks along the leading dims ``shape`` (chunk sizes ``chunks``):
    each write of one block replaces whole chunks (no read-modify-write)."""
    chunks = chunks[: len(shape)]
    grid = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for starts in itertools.product(*grid):
        yield tuple(slice(a, min(a + c, n)) for a, c, n in zip(starts, chunks, shape, strict=True))


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
