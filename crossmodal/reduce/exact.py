"""Reduce pass 2: exact AP of the units whose set membership the histogram intervals left open.

:func:`crossmodal.reduce.selection.plan_exact` over the AP intervals (every pooling and
scope) names the candidates; :class:`ExactWorker` actors re-run the work units of each
(task, modality) with candidates, keeping the per-example values of the candidates only.
The candidates are recorded in the store (``exact/<family>/candidates``), and the actors read
them there: nothing large travels as an actor argument (an argument Ray keeps in its object
store cannot be restored with a restarted actor). A unit is re-collected only for the (step,
pooling) where it is a candidate. When the plan's spill fits the every-unit budget
(:mod:`crossmodal.reduce.ap_accuracy`), every unit of every measured slot is a candidate, and
each unit's AP on two seeded halves of the examples is computed too (``ap_half``,
:mod:`crossmodal.reduce.stability`). Each work unit also keeps the highest and lowest values
of the plan's *members* and the examples behind them (:mod:`crossmodal.reduce.exemplars`).

Memory, bounded independent of the number of examples: the driver writes each work unit's
values to the store as it arrives (``exact/<family>/spill/<part>``) and keeps only which
parts a (task, modality) has; when its last work unit is back it computes the exact AP
:data:`SPILL_CHUNK_BYTES` of values at a time (a chunk of candidate columns over all the
pair's examples; at least one column), writes it to ``exact/<family>``, marks the pair done
and deletes its spill. Driver memory: one work unit's values (``shard_size`` examples x
candidates) plus one chunk (with the sort's working copies, a small multiple of it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr
import zarr

from crossmodal.collect.config import CollectConfig
from crossmodal.collect.plan import Condition, WorkUnit, applies
from crossmodal.fleet import FaultPoint, RaySession, progress
from crossmodal.reduce.exemplars import Extremes
from crossmodal.reduce.labels import COND
from crossmodal.reduce.selection import exact_units, parse_scope, plan_exact
from crossmodal.stats.finalize import exact_selectivity
from crossmodal.stats.running import ExactValues, finite_rows
from crossmodal.store.datasets import put_array, unicode
from crossmodal.store.location import zarr_store
from crossmodal.store.names import PLAN, condition_key, exact_group, parse_condition_key

SPILL_CHUNK_BYTES = 32 << 20
"""Values (float32) the driver holds at once when it finalizes a (task, modality)."""
CANDIDATES = "candidates"
"""Subgroup of ``exact/<family>``: one array of sorted unit ids per (task, modality, slot)."""
MEMBERS = "members"
"""Subgroup of ``exact/<family>``: the units some plan holds surely in a set or as a candidate
(a superset of the final sets), laid out as :data:`CANDIDATES`: whose exemplars are kept."""
SPILL = "spill"
"""Subgroup of ``exact/<family>``: each open work unit's values, deleted once written."""


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
    ids: dict[tuple[str, Slot], list[str]] = field(default_factory=dict)
    """The example id of each row of ``values``."""
    extremes: dict[tuple[str, Slot], Extremes] = field(default_factory=dict)
    """Per (family, slot) with members: their highest/lowest values, references = rows of
    ``examples``."""
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """``(id, input text, generated text)`` of every example the work unit ran, in order."""


