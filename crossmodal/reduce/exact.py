"""Reduce pass 2: exact AP of the units whose set membership the histogram intervals left open.

:func:`crossmodal.reduce.selection.plan_exact` over the AP intervals (every pooling and
scope) names the candidates; :class:`ExactWorker` actors re-run the work units of each
(task, modality) with candidates, keeping the per-example values of the candidates only.
When all of a (task, modality)'s work units are back the driver writes their exact AP to
``exact/<family>`` and marks that (task, modality) done. A unit is re-collected only for the
(step, pooling) where it is a candidate. Memory: candidates x examples of the open (task,
modality) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr
import zarr

from crossmodal.collect.config import CollectConfig
from crossmodal.collect.plan import Condition, WorkUnit, applies
from crossmodal.fleet import RaySession, progress
from crossmodal.reduce.labels import COND
from crossmodal.reduce.selection import exact_units, parse_scope, plan_exact
from crossmodal.stats.finalize import exact_selectivity
from crossmodal.stats.running import ExactValues
from crossmodal.store.datasets import put_array, unicode
from crossmodal.store.names import PLAN, condition_key, exact_group, parse_condition_key


class Slot(NamedTuple):
    """One (step, pooling) of a condition: where a unit can be a candidate."""

    step: int
    pooling: str


Candidates = Mapping[str, Mapping[str, Mapping[Slot, np.ndarray]]]
"""``{family: {"task/modality": {Slot(step, pooling): sorted unit ids}}}``."""


@dataclass(frozen=True)
class ExactPart:
    """One work unit's per-example values of the candidates, ``[example, candidate]`` per
    (family, slot) where the work unit's (task, modality) has candidates."""

    part: int
    key: str  # "task/modality"
    language: str
    values: dict[tuple[str, Slot], np.ndarray]


class ExactWorker:
    """One model replica: ``worker(unit)`` re-runs a work unit exactly as collect did and
    returns the per-example values of the candidate units only (a plain class: it runs
    without Ray in tests, and as a Ray actor in the exact pass).

    Args:
        config: the store's collect config.
        store: the store (the collector reads nothing from it here, it only loads the model
            and the data the way collect did).
        candidates: see :data:`Candidates`.
    """

    def __init__(self, config: CollectConfig, store: str, candidates: Candidates) -> None:
        from crossmodal.collect.collector import Collector

        self.collector = Collector(config, store)
        self.candidates = candidates

    def __call__(self, unit: WorkUnit) -> ExactPart:
        col, cond = self.collector, unit.condition
        key = condition_key(cond.task, cond.modality)
        keep = {
            (f, slot): ExactValues.empty(
                col.slices[f].stop - col.slices[f].start, np.array(ids), col.device
            )
            for f, by in self.candidates.items()
            if applies(f, cond.modality)
            for slot, ids in by.get(key, {}).items()
        }
        records, _ = col.load_records(cond.source, cond.modality, unit.example_ids)
        for res in col.capture(records, cond.modality, cond.target) if keep else ():
            for (f, slot), ex in keep.items():
                v = res.values[(slot.pooling, slot.step)]
                if len(v):
                    ex.update(v[:, col.slices[f]])
        values = {k: ex.values.cpu().numpy() for k, ex in keep.items()}
        return ExactPart(unit.index, key, cond.language, values)


@dataclass(frozen=True)
class ExactPlan:
    """One family's selection plans per (pooling, scope), and the union of their candidates
    per "task/modality" and :class:`Slot`."""

    plans: dict[tuple[str, str], xr.Dataset]
    candidates: dict[str, dict[Slot, np.ndarray]]


def exact_plan(
    views: Mapping[str, xr.Dataset], k: int, scopes: Sequence[str], widen: float
) -> ExactPlan:
    """Plan every (pooling, scope) of one family (``views``: its selectivity per pooling);
    a unit is re-collected only where it is a candidate."""
    plans = {}
    for pooling, ds in views.items():
        for scope in scopes:
            group, layer = parse_scope(scope)
            plans[(pooling, scope)] = plan_exact(ds, k=k, group=group, layer=layer, widen=widen)
    union: dict[str, dict[Slot, list[np.ndarray]]] = {}
    for (pooling, _), plan in plans.items():
        for (task, modality, step), ids in exact_units(plan, ("task", "modality", "step")).items():
            if ids.size:
                slots = union.setdefault(condition_key(task, modality), {})
                slots.setdefault(Slot(int(step), pooling), []).append(ids)
    cands = {
        key: {slot: np.unique(np.concatenate(v)) for slot, v in by.items()}
        for key, by in union.items()
    }
    return ExactPlan(plans, cands)


def work_units(root: zarr.Group) -> list[WorkUnit]:
    """The store's plan, as the collect job ran it (ids from the plan attrs)."""
    out = []
    for w in root[PLAN].attrs["work_units"]:
        cond = Condition(w["task"], w["modality"], w["language"], w["source"], w["target"])
        out.append(WorkUnit(w["index"], cond, w["shard"], len(w["ids"]), tuple(w["ids"])))
    return out


