"""Reduce pass 1: every unit's selectivity per condition, from the collect store's histograms.

Per (task, modality, step, pooling) and unit block (the stats' chunk), a job reads that
block of every language's histograms and writes AP, AUROC (with guaranteed bounds), on_p50,
on_p90 and off_mean of every language: one whole shard per array, so every shard has one
writer (docs/platform.md, "Zarr"). Ray tasks run a few jobs each (a tiny store is
one task); memory per task: languages x block x bins. A condition is measured when at least
two of its languages have examples (one positive class, the rest negatives).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import torch
import zarr

from crossmodal.collect.config import CollectConfig
from crossmodal.fleet import FaultPoint, RaySession, progress
from crossmodal.reduce.labels import COND, UNIT_COORDS, store_labels
from crossmodal.stats.finalize import selectivity_from_stats
from crossmodal.stats.running import UnitStats
from crossmodal.store.datasets import put_array, unicode
from crossmodal.store.layout import COMPRESSORS, unit_chunk
from crossmodal.store.location import zarr_store
from crossmodal.store.names import (
    default_pooling,
    edges_array,
    selectivity_group,
    stats_group,
    units_group,
)

SEL_VARS = ("ap", "ap_lo", "ap_hi", "auroc", "auroc_lo", "auroc_hi", "on_p50", "on_p90", "off_mean")
"""The selectivity group's per-condition variables, ``[task, modality, step, language, unit]``."""
_TASK_ELEMS = 1 << 25
"""Histogram cells per Ray task: a tiny store is one task, not many worker starts."""


class Cell(NamedTuple):
    """Positions of one (task, modality, step, pooling) on the stats axes."""

    task: int
    modality: int
    step: int
    pooling: int


@dataclass(frozen=True)
class BlockJob:
    """Units ``start:stop`` of one cell, for every language."""

    cell: Cell
    start: int
    stop: int


@dataclass(frozen=True)
class ApWidths:
    """The widest AP interval of some jobs, and the sum and count of their widths."""

    max: float = 0.0
    total: float = 0.0
    count: float = 0.0

    def add(self, width: np.ndarray) -> ApWidths:
        width = width[np.isfinite(width)]
        return ApWidths(
            float(max(self.max, width.max(initial=0.0))),
            float(self.total + width.sum()),
            float(self.count + width.size),
        )


@dataclass(frozen=True)
class SelectivitySummary:
    """What pass 1 did for one family (recorded in the root attribute ``reduce``)."""

    blocks: int
    block: int
    finished: str
    max_ap_width: float
    mean_ap_width: float
    digests: dict[str, str] = field(default_factory=dict)
    """Per selectivity group path: :func:`selectivity_digest` of what the pass wrote (what
    steering cells are keyed by, docs/design.md, "Crash safety and resume")."""


def create_selectivity(
    root: zarr.Group, store: str, family: str, poolings: Sequence[str], block: int
) -> None:
    """Every pooling's selectivity group: NaN-filled arrays, shards ``[1, 1, 1, language,
    block]`` (one reduce task's region) of chunks ``[1, 1, 1, 1, block]``, and labels."""
    lab = store_labels(root, family)
    shape = tuple(len(lab[d]) for d in (*COND, "unit"))
    # The default pooling's group first: mode "w" wipes its subgroups (the other poolings).
    for pooling in sorted(poolings, key=lambda p: p != default_pooling(poolings)):
        path = selectivity_group(family, pooling, poolings)
        g = zarr.open_group(zarr_store(store), path=path, mode="w", zarr_format=3)
        g.attrs.update({"pooling": pooling, "poolings": list(poolings), "estimate": "expected"})
        for name in SEL_VARS:
            g.create_array(
                name,
                shape=shape,
                dtype="float64",
                fill_value=np.nan,
                chunks=(1, 1, 1, 1, block),
                shards=(1, 1, 1, shape[3], block),
                compressors=COMPRESSORS,
                dimension_names=[*COND, "unit"],
                attributes={"coordinates": " ".join(UNIT_COORDS)},
            )
        for name, values in lab.items():
            put_array(g, name, values, ["unit" if name in ("unit", *UNIT_COORDS) else name])


def _block_stats(sg: zarr.Group, edges_arr: zarr.Array, job: BlockJob) -> dict[int, UnitStats]:
    """The running statistics of the job's units, per language (position) with examples."""
    t, m, s, p = job.cell
    count, dropped = sg["count"][t, m, :, s, p], sg["dropped"][t, m, :, s, p]
    sl = slice(job.start, job.stop)
    edges = torch.from_numpy(np.asarray(edges_arr[t, m, s, p, sl]))
    arrays = {k: sg[k][t, m, :, s, p, sl] for k in ("mean", "m2", "min", "max", "hist")}
    return {
        int(lang): UnitStats(
            edges=edges,
            count=torch.tensor(int(count[lang])),
            dropped=torch.tensor(int(dropped[lang])),
            **{k: torch.from_numpy(np.ascontiguousarray(v[lang])) for k, v in arrays.items()},
        )
        for lang in np.flatnonzero(count > 0)
    }