class ExactWorker:
    """One model replica: ``worker(unit)`` re-runs a work unit exactly as collect did and
    returns the per-example values of the candidate units only (a plain class: it runs
    without Ray in tests, and as a Ray actor in the exact pass).

    Args:
        config: the store's collect config.
        store: the store (the collector reads nothing from it here, it only loads the model
            and the data the way collect did).
        candidates: see :data:`Candidates`; None: read those the driver recorded in the
            store for ``families`` (:func:`read_candidates`), as the Ray actors do.
        families: the families whose recorded candidates to read (with ``candidates=None``).
    """

    def __init__(
        self,
        config: CollectConfig,
        store: str,
        candidates: Candidates | None = None,
        families: Sequence[str] = (),
        members: Candidates | None = None,
    ) -> None:
        from crossmodal.collect.collector import Collector

        self.collector = Collector(config, store)
        self.candidates = read_candidates(store, families) if candidates is None else candidates
        self.members = read_candidates(store, families, MEMBERS) if members is None else members

    def _slots(self, by: Candidates, key: str, modality: str) -> dict[tuple[str, Slot], Any]:
        return {
            (f, slot): ids
            for f, slots in by.items()
            if applies(f, modality)
            for slot, ids in slots.get(key, {}).items()
        }

    def __call__(self, unit: WorkUnit) -> ExactPart:
        col, cond = self.collector, unit.condition
        key = condition_key(cond.task, cond.modality)
        keep = {
            fs: ExactValues.empty(col.slices[fs[0]].stop - col.slices[fs[0]].start, ids, col.device)
            for fs, ids in self._slots(self.candidates, key, cond.modality).items()
        }
        members = self._slots(self.members, key, cond.modality)
        extremes = {fs: Extremes.empty(ids) for fs, ids in members.items()}
        part = ExactPart(unit.index, key, cond.language, {}, {fs: [] for fs in keep}, extremes)
        records, _ = col.load_records(cond.source, cond.modality, unit.example_ids)
        for res in col.capture(records, cond.modality, cond.target) if keep or extremes else ():
            self._fold(res, records, keep, members, part)
        part.values.update({k: ex.values.cpu().numpy() for k, ex in keep.items()})
        return part

    def _fold(
        self, res: Any, records: Sequence[Any], keep: dict, members: dict, part: ExactPart
    ) -> None:
        """One captured batch (the next ``len(res.ids)`` of ``records``) into the kept
        values, their row ids, the extremes and the examples' texts (input: the sentence, for
        speech the transcript of the recording ``id``)."""
        col, offset = self.collector, len(part.examples)
        texts = res.texts if members else [""] * len(res.ids)
        batch = records[offset : offset + len(res.ids)]
        part.examples.extend((r.id, r.text, t) for r, t in zip(batch, texts, strict=True))
        for fs in {*keep, *members}:
            f, slot = fs
            v = res.values[(slot.pooling, slot.step)]
            if not len(v):
                continue
            v = v[:, col.slices[f]]
            ok = finite_rows(v)
            rows = res.rows[slot.step][ok.to(res.rows[slot.step].device)].tolist()
            if fs in keep:
                keep[fs].update(v)
                part.ids[fs] += [res.ids[r] for r in rows]
            if fs in members:
                kept = v[ok][:, torch.as_tensor(members[fs], device=v.device)].cpu().numpy()
                part.extremes[fs].update(kept, offset + np.asarray(rows, np.int64))


@dataclass(frozen=True)
class ExactPlan:
    """One family's selection plans per (pooling, scope), the units to re-collect exactly
    (``candidates``) and the units whose exemplars to keep (``members``: surely in some set
    or a candidate), per "task/modality" and :class:`Slot`."""

    plans: dict[tuple[str, str], xr.Dataset]
    candidates: dict[str, dict[Slot, np.ndarray]]
    members: dict[str, dict[Slot, np.ndarray]] = field(default_factory=dict)


def _by_slot(plans: Mapping[tuple[str, str], xr.Dataset], names: Sequence[str]) -> dict:
    """The unit ids of the plan variables ``names``, per "task/modality" and slot, over all
    plans (poolings and scopes)."""
    union: dict[str, dict[Slot, list[np.ndarray]]] = {}
    for (pooling, _), plan in plans.items():
        by = ("task", "modality", "step")
        for (task, modality, step), ids in exact_units(plan, by, members=names).items():
            if ids.size:
                slots = union.setdefault(condition_key(task, modality), {})
                slots.setdefault(Slot(int(step), pooling), []).append(ids)
    return {
        key: {slot: np.unique(np.concatenate(v)) for slot, v in by.items()}
        for key, by in union.items()
    }


def measured_slots(views: Mapping[str, xr.Dataset]) -> dict[str, list[Slot]]:
    """Per "task/modality", the (step, pooling) slots with >= 2 languages with examples."""
    out: dict[str, list[Slot]] = {}
    for pooling, ds in views.items():
        ok = ((ds["n_pos"] > 0).sum("language") >= 2).load()
        for t, m, s in np.argwhere(ok.transpose("task", "modality", "step").values):
            key = condition_key(str(ok["task"].values[t]), str(ok["modality"].values[m]))
            out.setdefault(key, []).append(Slot(int(ok["step"].values[s]), pooling))
    return out