def create_exact(
    store: str,
    family: str,
    cands: Mapping[str, Mapping[Slot, np.ndarray]],
    lab: Mapping[str, Any],
    poolings: Sequence[str],
) -> np.ndarray:
    """``exact/<family>``: ap/auroc ``[pooling, task, modality, step, language, unit]``
    over the union of candidates (NaN where a pair did not measure a unit); returns it."""
    every = [v for by in cands.values() for v in by.values()]
    ids = np.unique(np.concatenate([np.zeros(0, np.int64), *every]))
    shape = (len(poolings), *(len(lab[d]) for d in COND), ids.size)
    g = zarr.open_group(store, path=exact_group(family), mode="w", zarr_format=3)
    for name in ("ap", "auroc"):
        g.create_array(
            name,
            shape=shape,
            dtype="float64",
            fill_value=np.nan,
            chunks=(1, 1, 1, *shape[3:5], max(1, ids.size)),
            dimension_names=["pooling", *COND, "unit"],
        )
    for name, values in {"pooling": list(poolings), **{d: lab[d] for d in COND}}.items():
        put_array(g, name, values, [name])
    put_array(g, "unit", ids, ["unit"])
    return ids


Rows = Mapping[str, Mapping[tuple[str, Slot], list[np.ndarray]]]
"""``{language: {(family, slot): per-example values of each work unit}}``."""


def write_exact(
    store: str,
    family: str,
    key: str,
    rows: Rows,
    cands: Mapping[Slot, np.ndarray],
    union: np.ndarray,
    lab: Mapping[str, Any],
) -> None:
    """Exact AP/AUROC of one (task, modality) from its languages' per-example values."""
    g = zarr.open_group(store, path=exact_group(family), mode="r+")
    coords = {
        "pooling": unicode(g["pooling"][...]),
        "step": np.asarray(lab["step"]),
        "language": unicode(lab["language"]),
        "unit": union,
    }
    ap = xr.DataArray(np.nan, coords=coords, dims=list(coords)).copy()
    auroc = ap.copy()
    for slot, ids in cands.items():
        ex = {
            lang: ExactValues(
                torch.as_tensor(ids), torch.from_numpy(np.concatenate(v)), torch.tensor(0)
            )
            for lang, by in rows.items()
            if (v := by.get((family, slot)))
        }
        ex = {lang: e for lang, e in ex.items() if e.n}
        for lang, sel in (exact_selectivity(ex) if len(ex) >= 2 else {}).items():
            at = {"pooling": slot.pooling, "step": slot.step, "language": lang, "unit": ids}
            ap.loc[at], auroc.loc[at] = sel.ap.numpy(), sel.auroc.numpy()
    task, modality = parse_condition_key(key)
    t, m = list(lab["task"]).index(task), list(lab["modality"]).index(modality)
    g["ap"][:, t, m], g["auroc"][:, t, m] = ap.values, auroc.values


class OpenConditions:
    """The (task, modality) pairs of the exact pass whose work units are not all back, and
    the per-example values received so far."""

    def __init__(self, keys: set[str], units: Sequence[WorkUnit]) -> None:
        self.left = dict.fromkeys(keys, 0)
        for w in units:
            self.left[condition_key(w.condition.task, w.condition.modality)] += 1
        self.rows: dict[str, dict[str, dict[tuple[str, Slot], list[np.ndarray]]]] = {}

    def empty(self) -> list[str]:
        """The pairs with candidates but no work unit to re-run."""
        return [key for key, n in self.left.items() if n == 0]

    def add(self, part: ExactPart) -> Rows | None:
        """Keep ``part``; the pair's :data:`Rows` once its last work unit is back, else None."""
        by_lang = self.rows.setdefault(part.key, {}).setdefault(part.language, {})
        for k, v in part.values.items():
            by_lang.setdefault(k, []).append(v)
        self.left[part.key] -= 1
        return self.rows.pop(part.key) if self.left[part.key] == 0 else None


def exact_pass(
    session: RaySession,
    root: zarr.Group,
    store: str,
    config: CollectConfig,
    cands: Candidates,
    write: Callable[[str, Rows], None],
    mark: Callable[[str], None],
    done: set[str],
    show: bool,
) -> int:
    """Pass 2 over every family at once (one capture serves all): once all work units of a
    (task, modality) pair not in ``done`` are back, ``write(key, rows)`` then ``mark(key)``;
    returns the work units run."""
    keys = {key for by in cands.values() for key in by} - done
    units = [
        w for w in work_units(root) if condition_key(w.condition.task, w.condition.modality) in keys
    ]
    pending = OpenConditions(keys, units)
    for key in pending.empty():
        mark(key)  # candidates but no examples left to re-run: nothing to measure
    if not units:
        return 0
    ref = session.connect().put(dict(cands))
    count = min(config.actors.count, len(units))
    with (
        session.actors(ExactWorker, config, store, ref, spec=config.actors, count=count) as fleet,
        progress(len(units), desc="exact pass", unit="it", enabled=show) as bar,
    ):
        for part in fleet.map(units):
            rows = pending.add(part)
            bar.update(1)
            if rows is not None:
                write(part.key, rows)
                mark(part.key)
    return len(units)
