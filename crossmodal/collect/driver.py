"""The collect driver: plan, open the store, run pilots then work units on a fleet, merge.

The driver (:func:`run_collect`) is the only writer of metadata: it plans
(:mod:`crossmodal.collect.plan`), creates or resumes the store
(:class:`~crossmodal.store.collect_store.CollectStore`), runs the pending pilots, then the
pending work units on :class:`~crossmodal.collect.collector.Collector` actors, marks each in
the manifest AFTER its writer returned (so a half-written part is redone on resume), merges
each condition as soon as all its parts are done, and writes provenance.
"""

from __future__ import annotations

import json
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
    check_memory,
    estimate_size,
    family_sizes,
    format_plan,
    unit_index,
)
from crossmodal.errors import disk_need
from crossmodal.fleet import ActorFleet, FaultPoint, RaySession
from crossmodal.fleet import progress as progress_bar
from crossmodal.model.units import UnitIndex
from crossmodal.store import names
from crossmodal.store.collect_store import CollectStore, now, skipped_examples
from crossmodal.store.integrity import repairable, scan
from crossmodal.store.layout import StoreError
from crossmodal.store.location import (
    check_reachable,
    copy_command,
    is_local,
    is_url,
    register,
    register_inputs,
    resolve,
    upath,
)
from crossmodal.store.lock import output_lock
from crossmodal.store.output_root import resolve_output

__all__ = ["BOUNDARIES", "Collector", "collect_file", "run_collect"]

BOUNDARIES = (
    "collect.store.created",
    "collect.edges.marked",
    "collect.part.marked",
    "collect.merge.written",
    "collect.merge.recorded",
    "collect.parts.deleted",
    "collect.finished",
)
"""The driver's write boundaries, in order: a place between two of its writes where
``CROSSMODAL_FAULT="driver:at=<boundary>"`` kills it (crossmodal/fleet/faults.py); a resume
from each gives the store of a clean run (tests/test_collect_faults.py)."""


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


def _language_table(config: CollectConfig) -> dict[str, int] | None:
    """Output language -> tag id of the configured model, from its generation config (no
    weights); ``random:<size>`` from :mod:`crossmodal.model.load`'s tables. None when not
    readable here (a hub model that is not cached)."""
    import inspect

    from transformers import GenerationConfig

    from crossmodal.model.load import RANDOM_PREFIX, RANDOM_SIZES, build_random_model

    source: str | Path = config.model
    if source == RANDOM_PREFIX + "large":
        from crossmodal.model.processor import language_ids

        return language_ids()
    if source == RANDOM_PREFIX + "tiny":  # the last ids, one per language of its default list
        languages = inspect.signature(build_random_model).parameters["languages"].default
        first = RANDOM_SIZES["tiny"]().vocab_size - len(languages)
        return {lang: first + i for i, lang in enumerate(languages)}
    if source == ORGANISM_SOURCE:
        from crossmodal.organism import organism_path

        source = organism_path()
    elif is_url(source):  # its configs, synced once into the cache (store/inputs.py)
        from crossmodal.model.load import model_files

        source = model_files(str(source))
    try:
        gen = GenerationConfig.from_pretrained(
            source, revision=config.revision, local_files_only=True
        )
    except (OSError, ValueError):
        return None
    return dict(getattr(gen, "text_decoder_lang_to_code_id", None) or {})


def _check_writable(config: CollectConfig, plan: Plan) -> None:
    """Refuse targets the model has no language tag for, before any store is written (the
    actors would otherwise fail on the first batch). Skipped when the model's generation
    config is not readable here (a hub model that is not cached): the actors check then."""
    table = _language_table(config) or {}
    missing = sorted({c.target for c in plan.conditions} - set(table))
    if table and missing:
        raise ValueError(
            f"languages must be one of {sorted(table)} (those model {config.model!r} writes) "
            f"where a task writes them, got {missing!r}; drop them or their tasks (en2x, asr)"
        )


