"""The collect job: :class:`Collector` actors run work units; the driver plans, schedules,
records and merges.

A :class:`Collector` is a callable class (style lesson 10): ``__init__`` loads the model and
builds the :class:`~crossmodal.model.capture.Capturer` once; each call runs ONE job, a
:class:`~crossmodal.collect.plan.PilotUnit` (exact values of a pilot sample -> histogram edges, written
to ``edges[t, m]``) or a :class:`~crossmodal.collect.plan.WorkUnit` (statistics kept on the model's
device, written to ``parts[p]``, plus the per-layer Gini sums of
:mod:`crossmodal.stats.concentration` in ``concentration/<family>/parts[p]``), and returns a small
JSON-ready summary. It is importable and testable without Ray; the driver wraps it with
``ray.remote`` and an actor pool.

Edges are shared by the modalities of a task: the driver sends all pilots of one task as ONE
job, whose speech and text values together choose the edges of the decoder families, written
to ``edges[t, m]`` of every modality (encoder families only ever see their own modality). So
speech and text histograms of a task can be compared (the v1 modality-selective units of
:func:`crossmodal.reduce.driver.modality_pass`); a single :class:`PilotUnit` gives one modality's.

The driver (:func:`run_collect`) is the only writer of metadata: it plans, creates or resumes
the store (:mod:`crossmodal.store.layout`), runs the pending pilots, then the pending work units,
marks each in the manifest AFTER its writer returned (so a half-written part is redone on
resume), merges each condition as soon as all its parts are done, and writes provenance.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from crossmodal.stats.concentration import GiniStats, LayerGini, concentration_family
from crossmodal.collect.config import ORGANISM_SOURCE, CollectConfig, load_config
from crossmodal.fleet.faults import FaultPoint, env_vars
from crossmodal.store.lock import OutputLock
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
from crossmodal.data.records import Record
from crossmodal.stats.running import UnitStats, choose_edges
from crossmodal.store.layout import (
    StoreDims,
    UnitCoords,
    create_store,
    finish,
    has_concentration,
    manifest,
    mark_edges,
    mark_part,
    merge_condition,
    open_existing,
    read_edges,
    write_concentration,
    write_edges,
    write_part,
)
from crossmodal.model.units import UnitIndex

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
"""platform.md: without these an in-process ``ray.init()`` turns on token auth."""
_PACKAGES = ("crossmodal", "torch", "transformers", "zarr", "numpy", "ray", "xarray")


def applies(family: str, modality: str) -> bool:
    """Encoder families exist only for their own modality (the other encoder never runs)."""
    return {"speech_encoder": "speech", "text_encoder": "text"}.get(family, modality) == modality


def _batches(records: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


class Collector:
    """One model replica: ``collector(job)`` runs a pilot or a work unit and writes its region.

    Args:
        config: the validated run config.
        store: path of the store, created by the driver.
        device: default ``cuda`` when ``config.actors.num_gpus > 0``, else ``cpu``.
    """

    def __init__(self, config: CollectConfig, store: str | Path, device: str | None = None) -> None:
        from crossmodal.model.capture import Capturer
        from crossmodal.model.load import load_model

        self.config = config
        self.store = str(store)
        use_gpu = config.actors.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device(device or ("cuda" if use_gpu else "cpu"))
        self.loaded = load_model(
            config.model, device=self.device, dtype=config.dtype, revision=config.revision
        )
        self.capturer = Capturer(self.loaded, config.families, config.steps, config.poolings,
                                 config.max_new_tokens, generator=config.generator)  # fmt: skip
        counts = self.capturer.index.counts("family")  # families are contiguous, in order
        ends = np.cumsum([counts[f] for f in self.capturer.index.families])
        self.slices = {f: slice(int(e - counts[f]), int(e))
                       for f, e in zip(self.capturer.index.families, ends, strict=True)}  # fmt: skip
        self.conc_family = concentration_family(self.capturer.index.families)
        self.layer_gini = None
        if self.conc_family is not None:
            layers = UnitCoords.from_index(self.capturer.index, self.conc_family).unit_arrays()
            self.layer_gini = LayerGini(layers["unit_layer"], self.device)
        self._records: OrderedDict[tuple, tuple[list[Record], int]] = OrderedDict()
        self._fault = FaultPoint("collector", self.store)  # CROSSMODAL_FAULT (faults.py)

    def __call__(self, job: WorkUnit | PilotUnit | tuple[PilotUnit, ...]) -> dict[str, Any]:
        return self.run(job) if isinstance(job, WorkUnit) else self.pilot(job)

    # ------------------------------------------------------------------ data

    def load_records(self, language: str, modality: str, ids: tuple[str, ...]) -> tuple[list[Record], int]:
        """Records of ``ids`` (in that order) and how many were skipped; a 2-entry cache
        serves the pivot inputs that en2x runs once per target."""
        key = (language, modality, ids)
        if key not in self._records:
            data, speech = self.config.data, modality == "speech"
            if data.source == ORGANISM_SOURCE:
                from crossmodal.organism import organism_corpus

                n = data.examples_per_language
                found = organism_corpus(data.split, [language], n, self.config.seed, audio=speech)
            else:
                from crossmodal.data.fleurs import FleursParquetSource, FleursSource

                kind = FleursSource if data.source == "fleurs_raw" else FleursParquetSource
                found = kind(data.path, audio=speech, audio_root=data.audio_root).records(
                    language, data.split, ids=ids
                )
            by_id = {r.id: r for r in found}
            records = [by_id[i] for i in ids if i in by_id]
            self._records[key] = (records, len(ids) - len(records))
            while len(self._records) > 2:
                self._records.popitem(last=False)
        return self._records[key]

    def _capture(self, records: Sequence[Record], modality: str, target: str) -> Iterator[Any]:
        from crossmodal.model.inputs import make_batch

        for batch in _batches(records, self.config.batch_size):
            yield self.capturer.run(make_batch(batch, modality, self.loaded), tgt_lang=target)

    @property
    def _step_poolings(self) -> list[tuple[int, int]]:
        return [
            (si, pi)
            for si in range(len(self.config.steps))
            for pi in range(len(self.config.poolings))
        ]

    def _families(self, modality: str) -> list[str]:
        return [f for f in self.config.families if applies(f, modality)]

    # ------------------------------------------------------------------ jobs

    def pilot(self, job: PilotUnit | tuple[PilotUnit, ...]) -> dict[str, Any]:
        """Exact pilot values -> ``choose_edges`` per (family, step, pooling) -> ``edges[t, m]``.

        ``job``: one pilot, or the pilots of every modality of one task (the driver's job):
        a family then takes its edges from the values of every modality it applies to and
        writes them to each of them, so they are shared across modalities.
        """
        start, cfg = time.time(), self.config
        pilots = (job,) if isinstance(job, PilotUnit) else tuple(job)
        task = pilots[0].task
        if any(p.task != task for p in pilots):
            raise ValueError(
                f"pilots must be one of [one task's], got {[p.task for p in pilots]!r}"
            )
        modalities = [p.modality for p in pilots]
        families = [f for f in cfg.families if any(applies(f, m) for m in modalities)]
        values: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        n_examples = skipped = 0
        for cond, ids in (item for p in pilots for item in p.items):
            records, n_skip = self.load_records(cond.source, cond.modality, ids)
            n_examples, skipped = n_examples + len(records), skipped + n_skip
            for res in self._capture(records, cond.modality, cond.target):
                for si, step in enumerate(cfg.steps):
                    for pi, pooling in enumerate(cfg.poolings):
                        v = res.values[(pooling, step)]
                        for f in self._families(cond.modality):
                            values.setdefault((f, si, pi), []).append(v[:, self.slices[f]])
        fallback = []
        t = cfg.tasks.index(task)
        for f, si, pi in [(f, si, pi) for f in families for si, pi in self._step_poolings]:
            rows = torch.cat(values.get((f, si, pi), []) or [torch.zeros(0, 0)])
            if rows.shape[0] == 0:  # no pilot output reached this step: use every step's
                fallback.append(cfg.steps[si])
                every = [x for s in range(len(cfg.steps)) for x in values.get((f, s, pi), [])]
                rows = torch.cat(every or [rows])  # still empty: choose_edges says so
            edges = choose_edges(rows, cfg.n_bins).cpu().numpy()
            for mod in (m for m in modalities if applies(f, m)):  # one at a time: bounded RAM
                write_edges(self.store, f, (t, cfg.modalities.index(mod)), {(si, pi): edges})
        return {"kind": "pilot", "task": task, "modality": modalities[0],
                "modalities": modalities, "n_examples": n_examples, "n_skipped": skipped,
                "edges_from_all_steps": sorted(set(fallback)), "seconds": time.time() - start}  # fmt: skip

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        """All batches of one work unit into on-device :class:`UnitStats`, then ``parts[p]``."""
        start, cfg, cond = time.time(), self.config, unit.condition
        t, m = cfg.tasks.index(cond.task), cfg.modalities.index(cond.modality)
        families = self._families(cond.modality)
        stats = {}
        for f in families:
            edges = torch.as_tensor(read_edges(self.store, f, (t, m)), device=self.device)
            for si, pi in self._step_poolings:
                stats[(f, si, pi)] = UnitStats.empty(edges[si, pi], self.device)
        conc = (
            self.conc_family if has_concentration(zarr.open_group(self.store, mode="r")) else None
        )
        gini = {sp: GiniStats.empty(len(self.layer_gini.layers), self.device)
                for sp in self._step_poolings} if conc else {}  # fmt: skip
        records, skipped = self.load_records(cond.source, cond.modality, unit.example_ids)
        n_rows, n_ended = [0] * len(cfg.steps), [0] * len(cfg.steps)
        texts: list[str] = []
        for res in self._capture(records, cond.modality, cond.target):
            texts.extend(res.texts[: max(0, 3 - len(texts))])
            for si, step in enumerate(cfg.steps):
                n_rows[si] += len(res.rows[step])
                n_ended[si] += res.n_ended[step]
                for pi, pooling in enumerate(cfg.poolings):
                    v = res.values[(pooling, step)]
                    for f in families if len(v) else ():  # update() needs >= 1 row
                        stats[(f, si, pi)].update(v[:, self.slices[f]])
                    if conc and len(v):
                        gini[(si, pi)].update(self.layer_gini(v[:, self.slices[conc]]))
            self._fault.tick()
        for (f, si, pi), s in stats.items():  # one (step, pooling) at a time: bounded host RAM
            write_part(self.store, f, unit.index, {(si, pi): s.to_numpy()})
        if conc:  # [step, pooling, layer] per name: one chunk per array
            arrays = {sp: g.to_numpy() for sp, g in gini.items()}
            shape = (len(cfg.steps), len(cfg.poolings), -1)
            write_concentration(self.store, conc, unit.index, {
                k: np.stack([arrays[sp][k] for sp in self._step_poolings]).reshape(shape)
                for k in next(iter(arrays.values()))})  # fmt: skip
        dropped = sum(int(s.dropped) for s in stats.values())
        return {"kind": "part", "part": unit.index, "key": unit.key, "n_examples": len(records),
                "n_skipped": skipped, "n_rows": n_rows, "n_ended": n_ended, "dropped": dropped,
                "texts": texts, "seconds": time.time() - start,
                "provenance": self.loaded.provenance()}  # fmt: skip


# ---------------------------------------------------------------------- driver


def store_dims(plan: Plan) -> StoreDims:
    c = plan.config
    parts = tuple((*w.condition.key.split("/"), w.shard) for w in plan.work_units)
    return StoreDims(c.tasks, c.modalities, c.languages, c.steps, c.poolings, c.n_bins, parts)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _merge_ready(root: Any, plan: Plan, keep_parts: bool) -> None:
    """Merge every condition whose parts are all done and that is not merged yet."""
    done, merged = manifest(root)["parts"], set(manifest(root)["merged"])
    dims = store_dims(plan)
    for cond in plan.conditions:
        units = plan.units_of(cond)
        if cond.key in merged or any(str(w.index) not in done for w in units):
            continue
        summaries = [done[str(w.index)] for w in units]
        counts = {k: np.sum([s[k] for s in summaries], axis=0).tolist()
                  for k in ("n_examples", "n_skipped", "n_rows", "n_ended")}  # fmt: skip
        families = [f for f in plan.config.families if applies(f, cond.modality)]
        key = (cond.task, cond.modality, cond.language)
        parts = [w.index for w in units]
        merge_condition(root, dims, families, key, parts, counts, keep_parts=keep_parts)


def _pool_map(actors: list[Any], jobs: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Results in completion order; each actor runs one job at a time."""
    from ray.util import ActorPool

    yield from ActorPool(actors).map_unordered(lambda a, job: a.__call__.remote(job), list(jobs))


def _start_actors(
    config: CollectConfig, store: Path, address: str | None
) -> tuple[list[Any], bool]:
    """Connect to (or start) Ray and create the actors; returns (actors, whether we started Ray)."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    started = not ray.is_initialized()
    if started:
        env = {**RAY_ENV, **{k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ},
               **env_vars()}  # fmt: skip
        ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env})
    a = config.actors
    remote = ray.remote(num_gpus=a.num_gpus, num_cpus=a.num_cpus, max_restarts=a.max_restarts,
                        max_task_retries=a.max_task_retries)(Collector)  # fmt: skip
    return [remote.remote(config, str(store)) for _ in range(a.count)], started


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
        gen = GenerationConfig.from_pretrained(source, revision=config.revision,
                                               local_files_only=True)  # fmt: skip
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
    out = {"store": str(Path(config.output).resolve()), "plan_hash": plan.hash, "ran": 0,
           "work_units": len(plan.work_units), "resumed": 0, "examples": plan.n_examples}  # fmt: skip
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
    with OutputLock(store, "collect", echo=echo):  # one writer per store (lock.py)
        return _collect(config, plan, index, store, out, start=start, address=address,
                        echo=echo, progress=progress)  # fmt: skip


def _collect(
    config: CollectConfig,
    plan: Plan,
    index: UnitIndex,
    store: Path,
    out: dict[str, Any],
    *,
    start: float,
    address: str | None,
    echo: Callable[[str], None],
    progress: bool,
) -> dict[str, Any]:
    """The locked part of :func:`run_collect`: create or resume the store, run, merge, finish."""
    root = open_existing(store, config_hash=config.hash(), plan_hash=plan.hash)
    if root is None:
        units = {f: UnitCoords.from_index(index, f) for f in index.families}
        attrs = {"config": config.to_dict(), "config_hash": config.hash(), "created": _now(),
                 "plan_hash": plan.hash,
                 "provenance": {"packages": package_versions(), "host": platform.node()}}  # fmt: skip
        root = create_store(store, dims=store_dims(plan), units=units, plan=plan.to_dict(),
                            attrs=attrs)  # fmt: skip
    done = manifest(root)
    # One job per task with every modality's pilot (shared edges, see the module docstring);
    # a task with any pilot missing runs all again: no part ran before every pilot was done.
    pending = {p.task for p in plan.pilots if f"{p.task}/{p.modality}" not in done["edges"]}
    pilots = [tuple(p for p in plan.pilots if p.task == task)
              for task in dict.fromkeys(p.task for p in plan.pilots) if task in pending]  # fmt: skip
    units = [w for w in plan.work_units if str(w.index) not in done["parts"]]
    out["resumed"] = len(plan.work_units) - len(units)
    model_prov: dict[str, Any] = {}
    driver_fault = FaultPoint("driver", store)  # CROSSMODAL_FAULT (faults.py)
    if pilots or units:
        actors, started = _start_actors(config, store, address)
        try:
            for s in _pool_map(actors, pilots):
                for mod in s["modalities"]:
                    mark_edges(root, s["task"], mod, s)
            initial = plan.n_examples - sum(w.n_examples for w in units)
            with tqdm(total=plan.n_examples, initial=initial, unit="ex", desc="collect",
                      disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
                for s in _pool_map(actors, units):
                    mark_part(root, s["part"], {k: v for k, v in s.items() if k != "provenance"})
                    model_prov = s["provenance"]
                    out["ran"] += 1
                    bar.update(plan.work_units[s["part"]].n_examples)
                    n_done = out["resumed"] + out["ran"]
                    bar.set_postfix_str(f"work units {n_done}/{len(plan.work_units)}")
                    _merge_ready(root, plan, config.keep_parts)
                    driver_fault.tick()
        finally:
            if started:
                import ray

                ray.shutdown()
    _merge_ready(root, plan, config.keep_parts)
    prov = dict(root.attrs.get("provenance", {}))
    if model_prov:
        prov["model"] = model_prov
    finish(root, {"finished": _now(), "provenance": prov})
    out["seconds"] = time.time() - start
    echo(f"collected {out['ran']} work units ({out['resumed']} already done) into {store} "
         f"in {out['seconds']:.1f} s")  # fmt: skip
    out["dropped"] = sum(int(p.get("dropped", 0)) for p in manifest(root)["parts"].values())
    if out["dropped"]:  # stats.py drops rows with NaN/Inf: reported, never merged
        echo(f"warning: {out['dropped']} example rows with NaN/Inf activations were dropped, "
             "not merged (summed over families, steps, poolings; per condition: "
             "stats/<family>/dropped)")  # fmt: skip
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
