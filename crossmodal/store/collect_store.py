"""The collect driver's handle on its store: open or create it, record progress, merge, finish.

Only the driver writes metadata and the merged ``stats`` (:mod:`crossmodal.store.layout` says
who writes what). :class:`CollectStore` is all of that: it resumes the store of this config
and plan or creates it, records each pilot's edges and each work unit's part in the
``manifest`` AFTER its writer returned (so a half-written part is redone on resume), merges
every condition whose parts are all done, and writes the final attributes.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from crossmodal.collect.plan import Plan, applies
from crossmodal.model.units import UnitIndex
from crossmodal.stats.concentration import GiniStats
from crossmodal.stats.running import UnitStats, merge_all
from crossmodal.store import names
from crossmodal.store.layout import (
    GINI,
    MOMENTS,
    SCALARS,
    StoreDims,
    UnitCoords,
    create_store,
    has_concentration,
    jsonable,
    manifest,
    open_existing,
)

COUNTS = ("n_examples", "n_skipped", "n_rows", "n_ended")
"""Per-condition counts the driver sums from its parts' summaries."""
_PACKAGES = ("crossmodal", "torch", "transformers", "zarr", "numpy", "ray", "xarray")


def store_dims(plan: Plan) -> StoreDims:
    """The labelled axes of the store of ``plan``; one part per work unit."""
    c = plan.config
    parts = tuple(
        (w.condition.task, w.condition.modality, w.condition.language, w.shard)
        for w in plan.work_units
    )
    return StoreDims(c.tasks, c.modalities, c.languages, c.steps, c.poolings, c.n_bins, parts)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the numbers (``absent`` if missing)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def now() -> str:
    """The current UTC time, to the second, as the store's attrs record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class CollectStore:
    """The store of one collect run, as its driver writes it.

    Args:
        root: the store's root group, open for writing.
        dims: its labelled axes.
    """

    def __init__(self, root: zarr.Group, dims: StoreDims) -> None:
        self.root = root
        self.dims = dims

    @classmethod
    def open(cls, path: str | Path, plan: Plan, index: UnitIndex) -> CollectStore:
        """Resume the store of ``plan`` at ``path``, or create it (arrays, plan, provenance).

        Raises:
            StoreError: the path holds another layout version, config or plan's store, or
                something that is not a store.
        """
        config, dims = plan.config, store_dims(plan)
        root = open_existing(path, config_hash=config.hash(), plan_hash=plan.hash)
        if root is None:
            units = {f: UnitCoords.from_index(index, f) for f in index.families}
            attrs = {
                "config": config.to_dict(),
                "config_hash": config.hash(),
                "created": now(),
                "plan_hash": plan.hash,
                "provenance": {"packages": package_versions(), "host": platform.node()},
            }
            root = create_store(path, dims=dims, units=units, plan=plan.to_dict(), attrs=attrs)
        return cls(root, dims)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest(self) -> dict[str, Any]:
        """Done ``parts`` and ``edges`` (their summaries by key), ``merged`` condition keys."""
        return manifest(self.root)

    def mark_edges(self, task: str, modality: str, summary: Mapping[str, Any]) -> None:
        """Record that the edges of (task, modality) are written."""
        self._record("edges", names.condition_key(task, modality), summary)

    def mark_part(self, part: int, summary: Mapping[str, Any]) -> None:
        """Record that work unit ``part`` is written."""
        self._record("parts", str(part), summary)

    def _record(self, what: str, key: str, summary: Mapping[str, Any]) -> None:
        done = dict(self.manifest[what])
        done[key] = jsonable(summary)
        self.root[names.MANIFEST].attrs[what] = done

    def finish(self, attrs: Mapping[str, Any]) -> None:
        """Write the final root attributes (finish time, provenance)."""
        self.root.attrs.update(jsonable(attrs))

    # ------------------------------------------------------------------ merge

    def merge_ready(self, plan: Plan, *, keep_parts: bool) -> None:
        """Merge every condition of ``plan`` whose parts are all done and not merged yet."""
        done, merged = self.manifest["parts"], set(self.manifest["merged"])
        for cond in plan.conditions:
            units = plan.units_of(cond)
            if cond.key in merged or any(str(w.index) not in done for w in units):
                continue
            summaries = [done[str(w.index)] for w in units]
            counts = {k: np.sum([s[k] for s in summaries], axis=0).tolist() for k in COUNTS}
            self.merge_condition(
                cond.task,
                cond.modality,
                cond.language,
                families=[f for f in plan.config.families if applies(f, cond.modality)],
                parts=[w.index for w in units],
                counts=counts,
                keep_parts=keep_parts,
            )

    def merge_condition(
        self,
        task: str,
        modality: str,
        language: str,
        *,
        families: Sequence[str],
        parts: Sequence[int],
        counts: Mapping[str, Any],
        keep_parts: bool,
    ) -> None:
        """Chan-merge ``parts`` into ``stats/<family>[task, modality, language]``.

        ``counts``: n_examples, n_skipped (ints) and n_rows, n_ended (per step) of the
        condition. Parts are read in unit blocks (the arrays' chunks); each merged (step,
        pooling) is written as whole shards in one call (a partial write would
        read-modify-write the shard once per block). Parts are deleted afterwards unless
        ``keep_parts``.
        """
        at = self.dims.index(task, modality, language)
        conc = has_concentration(self.root)
        if conc is not None and conc in families:  # before "merged" is marked: redone on resume
            self._merge_concentration(conc, at, parts)
        for family in families:
            self._merge_family(family, at, parts, counts)
            if not keep_parts:
                self._delete_parts(family, parts)
        key = names.condition_key(task, modality, language)
        self.root[names.MANIFEST].attrs["merged"] = sorted({*self.manifest["merged"], key})

    def _merge_concentration(self, family: str, at: tuple[int, ...], parts: Sequence[int]) -> None:
        """The per-layer Gini sums of ``parts`` into the condition at ``at``."""
        pg = self.root[names.concentration_parts(family)]
        cg = self.root[names.concentration_group(family)]
        pieces = [GiniStats.from_numpy({k: pg[k][q] for k in GINI}) for q in parts]
        total = pieces[0]
        for piece in pieces[1:]:
            total = total.merge(piece)
        for k, v in total.to_numpy().items():
            cg[k][at] = v

    def _merge_family(
        self,
        family: str,
        at: tuple[int, ...],
        parts: Sequence[int],
        counts: Mapping[str, Any],
    ) -> None:
        """One family's parts into ``stats`` at ``at``, one (step, pooling) at a time."""
        pg, sg = self.root[names.parts_group(family)], self.root[names.stats_group(family)]
        edges = self.root[names.edges_array(family)]
        for si, pi in np.ndindex(len(self.dims.steps), len(self.dims.poolings)):
            scalars = {k: [np.asarray(pg[k][q, si, pi]) for q in parts] for k in SCALARS}
            merged = _merge_cell(pg, sg, edges, (*at[:2], si, pi), parts, scalars)
            for k, values in merged.items():
                sg[k][(*at, si, pi)] = values
            for k in SCALARS:
                sg[k][(*at, si, pi)] = int(sum(scalars[k]))
        for k in COUNTS:
            sg[k][at] = np.asarray(counts[k], dtype=np.int64)

    def _delete_parts(self, family: str, parts: Sequence[int]) -> None:
        """Drop the parts' shards (whole ``c/<part>`` directories): stats now hold their sums."""
        for name in (*MOMENTS, "hist"):
            for q in parts:
                sync(self.root.store.delete_dir(names.part_chunks(family, name, q)))


def _merge_cell(
    pg: zarr.Group,
    sg: zarr.Group,
    edges: zarr.Array,
    cell: tuple[int, int, int, int],
    parts: Sequence[int],
    scalars: Mapping[str, list[np.ndarray]],
) -> dict[str, np.ndarray]:
    """The merged moments and histogram of one (task, modality, step, pooling) cell over
    ``parts``, read one unit block (the arrays' chunk) at a time."""
    big = (*MOMENTS, "hist")
    si, pi = cell[2:]
    n_units, block = pg["mean"].shape[-1], pg["mean"].chunks[-1]
    out = {k: np.empty(sg[k].shape[5:], sg[k].dtype) for k in big}
    for start in range(0, n_units, block):
        sl = slice(start, min(start + block, n_units))
        pieces = [
            UnitStats.from_numpy(
                {
                    "edges": edges[(*cell, sl)],
                    **{k: scalars[k][j] for k in SCALARS},
                    **{k: pg[k][q, si, pi, sl] for k in big},
                }
            )
            for j, q in enumerate(parts)
        ]
        merged = merge_all(pieces).to_numpy()
        for k in big:
            out[k][sl] = merged[k]
    return out
