"""The reduce job: runs the four passes over a finished collect store, in place, resumably.

Passes, each recorded in the root attribute ``reduce`` when done and skipped on re-run:

1. ``selectivity`` (:mod:`crossmodal.reduce.selectivity`): AP, AUROC and bounds of every
   unit per condition, from the histograms.
2. ``exact`` (:mod:`crossmodal.reduce.exact`): exact AP of the units the AP intervals leave
2. ``exact`` (:mod:`crossmodal.reduce.exact`): exact AP of the units the AP intervals leave
   undecided or put surely in a set (of every unit when the spill fits the every-unit
   budget), and the exemplars of the plan's members; recorded per (task, modality) pair, so
   an interrupted pass redoes only the open pairs.
3. ``sets`` (:mod:`crossmodal.reduce.sets`): the exact sets, their Parquet table
   (``<store>-sets/<family>.parquet``), the optional CSVs, roles and overlap, then
   (:mod:`crossmodal.reduce.fidelity`) Spearman bounds, exemplars and set stability. Redone
   (with pass 2) when k, scopes, widen or the every-unit choice change; the table and the
   family's CSV folder are then replaced whole.
4. ``modality`` (:mod:`crossmodal.reduce.modality`): v1 modality-selective units of the
   decoder families. Redone when k changes.

Pass 1 records a digest of the values it wrote per selectivity group (``digests``); a
re-run recomputes it before skipping the pass and redoes the family (all four passes) when
it differs, and steering keys its cells by it (:mod:`crossmodal.steer.source`). The driver
reaches a named write boundary (:data:`BOUNDARIES`, :class:`crossmodal.fleet.FaultPoint`)
between every two writes, so a test kills it at each and checks the re-run.

Group layout: :mod:`crossmodal.store.results`. Only the driver creates arrays and writes
attrs (docs/design.md, "Crash safety and resume"). Activation concentration (Gini) needs no
pass: collect merges it per condition into ``concentration/<family>``;
:meth:`crossmodal.store.results.Results.concentration` reads it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

from crossmodal.collect.config import CollectConfig, from_dict
from crossmodal.fleet import FaultPoint, RaySession
from crossmodal.reduce.ap_accuracy import EVERY_UNIT_BYTES, every_unit_bytes, fits_every_unit
from crossmodal.reduce.exact import (
    MEMBERS,
    Candidates,
    ExactPart,
    ExactPlan,
    create_exact,
    drop_spill,
    exact_pass,
    exact_plan,
    same_candidates,
    write_exact,
)
from crossmodal.reduce.exemplars import PairExemplars, write_pair
from crossmodal.reduce.fidelity import exact_views, write_fidelity
from crossmodal.reduce.labels import store_labels
from crossmodal.reduce.modality import FAMILIES as MODALITY_FAMILIES
from crossmodal.reduce.modality import modality_pass
from crossmodal.reduce.selection import GROUPS, check_k, expand_scopes, parse_scope
from crossmodal.reduce.selectivity import selectivity_digest, selectivity_pass
from crossmodal.reduce.sets import (
    clear_csvs,
    final_sets,
    sets_table,
    sets_table_path,
    write_analyses,
    write_csvs,
    write_sets_table,
)
from crossmodal.reduce.stability import example_halves
from crossmodal.store.datasets import write_dataset
from crossmodal.store.layout import LAYOUT_VERSION, StoreError, jsonable
from crossmodal.store.location import check_reachable, is_url, resolve, upath, zarr_store
from crossmodal.store.lock import output_lock
from crossmodal.store.names import (
    MANIFEST,
    PLAN,
    condition_key,
    default_pooling,
    exact_group,
    modality_group,
    selectivity_group,
    sets_group,
    stats_group,
)
from crossmodal.store.results import Results
from crossmodal.store.verify import check_integrity

PASSES = ("selectivity", "exact", "sets", "modality")
"""The passes, in order; the keys of the root attribute ``reduce``."""
BOUNDARIES = (
    "reduce.selectivity.created",
    "reduce.selectivity.blocks_written",
    "reduce.selectivity.written",
    "reduce.selectivity.recorded",
    "reduce.exact.created",
    "reduce.exact.spilled",
    "reduce.exact.written",
    "reduce.exact.marked",
    "reduce.sets.written",
    "reduce.sets.csv_written",
    "reduce.sets.analyses_written",
    "reduce.sets.recorded",
    "reduce.modality.written",
    "reduce.modality.recorded",
)
"""The write boundaries of the reduce driver, in the order a first run reaches them
(``CROSSMODAL_FAULT="driver:at=<boundary>"``, crossmodal/fleet/faults.py)."""


class PassLog:
    """The root attribute ``reduce``: what each pass did, per family, rewritten on each save.

    Layout: ``{"selectivity": {family: summary}, "exact": {family: {"params", "done":
    ["task/modality", ...]}}, "sets": {family: params}, "modality": {family: summary}}``.
    """

    def __init__(self, root: zarr.Group) -> None:
        self.root = root
        self.state: dict[str, Any] = dict(root.attrs.get("reduce", {}))

    def get(self, *keys: str) -> Any:
        """The value at ``keys``, or None."""
        node: Any = self.state
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node

    def save(self, *keys: str, value: Any) -> None:
        """Set the value at ``keys`` and write the whole log to the store."""
        node = self.state
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.root.attrs["reduce"] = jsonable(self.state)

    def forget(self, family: str) -> None:
        """Drop every pass of ``family`` (recorded before its groups are rewritten)."""
        for name in PASSES:
            (self.state.get(name) or {}).pop(family, None)
        self.root.attrs["reduce"] = jsonable(self.state)


def open_reducible(store: str | Path) -> zarr.Group:
    """The store, if collect finished every condition of its plan and nothing in it is
    damaged: a flipped byte, a missing shard or an edited config would otherwise give wrong
    selectivity (a deleted mean shard reads as NaN ``off_mean``), never an error."""
    path = upath(store)
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"store must be one of [a collect store], got {str(path)!r}; "
            "run `crossmodal collect CONFIG` first"
        )
    root = zarr.open_group(zarr_store(path), mode="r+")
    version = root.attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreError(
            f"store layout_version must be one of [{LAYOUT_VERSION}], got "
            f"{version!r}; collect it again with this version"
        )
    wanted = {
        condition_key(w["task"], w["modality"], w["language"])
        for w in root[PLAN].attrs["work_units"]
    }
    merged = set(root[MANIFEST].attrs["merged"])
    if not wanted <= merged:
        raise StoreError(
            f"store must be one of [finished by collect], got {len(wanted & merged)} of "
            f"{len(wanted)} conditions merged in {str(path)!r}; resume it with "
            "`crossmodal collect CONFIG` (its own config)"
        )
    damage = check_integrity(root)  # checksums, missing shards, config hash (verify.py)
    if damage:
        raise StoreError(
            f"store must be one of [undamaged], got {len(damage)} damaged item(s) in "
            f"{str(path)!r}, first: {damage[0]}"
        )
    return root


def _valid_scope(scope: str) -> bool:
    try:
        expand_scopes([scope], [0])
    except ValueError:
        return False
    return True


def run_reduce(
    store: str | Path,
    *,
    k: int = 1000,
    scopes: Sequence[str] = ("all", "attention", "ffn"),
    widen: float = 1e-6,
    csv: bool = False,
    csv_dir: str | Path | None = None,
    address: str | None = None,
    num_cpus: float = 0.25,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    every_unit_budget: int = EVERY_UNIT_BYTES,
) -> dict[str, Any]:
    """Reduce a finished collect store in place (resumable; see the module docstring).

    Args:
        k: units per side of each set (top-k, bottom-k; both = their union).
        scopes: unit groups each ranking runs over (:data:`crossmodal.reduce.selection.GROUPS`),
            optionally per layer: ``ffn@3``, or ``all@*`` for one scope per layer.
        widen: margin added to every AP interval before planning the exact pass (covers
            float differences between the collect run and the exact re-run).
        csv: also write one CSV per set (the reference study's expertise files).
        csv_dir: where the CSVs go; default ``<store parent>/<store name>-csv``. A re-run
            of the sets pass empties the family's folder there first.
        address: Ray address (``auto``: a running head); None: in-process or job cluster.
        num_cpus: Ray CPUs per selectivity task (fractional: many tasks per core).
        every_unit_budget: bytes the exact pass may spill to re-collect EVERY unit (exact AP
            of all units for the Spearman analyses, set stability); a plan needing more (or
            more than half the free disk) re-collects the undecided units only (0: never).

    Returns:
        ``{"store", "ran": [passes run], "skipped": [...], "exact_units", "sets_tables",
        "csv", "seconds"}``.
    """
    start, path = time.time(), resolve(store)
    check_k(k)
    _check_scopes(scopes)
    check_reachable(path)  # a URL: endpoint, bucket, credentials, one line each
    root = open_reducible(path)
    with output_lock(path, "reduce", echo=echo):  # one writer per store (lock.py)
        job = ReduceJob(root, path, k, scopes, widen, num_cpus, progress, echo)
        job.decide_every_unit(every_unit_budget)
        with RaySession(address, output=path) as session:  # a local path: shared by all nodes
            job.selectivity(session)
            job.exact(session)
        csv_root = upath(csv_dir) if csv_dir else upath(path).parent / f"{upath(path).stem}-csv"
        job.sets(csv_root, csv)
        job.modality()
    out = job.out
    out["seconds"] = time.time() - start
    csvs = f"; {out['csv']} CSVs in {csv_root}" if csv else ""
    echo(
        f"reduced {path}: ran {', '.join(out['ran']) or 'nothing'}; exact pass re-ran "
        f"{out['exact_units']} work units; sets in {sets_table_path(path, '*').parent}{csvs}; "
        f"{out['seconds']:.1f} s"
    )
    return out


def _check_scopes(scopes: Sequence[str]) -> None:
    bad = [s for s in scopes if not _valid_scope(s)]
    if bad or not scopes:
        raise ValueError(
            f"scopes must be one of {list(GROUPS)}, optionally with '@<layer>' or '@*', got "
            f"{list(scopes)!r}; e.g. all,ffn,all@*"
        )


class ReduceJob:
    """The locked part of :func:`run_reduce`: one method per pass, in order; ``out`` is the
    summary :func:`run_reduce` returns."""

    def __init__(
        self,
        root: zarr.Group,
        path: str,
        k: int,
        scopes: Sequence[str],
        widen: float,
        num_cpus: float,
        progress: bool,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.root, self.path, self.k, self.widen = root, path, k, widen
        self.num_cpus, self.progress, self.echo = num_cpus, progress, echo
        self.fault = FaultPoint("driver", path)  # CROSSMODAL_FAULT (fleet/faults.py)
        self.config: CollectConfig = from_dict(root.attrs["config"])
        self.families = [f for f in self.config.families if stats_group(f) in root]
        self.labels = {f: store_labels(root, f) for f in self.families}  # read once
        self.scopes = self._expand(scopes)
        self.log = PassLog(root)
        self.params = {"k": int(k), "scopes": list(self.scopes), "widen": float(widen)}
        self.out: dict[str, Any] = {
            "store": path,
            "ran": [],
            "skipped": [],
            "exact_units": 0,
            "sets_tables": [],
            "csv": 0,
        }
        self.views: dict[str, dict[str, xr.Dataset]] = {}
        self.pending: list[str] = []
        self.plans: dict[str, ExactPlan] = {}
        self.every_unit = False
        self.exemplars: dict[str, PairExemplars] = {}

    def decide_every_unit(self, budget: int) -> None:
        """Re-collect every unit in the exact pass when its spill fits ``budget`` and half
        the free disk (docs/method.md, "Accuracy of all-unit AP"); part of the parameters."""
        units = sum(len(self.labels[f]["unit"]) for f in self.families)
        plan = self.root[PLAN].attrs["work_units"]
        examples = sum(len(w["ids"]) for w in plan)
        slots = len(self.config.steps) * len(self.config.poolings)
        need = every_unit_bytes(examples, units, slots)
        local = not is_url(self.path)  # object storage: no disk to fill, the budget alone
        free = shutil.disk_usage(self.path).free if local else 2 * need
        self.every_unit = fits_every_unit(need, free, budget)
        self.params["every_unit"] = self.every_unit

    def _expand(self, scopes: Sequence[str]) -> list[str]:
        """``group@*`` -> one scope per layer; every per-layer scope names a layer."""
        lab = self.labels
        layers = sorted({int(x) for f in self.families for x in lab[f]["layer"] if x >= 0})
        scopes = expand_scopes(scopes, layers)
        bad = [
            s for s in scopes if (layer := parse_scope(s)[1]) is not None and layer not in layers
        ]
        if bad:
            raise ValueError(f"scopes must be one of [layers {layers}], got {bad!r}; pick a layer")
        return scopes

    def selectivity(self, session: RaySession) -> None:
        """Pass 1 for every family not done yet (or whose recorded digest no longer holds)."""
        for f in self.families:
            if self._verified(f):
                self.out["skipped"].append(f"selectivity/{f}")
                continue
            summary = selectivity_pass(
                session,
                self.root,
                self.path,
                f,
                self.config,
                self.num_cpus,
                self.progress,
                self.fault,
            )
            self.fault.reached("reduce.selectivity.written")
            self.log.save("selectivity", f, value=asdict(summary))
            self.fault.reached("reduce.selectivity.recorded")
            self.out["ran"].append(f"selectivity/{f}")
        res = Results(upath(self.path))
        self.views = {
            f: {p: res.selectivity(f, p) for p in self.config.poolings} for f in self.families
        }
        self.pending = [f for f in self.families if not self._sets_done(f)]

    def _groups(self, family: str) -> list[str]:
        poolings = self.config.poolings
        return [selectivity_group(family, p, poolings) for p in poolings]

    def _verified(self, family: str) -> bool:
        """Whether pass 1 of ``family`` is recorded AND its groups still hold what it wrote
        (the digests); an older record without digests gets them. A mismatch forgets every
        pass of the family, so all four are redone (a resume verifies what it skips)."""
        recorded = self.log.get("selectivity", family)
        if not recorded:
            return False
        try:
            now = {g: selectivity_digest(self.path, g) for g in self._groups(family)}
        except (KeyError, FileNotFoundError, ValueError) as err:
            now = {"unreadable": f"{type(err).__name__}: {err}"}
        if "digests" not in recorded and "unreadable" not in now:
            self.log.save("selectivity", family, "digests", value=now)
            return True
        if recorded.get("digests") == now:
            return True
        self.echo(
            f"selectivity/{family} no longer holds what reduce recorded (digest "
            f"{recorded.get('digests')} != {now}); redoing every pass of {family}"
        )
        self.log.forget(family)
        return False

    def _sets_done(self, family: str) -> bool:
        """Sets recorded with these parameters and their group present."""
        return (
            self.log.get("sets", family) == self.params
            and (upath(self.path) / sets_group(family) / "units" / "zarr.json").is_file()
        )

    def exact(self, session: RaySession) -> None:
        """Pass 2 for the families whose sets are not done with these parameters."""
        pending = self.pending
        self.plans = {
            f: exact_plan(self.views[f], self.k, self.scopes, self.widen, self.every_unit)
            for f in pending
        }
        for f in pending:
            self._create_exact(f)
        done = set.intersection(
            *[set(self.log.get("exact", f, "done")) for f in pending] or [set()]
        )
        cands: Candidates = {f: self.plans[f].candidates for f in pending}
        unions = {
            f: zarr.open_array(zarr_store(self.path), path=f"{exact_group(f)}/unit", mode="r")[...]
            for f in pending
        }

        halves = example_halves(self.root, self.config.seed) if self.every_unit else {}

        def write(key: str) -> None:
            pair = self.exemplars.pop(key, PairExemplars())
            for f, by in cands.items():
                if key in by:
                    write_exact(
                        self.path, f, key, by[key], unions[f], self.labels[f], halves.get(key)
                    )
                write_pair(self.path, f, key, pair)
            self.fault.reached("reduce.exact.written")

        def mark(key: str) -> None:
            for f in pending:
                finished = sorted({*self.log.get("exact", f, "done"), key})
                self.log.save("exact", f, "done", value=finished)
            self.fault.reached("reduce.exact.marked")

        self.out["exact_units"] = exact_pass(
            session,
            self.root,
            self.path,
            self.config,
            cands,
            write,
            mark,
            done,
            self.progress,
            self.fault,
            {f: self.plans[f].members for f in pending},
            self._received,
        )
        for f in pending:  # every pair is written and marked: the spilled values can go
            drop_spill(self.path, f)

    def _create_exact(self, family: str) -> None:
        """A new exact group for ``family`` unless the store records this pass with these
        parameters, candidates and members (new k/scopes/widen, or a first run: measure
        anew)."""
        plan, params = self.plans[family], self.params
        recorded = self.log.get("exact", family, "params") == params
        if (
            recorded
            and same_candidates(self.path, family, plan.candidates)
            and same_candidates(self.path, family, plan.members, MEMBERS)
        ):
            return
        poolings = self.config.poolings
        lab = self.labels[family]
        create_exact(
            self.path, family, plan.candidates, lab, poolings, plan.members, self.every_unit
        )
        self.fault.reached("reduce.exact.created")
        self.log.save("exact", family, value={"params": params, "done": []})

    def _received(self, part: ExactPart) -> None:
        """Merge a work unit's exemplars into its pair's (written with the pair)."""
        pair = self.exemplars.setdefault(part.key, PairExemplars())
        pair.add(part.part, part.language, part.extremes, part.examples)

    def sets(self, csv_root: Path, csv: bool) -> None:
        """Pass 3 for the families whose sets are not done with these parameters."""
        res = Results(upath(self.path))
        for f in self.pending:
            exact = res.exact(f)
            exact_ap = exact["ap"].load()
            # the selection plans serve this call only: popped, so they are freed before the
            # analyses (docs/benchmarks.md, "Reduce driver memory at the real shapes")
            plans = self.plans.pop(f).plans
            sets = final_sets(plans, exact_ap, self.config.poolings, self.scopes)
            del plans
            sets = sets.rename("units").assign_attrs(**self.params, exact=True)
            write_dataset(self.path, sets_group(f), sets)
            self.fault.reached("reduce.sets.written")
            table = sets_table(self.views[f], sets, exact_ap, f)
            meta = {"crossmodal.sets": json.dumps({"store": self.path, **self.params})}
            path = write_sets_table(table, sets_table_path(self.path, f), meta)
            del table
            self.out["sets_tables"].append(str(path))
            views = exact_views(self.views[f], exact, self.every_unit)
            # what follows reads exact lazily (ap_half): the loaded AP goes (docs/benchmarks.md,
            # "Reduce driver memory at the real shapes"), as the table did once written
            del exact_ap
            exact = res.exact(f)
            clear_csvs(csv_root / f)
            if csv:
                self.out["csv"] += write_csvs(views, sets, csv_root / f)
            self.fault.reached("reduce.sets.csv_written")
            write_analyses(self.path, f, views, sets, self.k)
            write_fidelity(self.path, f, views, sets, exact, self.scopes, self.k, self.every_unit)
            self.fault.reached("reduce.sets.analyses_written")
            self.log.save("sets", f, value=self.params)
            self.fault.reached("reduce.sets.recorded")
            self.out["ran"].append(f"sets/{f}")
        self.out["skipped"] += [f"sets/{f}" for f in self.families if f not in self.pending]

    def modality(self) -> None:
        """Pass 4 for the decoder families not done with this k."""
        for f in (f for f in self.families if f in MODALITY_FAMILIES):
            poolings = self.config.poolings
            group = modality_group(f, default_pooling(poolings), poolings)
            present = (
                not self.log.get("modality", f, "tasks")
                or (upath(self.path) / group / "zarr.json").is_file()
            )
            if self.log.get("modality", f, "k") == self.k and present:
                self.out["skipped"].append(f"modality/{f}")
                continue
            summary = modality_pass(self.root, self.path, f, self.labels[f], self.k)
            self.fault.reached("reduce.modality.written")
            self.log.save("modality", f, value={**summary, "k": int(self.k)})
            self.fault.reached("reduce.modality.recorded")
            self.out["ran"].append(f"modality/{f}")