def reduce_blocks(
    store: str, family: str, paths: Sequence[str], jobs: Sequence[BlockJob]
) -> ApWidths:
    """Selectivity of each job's units for every language; writes ``paths[pooling]``'s
    ``[task, modality, step, :, start:stop]`` of every variable (a whole shard). Returns the
    widths of the AP intervals written."""
    sg = zarr.open_group(zarr_store(store), path=stats_group(family), mode="r")
    edges_arr = zarr.open_array(zarr_store(store), path=edges_array(family), mode="r")
    n_languages = sg["language"].shape[0]
    widths = ApWidths()
    for job in jobs:
        res = np.full((len(SEL_VARS), n_languages, job.stop - job.start), np.nan)
        for lang, sel in selectivity_from_stats(_block_stats(sg, edges_arr, job)).items():
            res[:, lang] = [getattr(sel, name).numpy() for name in SEL_VARS]
        t, m, s, p = job.cell
        g = zarr.open_group(zarr_store(store), path=paths[p], mode="r+")
        for i, name in enumerate(SEL_VARS):
            g[name][t, m, s, :, job.start : job.stop] = res[i]
        widths = widths.add(res[2] - res[1])
    return widths


def _jobs(count: np.ndarray, n_units: int, block: int) -> list[BlockJob]:
    """One job per measured cell (>= 2 languages with examples) and unit block."""
    n_task, n_mod, _, n_step, n_pool = count.shape  # [task, modality, language, step, pooling]
    cells = [
        Cell(*at)
        for at in np.ndindex(n_task, n_mod, n_step, n_pool)
        if (count[at[0], at[1], :, at[2], at[3]] > 0).sum() >= 2
    ]
    return [
        BlockJob(c, a, min(a + block, n_units)) for c in cells for a in range(0, n_units, block)
    ]


def _run_blocks(
    session: RaySession,
    store: str,
    family: str,
    paths: list[str],
    tasks: list[list[BlockJob]],
    num_cpus: float,
    show: bool,
) -> list[ApWidths]:
    """Each task's jobs as one Ray task; their widths, in completion order."""
    ray = session.connect()
    task = ray.remote(num_cpus=num_cpus)(reduce_blocks)
    refs = [task.remote(store, family, paths, jobs) for jobs in tasks]
    out: list[ApWidths] = []
    with progress(len(refs), desc=f"selectivity {family}", unit="it", enabled=show) as bar:
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            out += ray.get(done)
            bar.update(len(done))
    return out


def _write_counts(store: str, family: str, count: np.ndarray, poolings: Sequence[str]) -> None:
    """``n_pos`` and ``n_neg`` of every measured condition (0 where none was measured)."""
    for q, pooling in enumerate(poolings):
        g = zarr.open_group(zarr_store(store), path=selectivity_group(family, pooling, poolings))
        c = count[..., q].transpose(0, 1, 3, 2)  # -> [task, modality, step, language]
        ok = (c > 0).sum(-1, keepdims=True) >= 2
        put_array(g, "n_pos", np.where(ok, c, 0), COND)
        put_array(g, "n_neg", np.where(ok & (c > 0), c.sum(-1, keepdims=True) - c, 0), COND)


def selectivity_pass(
    session: RaySession,
    root: zarr.Group,
    store: str,
    family: str,
    config: CollectConfig,
    num_cpus: float,
    show: bool,
    fault: FaultPoint | None = None,
) -> SelectivitySummary:
    """Pass 1 for one family: create the groups, run the block tasks, write n_pos / n_neg;
    ``fault`` is reached between those writes (``reduce.selectivity.*``)."""
    n_units = root[f"{units_group(family)}/unit"].shape[0]
    block, poolings = unit_chunk(n_units, config.n_bins), config.poolings
    create_selectivity(root, store, family, poolings, block)
    if fault is not None:
        fault.reached("reduce.selectivity.created")
    count = root[f"{stats_group(family)}/count"][...]  # [task, modality, language, step, pooling]
    jobs = _jobs(count, n_units, block)
    per = max(1, _TASK_ELEMS // (block * count.shape[2] * (config.n_bins + 2)))
    out: list[ApWidths] = []
    if jobs:
        paths = [selectivity_group(family, q, poolings) for q in poolings]
        tasks = [jobs[i : i + per] for i in range(0, len(jobs), per)]
        out = _run_blocks(session, store, family, paths, tasks, num_cpus, show)
    if fault is not None:
        fault.reached("reduce.selectivity.blocks_written")
    _write_counts(store, family, count, poolings)
    groups = [selectivity_group(family, q, poolings) for q in poolings]
    return SelectivitySummary(
        blocks=len(jobs),
        block=block,
        finished=_now(),
        max_ap_width=max([o.max for o in out], default=0.0),
        mean_ap_width=sum(o.total for o in out) / max(1.0, sum(o.count for o in out)),
        digests={g: selectivity_digest(store, g) for g in groups},
    )


DIGEST_ARRAYS = (*SEL_VARS, "n_pos", "n_neg", *COND, "unit", *UNIT_COORDS)
"""The arrays of a selectivity group whose values :func:`selectivity_digest` covers."""


def selectivity_digest(store: str, path: str) -> str:
    """sha256 (16 hex) over the VALUES of a selectivity group's arrays (name, shape, dtype,
    bytes; one task index at a time, so memory is one task's slice of one array).

    Values, not file bytes or paths: a moved or copied store keeps its digest, and any
    changed value (a re-reduce of other statistics, a damaged shard) changes it.

    Raises:
        KeyError: the group lacks an array of :data:`DIGEST_ARRAYS` (an unfinished pass).
    """
    g = zarr.open_group(zarr_store(store), path=path, mode="r")
    h = hashlib.sha256()
    for name in DIGEST_ARRAYS:
        arr = g[name]
        h.update(f"{name}:{arr.shape}:{arr.dtype}".encode())
        rows = range(arr.shape[0]) if arr.ndim > 1 else [slice(None)]
        for i in rows:
            values = np.asarray(arr[i])
            if values.dtype.kind in "OT":  # variable-length strings: their UTF-8 text
                values = np.asarray(unicode(values))
            h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()[:16]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
