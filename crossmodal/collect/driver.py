"""The collect driver: plan, open the store, run pilots then work units on a fleet, merge.

The driver (:func:`run_collect`) is the only writer of metadata: it plans
(:mod:`crossmodal.collect.plan`), creates or resumes the store
(:class:`~crossmodal.store.collect_store.CollectStore`), runs the pending pilots, then the
pending work units on :class:`~crossmodal.collect.collector.Collector` actors, marks each in
the manifest AFTER its writer returned (so a half-written part is redone on resume), merges
each condition as soon as all its parts are done, and writes provenance.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossmodal.collect.collector import Collector
from crossmodal.collect.config import ORGANISM_SOURCE, CollectConfig, load_config
from crossmodal.collect.plan import (
    PilotUnit,
    Plan,
    WorkUnit,
    build_plan,
    estimate_size,
    family_sizes,
    format_plan,
    unit_index,
)
from crossmodal.fleet import ActorFleet, FaultPoint, RaySession
from crossmodal.fleet import progress as progress_bar
from crossmodal.model.units import UnitIndex
from crossmodal.store import names
from crossmodal.store.collect_store import CollectStore, now
from crossmodal.store.lock import OutputLock

__all__ = ["Collector", "collect_file", "run_collect"]


def _check_disk(store: Path, need: int) -> None:
    """Refuse to start a store the disk cannot hold (the compressed peak estimate)."""
    parent = next(p for p in (store, *store.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if need > free:
        raise ValueError(
            f"output disk must have one of [>= {need / 1e9:.1f} GB free] (the plan's compressed "
            f"estimate), got {free / 1e9:.1f} GB at {str(parent)!r}; free space or choose "
            "another output"
        )


def _check_writable(config: CollectConfig, plan: Plan) -> None:
    """Refuse targets the model has no language tag for, before any store is written (the
    actors would otherwise fail on the first batch). Skipped when the model's generation
    config is not readable here (a hub model that is not cached): the actors check then."""
    from transformers import GenerationConfig

    source: str | Path = config.model
    if source == ORGANISM_SOURCE:
        from crossmodal.organism import organism_path

        source = organism_path()
    try:
        gen = GenerationConfig.from_pretrained(
            source, revision=config.revision, local_files_only=True
        )
    except (OSError, ValueError):
        return
    table = getattr(gen, "text_decoder_lang_to_code_id", None) or {}
    missing = sorted({c.target for c in plan.conditions} - set(table))
    if table and missing:
        raise ValueError(
            f"languages must be one of {sorted(table)} (those model {config.model!r} writes) "
            f"where a task writes them, got {missing!r}; drop them or their tasks (en2x, asr)"
        )


def run_collect(
    config: CollectConfig,
    *,
    address: str | None = None,
    dry_run: bool = False,
    source: str = "",
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Plan, then (unless ``dry_run``) collect into ``config.output``, resuming what is done.

    Args:
        address: Ray address (``auto`` = a running head); ``None`` connects to the cluster of
            a ``ray job submit`` or starts an in-process Ray.
        echo: where the plan and the final line go.

    Returns:
        ``{"store", "plan_hash", "work_units", "ran", "resumed", "examples", "seconds"}``.

    Raises:
        StoreError: the output holds another config's or another plan's store.
        ValueError: the data is absent (only ``dry_run`` works then).
    """
    start = time.time()
    plan = build_plan(config)
    index = unit_index(config)
    echo(format_plan(plan, family_sizes(index), source))
    out = {
        "store": str(Path(config.output).resolve()),
        "plan_hash": plan.hash,
        "ran": 0,
        "work_units": len(plan.work_units),
        "resumed": 0,
        "examples": plan.n_examples,
    }
    if dry_run:
        return out
    if plan.estimated:
        raise ValueError(
            f"data.path must be one of [an existing dataset directory], got "
            f"{config.data.path!r}; only --dry-run works without the data"
        )
    store = Path(out["store"])
    _check_writable(config, plan)
    if not (store / "zarr.json").is_file():  # a new store: checked before anything is written
        _check_disk(store, sum(s.compressed for s in estimate_size(plan, family_sizes(index))))
    run = _Run(config, plan, store, out, start=start, echo=echo, progress=progress)
    with OutputLock(store, "collect", echo=echo):  # one writer per store (store/lock.py)
        return _collect(run, index, address)