def exact_plan(
    views: Mapping[str, xr.Dataset],
    k: int,
    scopes: Sequence[str],
    widen: float,
    every_unit: bool = False,
) -> ExactPlan:
    """Plan every (pooling, scope) of one family (``views``: its selectivity per pooling);
    a unit is re-collected where it is a candidate or surely in a set (so every set member
    gets an exact AP), or, with ``every_unit``, every unit of every measured slot (exact AP
    of all units: docs/method.md, "Accuracy of all-unit AP")."""
    plans = {}
    for pooling, ds in views.items():
        for scope in scopes:
            group, layer = parse_scope(scope)
            plans[(pooling, scope)] = plan_exact(ds, k=k, group=group, layer=layer, widen=widen)
    members = _by_slot(plans, ["certain", "candidate"])
    cands = members
    if every_unit:
        units = np.asarray(next(iter(views.values()))["unit"].values, np.int64)
        cands = {key: dict.fromkeys(slots, units) for key, slots in measured_slots(views).items()}
    return ExactPlan(plans, cands, members)


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
    members: Mapping[str, Mapping[Slot, np.ndarray]] | None = None,
    halves: bool = False,
) -> np.ndarray:
    """``exact/<family>``: ap/auroc ``[pooling, task, modality, step, language, unit]``
    over the union of candidates (NaN where a pair did not measure a unit), the candidates
    and ``members``; with ``halves`` also ``ap_half [half, ...]``, the exact AP on each half
    of the examples (:func:`crossmodal.reduce.stability.example_halves`). Returns the union."""
    every = [v for by in cands.values() for v in by.values()]
    ids = np.unique(np.concatenate([np.zeros(0, np.int64), *every]))
    shape = (len(poolings), *(len(lab[d]) for d in COND), ids.size)
    g = zarr.open_group(zarr_store(store), path=exact_group(family), mode="w", zarr_format=3)
    for name in ("ap", "auroc", *(["ap_half"] if halves else [])):
        half = (2,) if name == "ap_half" else ()
        g.create_array(
            name,
            shape=(*half, *shape),
            dtype="float64",
            fill_value=np.nan,
            chunks=(*half, 1, 1, 1, *shape[3:5], max(1, ids.size)),
            dimension_names=[*(["half"] if half else []), "pooling", *COND, "unit"],
        )
    for name, values in {"pooling": list(poolings), **{d: lab[d] for d in COND}}.items():
        put_array(g, name, values, [name])
    put_array(g, "unit", ids, ["unit"])
    write_candidates(g, cands)
    write_candidates(g, members or {}, MEMBERS)
    return ids


def _slot_name(key: str, slot: Slot) -> str:
    return f"{key.replace('/', '.')}.{slot.step}.{slot.pooling}"


def write_candidates(
    g: zarr.Group, cands: Mapping[str, Mapping[Slot, np.ndarray]], name: str = CANDIDATES
) -> None:
    """Replace ``<g>/<name>``: one array per (task/modality, slot), named
    ``<task>.<modality>.<step>.<pooling>``, attrs ``key``, ``step``, ``pooling``."""
    sub = g.create_group(name, overwrite=True)
    for key, by in cands.items():
        for slot, ids in by.items():
            put_array(sub, _slot_name(key, slot), np.asarray(ids, np.int64), ["candidate"],
                      key=key, step=int(slot.step), pooling=str(slot.pooling))  # fmt: skip


def family_candidates(
    store: str, family: str, name: str = CANDIDATES
) -> dict[str, dict[Slot, np.ndarray]]:
    """The candidates (or ``name``: :data:`MEMBERS`) recorded in ``exact/<family>/<name>``
    (empty when none are)."""
    path = f"{exact_group(family)}/{name}"
    try:
        sub = zarr.open_group(zarr_store(store), path=path, mode="r")
    except FileNotFoundError:
        return {}
    out: dict[str, dict[Slot, np.ndarray]] = {}
    for _, arr in sub.arrays():
        a = arr.attrs
        out.setdefault(a["key"], {})[Slot(int(a["step"]), str(a["pooling"]))] = arr[...]
    return out


def read_candidates(store: str, families: Sequence[str], name: str = CANDIDATES) -> Candidates:
    """:data:`Candidates` (or ``name``: :data:`MEMBERS`) of ``families``, as recorded."""
    return {f: family_candidates(store, f, name) for f in families}


