"""The collect driver's handle on its store: open or create it, record progress, merge, finish.

Only the driver writes metadata and the merged ``stats`` (:mod:`crossmodal.store.layout` says
who writes what). :class:`CollectStore` is all of that: it resumes the store of this config
and plan or creates it, records each pilot's edges and each work unit's part in the
``manifest`` AFTER its writer returned (so a half-written part is redone on resume), merges
every condition whose parts are all done, and writes the final attributes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from crossmodal.collect.config import _UNHASHED, CollectConfig
from crossmodal.collect.plan import Plan, applies
from crossmodal.model.units import UnitIndex
from crossmodal.schemas.diff import config_diff
from crossmodal.stats.concentration import GiniStats
from crossmodal.stats.running import UnitStats, merge_all
from crossmodal.store import names
from crossmodal.store.layout import (
    GINI,
    LAYOUT_VERSION,
    MOMENTS,
    SCALARS,
    StoreDims,
    StoreError,
    UnitCoords,
    create_store,
    has_concentration,
    jsonable,
    manifest,
    open_existing,
)
from crossmodal.store.location import upath, zarr_store

COUNTS = ("n_examples", "n_skipped", "n_rows", "n_ended")
"""Per-condition counts the driver sums from its parts' summaries."""
Reached = Callable[[str], object]
"""A write-boundary hook: :meth:`crossmodal.fleet.FaultPoint.reached` or a no-op."""


def _never(boundary: str) -> bool:
    """No fault point: a boundary passes."""
    return False


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


def skipped_examples(root: zarr.Group) -> dict[str, list[str]]:
    """Every example the collect skipped, ``{reason: [language/split/id, ...]}``: those the
    data source dropped while planning (the ``plan`` attrs' ``skipped``: empty, too long or
    non-UTF-8 text, malformed rows) and while loading a work unit (the manifest parts'
    ``skipped``: bad, missing or too long audio). For ``--dry-run``-like summaries and the
    report."""
    out: dict[str, list[str]] = {}
    for reason, entry in root[names.PLAN].attrs.asdict().get("skipped", {}).items():
        out.setdefault(reason, []).extend(entry.get("ids", entry.get("examples", [])))
    for _, summary in sorted(manifest(root)["parts"].items(), key=lambda kv: int(kv[0])):
        for reason, ids in summary.get("skipped", {}).items():
            out.setdefault(reason, []).extend(i for i in ids if i not in out.get(reason, []))
    return out


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
        _refuse_other_config(path, config)
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

    def merge_ready(self, plan: Plan, *, keep_parts: bool, reached: Reached = _never) -> None:
        """Merge every condition of ``plan`` whose parts are all done and not merged yet.

        ``reached``: the driver's write-boundary hook (:meth:`FaultPoint.reached`), called
        between the writes of each merge (``collect.merge.written``, ``.recorded``,
        ``collect.parts.deleted``).
        """
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
                reached=reached,
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
        reached: Reached = _never,
    ) -> None:
        """Chan-merge ``parts`` into ``stats/<family>[task, modality, language]``.

        ``counts``: n_examples, n_skipped (ints) and n_rows, n_ended (per step) of the
        condition. Parts are read in unit blocks (the arrays' chunks); each merged (step,
        pooling) is written as whole shards in one call (a partial write would
        read-modify-write the shard once per block). Crash-safe by its order
        (docs/reliability.md): every family's merged data is written, THEN the condition is
        recorded as merged, and only then are its parts deleted (unless ``keep_parts``); a
        crash before the record re-merges from the intact parts, a crash after it leaves
        parts that :meth:`delete_merged_parts` removes on resume.
        """
        at = self.dims.index(task, modality, language)
        conc = has_concentration(self.root)
        if conc is not None and conc in families:
            self._merge_concentration(conc, at, parts)
        for family in families:
            self._merge_family(family, at, parts, counts)
        reached("collect.merge.written")
        key = names.condition_key(task, modality, language)
        self.root[names.MANIFEST].attrs["merged"] = sorted({*self.manifest["merged"], key})
        reached("collect.merge.recorded")
        if not keep_parts:
            for family in families:
                self._delete_parts(family, parts)
            reached("collect.parts.deleted")

    def delete_merged_parts(self, plan: Plan) -> None:
        """Delete the leftover parts of merged conditions (a crash between the merge record
        and the deletion leaves them; deleting is idempotent)."""
        merged = set(self.manifest["merged"])
        for cond in plan.conditions:
            if cond.key in merged:
                families = [f for f in plan.config.families if applies(f, cond.modality)]
                for family in families:
                    self._delete_parts(family, [w.index for w in plan.units_of(cond)])

    def forget(
        self,
        parts: Sequence[int],
        conditions: Sequence[str],
        edges: Sequence[str],
        files: Sequence[str] = (),
    ) -> None:
        """Un-record damaged work: these parts, merged conditions and pilot edges are run
        (and merged) again by the resume that called this. Then (record before delete) the
        damaged chunk ``files`` (store keys) are deleted: Zarr reads a shard it writes into,
        so a damaged one would fail the rewrite."""
        m = self.manifest
        root = self.root[names.MANIFEST]
        root.attrs["parts"] = {k: v for k, v in m["parts"].items() if int(k) not in set(parts)}
        root.attrs["merged"] = sorted(set(m["merged"]) - set(conditions))
        root.attrs["edges"] = {k: v for k, v in m["edges"].items() if k not in set(edges)}
        if "finished" in self.root.attrs:
            del self.root.attrs["finished"]
        for key in files:
            sync(self.root.store.delete(key))

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


def _refuse_other_config(path: str | Path, config: CollectConfig) -> None:
    """Refuse a store of this layout written by another config, naming every changed field
    (``config.steps: [1, 6, 11] -> [1, 6]``) so the user can restore it or pick a new output;
    other refusals (layout, plan, not a store) are :func:`open_existing`'s.

    Raises:
        StoreError: the store's ``config_hash`` is not this config's.
    """
    if not (upath(path) / "zarr.json").is_file():
        return
    attrs = zarr.open_group(zarr_store(path), mode="r").attrs.asdict()
    if attrs.get("layout_version") != LAYOUT_VERSION or attrs.get("config_hash") == config.hash():
        return
    hashed = {k: v for k, v in config.to_dict().items() if k not in _UNHASHED}
    stored = attrs.get("config")
    if isinstance(stored, Mapping):
        stored = {k: v for k, v in stored.items() if k not in _UNHASHED}
        changed = "; ".join(config_diff(stored, hashed)) or "no field differs (hash edited)"
    else:
        changed = "its config attribute is missing"
    raise StoreError(
        f"store {str(path)!r} was written by a different config (hash "
        f"{attrs.get('config_hash')!r}, this config {config.hash()!r}): {changed}; resume it "
        "with its own config (in its attrs) or choose a new output path"
    )


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