def _model_dir(config: CollectConfig) -> Path | None:
    """The directory the model is read from (the organism's too), or None (hub id, random)."""
    if config.model == ORGANISM_SOURCE:
        from crossmodal.organism import organism_path

        return Path(organism_path())
    if is_url(config.model):
        from crossmodal.model.load import model_files

        return model_files(config.model)
    path = Path(config.model).expanduser()
    return path if (path / "config.json").is_file() else None


def _tokenizer_size(path: Path) -> int:
    """Ids of the tokenizer saved in ``path`` (``tokenizer.json``: its vocabulary and added
    tokens) without loading it; 0 without that file (the actors' load_model checks then)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return 0
    data = json.loads(file.read_text())
    vocab = data.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
    return max([*ids, *(t["id"] for t in data.get("added_tokens", []))], default=-1) + 1


def _check_vocabulary(config: CollectConfig) -> None:
    """The refusal of :func:`crossmodal.model.load.check_vocabulary` from the directory's
    files alone (config, generation config, tokenizer), before any actor loads the model."""
    from crossmodal.model.load import check_vocabulary_sizes

    path = _model_dir(config)
    if path is None:
        return
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    tokens = _tokenizer_size(path)
    tags = max((_language_table(config) or {}).values(), default=-1) + 1
    check_vocabulary_sizes(config.model, vocab, tokens, tags)


def _check_dtype(config: CollectConfig) -> None:
    """bf16 on a GPU without it is refused here, not by every actor (load.resolve_dtype)."""
    import torch

    from crossmodal.model.load import resolve_dtype

    if config.actors.num_gpus > 0 and torch.cuda.is_available():
        resolve_dtype(config.dtype, torch.device("cuda"))


def _check_before_actors(config: CollectConfig, plan: Plan, index: UnitIndex) -> None:
    """Every refusal that needs no store and no actor, one line each: targets without a
    language tag, a dtype the device lacks, a vocabulary the model cannot hold, a plan
    whose actor memory cannot fit (docs/benchmarks.md, "Real shapes on CPU")."""
    _check_writable(config, plan)
    _check_dtype(config)
    _check_vocabulary(config)
    check_memory(plan, family_sizes(index))


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
        ValueError: the data is absent (only ``dry_run`` works then); a target language,
            dtype, vocabulary or actor memory the model or device cannot serve (one line).
    """
    start = time.time()
    config = config.with_output(resolve_output(config.output, config.output_root))
    register(config.output, config.storage_options)  # an s3:// output: its endpoint, region
    register_inputs(config)  # s3:// model and data: the same options, checked up front
    plan = build_plan(config)
    index = unit_index(config)
    echo(format_plan(plan, family_sizes(index), source))
    out = {
        "store": resolve(config.output),
        "plan_hash": plan.hash,
        "ran": 0,
        "work_units": len(plan.work_units),
        "resumed": 0,
        "examples": plan.n_examples,
    }
    if dry_run:
        return out
    _refuse_estimated(config, plan)
    store = upath(out["store"])
    _check_before_actors(config, plan, index)
    check_reachable(store)  # a URL: endpoint, bucket, credentials, one line each
    need = sum(s.compressed for s in estimate_size(plan, family_sizes(index)))
    if is_local(store) and not (store / "zarr.json").is_file():  # new store: before any write
        _check_disk(store, need)
    run = _Run(config, plan, store, out, start=start, echo=echo, progress=progress)
    with (
        disk_need(need, "the plan's compressed estimate of the whole store"),
        output_lock(store, "collect", echo=echo),  # one writer per store (store/lock.py)
    ):
        return _collect(run, index, address)