def same_candidates(
    store: str, family: str, cands: Mapping[str, Mapping[Slot, np.ndarray]], name: str = CANDIDATES
) -> bool:
    """Whether the store records exactly ``cands`` for ``family`` (what a resume checks;
    ``name``: :data:`MEMBERS` checks those)."""
    have = family_candidates(store, family, name)
    return {k: set(v) for k, v in have.items()} == {k: set(v) for k, v in cands.items()} and all(
        np.array_equal(have[k][slot], ids) for k, by in cands.items() for slot, ids in by.items()
    )


def spill(store: str, part: ExactPart) -> None:
    """Write one work unit's values to ``exact/<family>/spill/<part>/<step>.<pooling>``
    (``[example, candidate]``, attrs ``key`` and ``language``); a retried unit rewrites it."""
    for (family, slot), values in part.values.items():
        g = zarr.open_group(
            zarr_store(store), path=f"{exact_group(family)}/{SPILL}/{part.part}", mode="a"
        )
        n, c = values.shape
        arr = g.create_array(
            f"{slot.step}.{slot.pooling}",
            shape=values.shape,
            dtype=values.dtype,
            chunks=(max(1, n), max(1, min(c, 1024))),
            attributes={
                "key": part.key,
                "language": part.language,
                "ids": list(part.ids.get((family, slot), [])),
            },
            overwrite=True,
        )
        if values.size:
            arr[...] = values


def spilled(store: str, family: str, key: str, slot: Slot) -> dict[str, list[zarr.Array]]:
    """The spilled values of ``key`` at ``slot``, per language (arrays, not yet read)."""
    try:
        sub = zarr.open_group(zarr_store(store), path=f"{exact_group(family)}/{SPILL}", mode="r")
    except FileNotFoundError:
        return {}
    out: dict[str, list[zarr.Array]] = {}
    name = f"{slot.step}.{slot.pooling}"
    for part in sorted(sub.group_keys(), key=int):
        g = sub[part]
        if name in g and g[name].attrs["key"] == key:
            out.setdefault(g[name].attrs["language"], []).append(g[name])
    return out


def drop_spill(store: str, family: str) -> None:
    """Delete ``exact/<family>/spill`` (after the pairs it held are written and marked)."""
    g = zarr.open_group(zarr_store(store), path=exact_group(family), mode="r+")
    if SPILL in g:
        del g[SPILL]


Halves = Mapping[str, Mapping[str, int]]
"""``{language: {example id: 0 or 1}}``: which half of its condition each example is in."""