@dataclass
class _Run:
    """What one collect run carries from planning to its last line."""

    config: CollectConfig
    plan: Plan
    store: Path
    out: dict[str, Any]
    start: float
    echo: Callable[[str], None]
    progress: bool
    model_provenance: dict[str, Any] = field(default_factory=dict)


def _pending(
    plan: Plan, done: dict[str, Any]
) -> tuple[list[tuple[PilotUnit, ...]], list[WorkUnit]]:
    """The pilot jobs and work units still to run.

    One job per task with every modality's pilot (shared edges, see
    :mod:`crossmodal.collect.collector`); a task with any pilot missing runs all again: no
    part ran before every pilot was done.
    """
    missing = {
        p.task for p in plan.pilots if names.condition_key(p.task, p.modality) not in done["edges"]
    }
    tasks = [task for task in dict.fromkeys(p.task for p in plan.pilots) if task in missing]
    pilots = [tuple(p for p in plan.pilots if p.task == task) for task in tasks]
    units = [w for w in plan.work_units if str(w.index) not in done["parts"]]
    return pilots, units


def _collect(run: _Run, index: UnitIndex, address: str | None) -> dict[str, Any]:
    """The locked part of :func:`run_collect`: create or resume the store, run, merge, finish."""
    store = CollectStore.open(run.store, run.plan, index)
    pilots, units = _pending(run.plan, store.manifest)
    run.out["resumed"] = len(run.plan.work_units) - len(units)
    driver_fault = FaultPoint("driver", run.store)  # CROSSMODAL_FAULT, see fleet/faults.py
    if pilots or units:
        with RaySession(address) as session:
            spec = run.config.actors
            with session.actors(Collector, run.config, str(run.store), spec=spec) as fleet:
                for summary in fleet.map(pilots):
                    for modality in summary["modalities"]:
                        store.mark_edges(summary["task"], modality, summary)
                _run_units(run, store, fleet, units, driver_fault)
    store.merge_ready(run.plan, keep_parts=run.config.keep_parts)
    provenance = dict(store.root.attrs.get("provenance", {}))
    if run.model_provenance:
        provenance["model"] = run.model_provenance
    store.finish({"finished": now(), "provenance": provenance})
    return _report(run, store)


def _run_units(
    run: _Run, store: CollectStore, fleet: ActorFleet, units: list[WorkUnit], fault: FaultPoint
) -> None:
    """Run the pending work units; record and merge as each one returns (``fault`` ticks
    after each)."""
    plan, out = run.plan, run.out
    initial = plan.n_examples - sum(w.n_examples for w in units)
    bar = progress_bar(
        plan.n_examples, desc="collect", unit="ex", enabled=run.progress, initial=initial
    )
    with bar:
        for summary in fleet.map(units, fault=fault):
            store.mark_part(
                summary["part"], {k: v for k, v in summary.items() if k != "provenance"}
            )
            run.model_provenance = summary["provenance"]
            out["ran"] += 1
            bar.update(plan.work_units[summary["part"]].n_examples)
            n_done = out["resumed"] + out["ran"]
            bar.set_postfix_str(f"work units {n_done}/{len(plan.work_units)}")
            store.merge_ready(plan, keep_parts=run.config.keep_parts)


def _report(run: _Run, store: CollectStore) -> dict[str, Any]:
    """The final lines, and the dropped-row count in the returned summary."""
    out = run.out
    out["seconds"] = time.time() - run.start
    run.echo(
        f"collected {out['ran']} work units ({out['resumed']} already done) into {run.store} "
        f"in {out['seconds']:.1f} s"
    )
    out["dropped"] = sum(int(p.get("dropped", 0)) for p in store.manifest["parts"].values())
    if out["dropped"]:  # rows with NaN/Inf are dropped by the statistics: reported, never merged
        run.echo(
            f"warning: {out['dropped']} example rows with NaN/Inf activations were dropped, "
            "not merged (summed over families, steps, poolings; per condition: "
            "stats/<family>/dropped)"
        )
    return out


def collect_file(
    path: str | Path,
    *,
    address: str | None = None,
    dry_run: bool = False,
    output: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``crossmodal collect CONFIG``: load and validate the file, then :func:`run_collect`."""
    config = load_config(path)
    if output is not None:
        config = config.with_output(output)
    kw = {"address": address, "dry_run": dry_run, "echo": echo, "progress": progress}
    return run_collect(config, source=str(path), **kw)