def _refuse_estimated(config: CollectConfig, plan: Plan) -> None:
    """A plan made without the data (its counts estimated) runs only as a dry run."""
    if plan.estimated:
        url = is_url(config.data.path)
        raise ValueError(
            f"data.path must be one of [an existing dataset directory], got "
            f"{config.data.path!r}{' (no objects under it)' * url}; only --dry-run works "
            "without the data" + f" (upload it: {copy_command(str(config.data.path))})" * url
        )


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
    fault = FaultPoint("driver", run.store)  # CROSSMODAL_FAULT, see fleet/faults.py
    store = CollectStore.open(run.store, run.plan, index)
    fault.reached("collect.store.created")
    _check_resume(run, store)
    pilots, units = _pending(run.plan, store.manifest)
    run.out["resumed"] = len(run.plan.work_units) - len(units)
    if pilots or units:
        with RaySession(address) as session:
            spec = run.config.actors
            args = (Collector, run.config, str(run.store))
            with session.actors(*args, spec=spec, output=run.store) as fleet:
                for summary in fleet.map(pilots):
                    for modality in summary["modalities"]:
                        store.mark_edges(summary["task"], modality, summary)
                    fault.reached("collect.edges.marked")
                _run_units(run, store, fleet, units, fault)
    store.merge_ready(run.plan, keep_parts=run.config.keep_parts, reached=fault.reached)
    provenance = dict(store.root.attrs.get("provenance", {}))
    if run.model_provenance:
        provenance["model"] = run.model_provenance
    store.finish({"finished": now(), "provenance": provenance})
    fault.reached("collect.finished")
    return _report(run, store)


def _check_resume(run: _Run, store: CollectStore) -> None:
    """Verify what the resume skips: every chunk of recorded work decodes (checksums), every
    shard a recorded region needs exists, counts match the recorded rows. Damaged work is
    un-recorded and runs again; damage no work unit rewrites (array metadata, labels, an
    edited config) is refused with one line. Parts left by a crash between a condition's
    merge record and their deletion are deleted (docs/reliability.md)."""
    done = store.manifest
    if not (done["parts"] or done["edges"] or done["merged"]):
        return  # a new store: nothing recorded, nothing to check
    damage = scan(store.root)
    fatal = [d for d in damage if not d.repairable]
    if fatal:
        more = f" (and {len(damage) - 1} more: `crossmodal verify {run.store}`)" * (len(damage) > 1)
        raise StoreError(f"store {str(run.store)!r}: {fatal[0].line()}{more}")
    if damage:
        parts, conds, edges = repairable(damage)
        if not run.config.keep_parts:  # their siblings' shards are gone: redo the whole condition
            for cond in run.plan.conditions:
                if cond.key in conds:
                    parts |= {w.index for w in run.plan.units_of(cond)}
        run.echo(
            f"resume: {len(damage)} damaged chunk(s), first {damage[0].line().split(';')[0]}; "
            f"recollecting work units {sorted(parts)}"
        )
        files = sorted({d.key for d in damage if d.key is not None})
        store.forget(sorted(parts), sorted(conds), sorted(edges), files)
    if not run.config.keep_parts:
        store.delete_merged_parts(run.plan)


def _run_units(
    run: _Run, store: CollectStore, fleet: ActorFleet, units: list[WorkUnit], fault: FaultPoint
) -> None:
    """Run the pending work units; record and merge as each one returns (``fault`` ticks
    after each, and is reached at every write boundary)."""
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
            fault.reached("collect.part.marked")
            run.model_provenance = summary["provenance"]
            out["ran"] += 1
            bar.update(plan.work_units[summary["part"]].n_examples)
            n_done = out["resumed"] + out["ran"]
            bar.set_postfix_str(f"work units {n_done}/{len(plan.work_units)}")
            store.merge_ready(plan, keep_parts=run.config.keep_parts, reached=fault.reached)


def _report(run: _Run, store: CollectStore) -> dict[str, Any]:
    """The final lines, and the dropped-row count in the returned summary."""
    out = run.out
    out["seconds"] = time.time() - run.start
    run.echo(
        f"collected {out['ran']} work units ({out['resumed']} already done) into {run.store} "
        f"in {out['seconds']:.1f} s"
    )
    skipped = skipped_examples(store.root)
    if skipped:  # per id: the plan attrs and the manifest parts (store/collect_store.py)
        counts = ", ".join(f"{k}={len(v)}" for k, v in sorted(skipped.items()))
        run.echo(
            f"skipped examples: {counts} (ids: crossmodal.store.collect_store.skipped_examples)"
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