def _selectivity(
    arrays: Mapping[str, list[zarr.Array]],
    ids: np.ndarray,
    cols: slice,
    rows: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Exact selectivity of the candidate columns ``cols`` (unit ids ``ids[cols]``) per
    language, over every spilled row or the rows ``rows[language]`` (a bool mask)."""
    ex = {}
    for lang, arrs in arrays.items():
        values = np.concatenate([a[:, cols] for a in arrs])
        if rows is not None:
            values = values[rows[lang]]
        ex[lang] = ExactValues(
            torch.tensor(ids[cols]),
            torch.from_numpy(np.require(values, requirements="W")),
            torch.tensor(0),
        )
    ex = {lang: e for lang, e in ex.items() if e.n}
    return exact_selectivity(ex) if len(ex) >= 2 else {}


def _half_rows(arrays: Mapping[str, list[zarr.Array]], halves: Halves) -> list[dict]:
    """Per half, the bool row mask of each language's spilled rows."""
    side = {
        lang: np.array([halves[lang][i] for a in arrs for i in a.attrs["ids"]], np.int64)
        for lang, arrs in arrays.items()
    }
    return [{lang: h == half for lang, h in side.items()} for half in (0, 1)]


def write_exact(
    store: str,
    family: str,
    key: str,
    cands: Mapping[Slot, np.ndarray],
    union: np.ndarray,
    lab: Mapping[str, Any],
    halves: Halves | None = None,
) -> None:
    """Exact AP/AUROC of one (task, modality) from its spilled per-example values, a chunk of
    candidate columns at a time (:data:`SPILL_CHUNK_BYTES`; the AP of a unit needs only its
    own column, so any chunking gives the same values); with ``halves``, ``ap_half`` too."""
    g = zarr.open_group(zarr_store(store), path=exact_group(family), mode="r+")
    coords = {
        "pooling": unicode(g["pooling"][...]),
        "step": np.asarray(lab["step"]),
        "language": unicode(lab["language"]),
        "unit": union,
    }
    ap = xr.DataArray(np.nan, coords=coords, dims=list(coords)).copy()
    auroc = ap.copy()
    half_ap = [ap.copy(), ap.copy()] if halves is not None else []
    for slot, ids in cands.items():
        arrays = spilled(store, family, key, slot)
        n = sum(a.shape[0] for arrs in arrays.values() for a in arrs)
        width = max(1, SPILL_CHUNK_BYTES // (4 * max(1, n)))
        masks = _half_rows(arrays, halves) if halves is not None else []
        for lo in range(0, len(ids), width):
            cols = slice(lo, lo + width)
            at = {"pooling": slot.pooling, "step": slot.step, "unit": ids[cols]}
            for lang, sel in _selectivity(arrays, ids, cols).items():
                ap.loc[{**at, "language": lang}] = sel.ap.numpy()
                auroc.loc[{**at, "language": lang}] = sel.auroc.numpy()
            for out, rows in zip(half_ap, masks, strict=True):
                for lang, sel in _selectivity(arrays, ids, cols, rows).items():
                    out.loc[{**at, "language": lang}] = sel.ap.numpy()
    task, modality = parse_condition_key(key)
    t, m = list(lab["task"]).index(task), list(lab["modality"]).index(modality)
    g["ap"][:, t, m], g["auroc"][:, t, m] = ap.values, auroc.values
    if half_ap:
        g["ap_half"][:, :, t, m] = np.stack([h.values for h in half_ap])


class OpenConditions:
    """The (task, modality) pairs of the exact pass whose work units are not all back: only
    how many each still waits for (the values themselves are spilled to the store, so this
    does not grow with the examples)."""

    def __init__(self, keys: set[str], units: Sequence[WorkUnit]) -> None:
        self.left = dict.fromkeys(keys, 0)
        for w in units:
            self.left[condition_key(w.condition.task, w.condition.modality)] += 1

    def empty(self) -> list[str]:
        """The pairs with candidates but no work unit to re-run."""
        return [key for key, n in self.left.items() if n == 0]

    def add(self, part: ExactPart) -> bool:
        """Count ``part`` (already spilled); whether it was its pair's last work unit."""
        self.left[part.key] -= 1
        return self.left[part.key] == 0


def exact_pass(
    session: RaySession,
    root: zarr.Group,
    store: str,
    config: CollectConfig,
    cands: Candidates,
    write: Callable[[str], None],
    mark: Callable[[str], None],
    done: set[str],
    show: bool,
    fault: FaultPoint | None = None,
    members: Candidates | None = None,
    received: Callable[[ExactPart], None] | None = None,
) -> int:
    """Pass 2 over every family at once (one capture serves all): each work unit's values
    are spilled as they arrive and handed to ``received`` (the exemplars); once all work
    units of a (task, modality) pair not in ``done`` are back, ``write(key)`` then
    ``mark(key)``; returns the work units run. Pairs with candidates or ``members`` run.
    The actors read the candidates and members from the store (:func:`create_exact`)."""
    keys = {key for by in [*cands.values(), *(members or {}).values()] for key in by} - done
    units = [
        w for w in work_units(root) if condition_key(w.condition.task, w.condition.modality) in keys
    ]
    pending = OpenConditions(keys, units)
    for key in pending.empty():
        mark(key)  # candidates but no examples left to re-run: nothing to measure
    if not units:
        return 0
    count = min(config.actors.count, len(units))
    families = sorted(cands)
    with (
        session.actors(
            ExactWorker, config, store, None, families, spec=config.actors, count=count
        ) as fleet,
        progress(len(units), desc="exact pass", unit="it", enabled=show) as bar,
    ):
        for part in fleet.map(units):
            spill(store, part)
            if received is not None:
                received(part)
            if fault is not None:
                fault.reached("reduce.exact.spilled")
            bar.update(1)
            if pending.add(part):
                write(part.key)
                mark(part.key)
    return len(units)
