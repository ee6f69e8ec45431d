"""The collect plan: conditions, work units, the pilot, and the store's estimated size.

Conditions (docs/method.md, "Tasks and conditions"): ``x2en`` (condition language = SOURCE X != pivot, target the
pivot), ``en2x`` (language = TARGET X != pivot; the same pivot inputs run once per target) and
``asr`` (speech only, every language, target = source), crossed with the modalities. A work
unit is (task, modality, language, shard of example ids): the unit of scheduling, retry and
resume. The pilot is one extra unit per (task, modality): a sample spread over its languages
whose exact values choose the histogram edges.

All of it works without the model and the dataset: unit counts come from the model's config
on the meta device (:func:`unit_index`); without data, counts are FLEURS' split sizes (flagged).
So does each actor's memory (:func:`actor_memory`, :func:`memory_budget`,
:func:`check_memory`): the dry run prints it, and the driver refuses a plan that cannot fit
before any actor starts, where an out-of-memory actor would fail hours into the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Blosc

from crossmodal.collect.config import ORGANISM_SOURCE, CollectConfig
from crossmodal.data.languages import SPEECH_INPUT_CODES, TEXT_INPUT_CODES, TEXT_OUTPUT_CODES
from crossmodal.data.sources import SkipReport, id_key, open_source
from crossmodal.model.units import UnitIndex
from crossmodal.store import names
from crossmodal.store.location import is_url, upath

# Sentences per language and FLEURS split (the dataset's published sizes), for plans
# without the data; real counts are a little lower where recordings failed quality control.
FLEURS_SENTENCES = {"train": 1509, "dev": 150, "test": 350}


def applies(family: str, modality: str) -> bool:
    """Encoder families exist only for their own modality (the other encoder never runs)."""
    return {"speech_encoder": "speech", "text_encoder": "text"}.get(family, modality) == modality


@dataclass(frozen=True)
class Condition:
    task: str
    modality: str
    language: str  # x2en: the source; en2x: the target; asr: both
    source: str  # language of the inputs
    target: str  # tgt_lang of generation

    @property
    def key(self) -> str:
        return names.condition_key(self.task, self.modality, self.language)


@dataclass(frozen=True)
class WorkUnit:
    """One shard of one condition; ``index`` is its ``part`` in the store."""

    index: int
    condition: Condition
    shard: int
    n_examples: int
    example_ids: tuple[str, ...]  # empty when the plan is an estimate

    @property
    def key(self) -> str:
        return f"{self.condition.key}/{self.shard}"

    def describe(self) -> str:
        """Its name in a failure line."""
        return f"work unit {self.index} ({self.key})"


@dataclass(frozen=True)
class PilotUnit:
    """The pilot of one (task, modality): example ids per condition, across its languages."""

    task: str
    modality: str
    items: tuple[tuple[Condition, tuple[str, ...]], ...]

    @property
    def n_examples(self) -> int:
        return sum(len(ids) for _, ids in self.items)

    def describe(self) -> str:
        """Its name in a failure line."""
        return f"pilot {self.task}/{self.modality}"


def conditions(config: CollectConfig) -> tuple[list[Condition], list[str]]:
    """The conditions the model can run, and one line per dropped (task, modality, language)."""
    kept: list[Condition] = []
    dropped: list[str] = []
    organism = config.model == ORGANISM_SOURCE or config.data.source == ORGANISM_SOURCE
    others = [x for x in config.languages if x != config.pivot]
    for task in config.tasks:
        for modality in config.modalities:
            if task == "asr" and modality == "text":
                continue  # asr transcribes speech: there is no text asr
            langs = config.languages if task == "asr" else others
            for lang in langs:
                src, tgt = {"x2en": (lang, config.pivot), "en2x": (config.pivot, lang)}.get(
                    task, (lang, lang)
                )
                readable = SPEECH_INPUT_CODES if modality == "speech" else TEXT_INPUT_CODES
                why = None
                if not organism and tgt not in TEXT_OUTPUT_CODES:
                    why = "no text output"
                elif not organism and src not in readable:
                    why = f"no {modality} input"
                if why:
                    dropped.append(f"{task}/{modality}/{lang}: {why}")
                else:
                    kept.append(Condition(task, modality, lang, src, tgt))
    return kept, dropped


def _source_ids(
    config: CollectConfig, languages: list[str]
) -> tuple[dict[str, list[str]] | None, SkipReport]:
    """Ids per language from the data source (text only, no audio), or None without data;
    with the records the source skipped while listing them (empty text, malformed rows)."""
    data = config.data
    if data.source != ORGANISM_SOURCE and (data.path is None or not upath(data.path).is_dir()):
        return None, SkipReport()
    source = open_source(
        data.source,
        path=data.path,
        audio=False,
        n_sentences=data.examples_per_language,
        seed=config.seed,
        bounds=data.bounds,
    )
    ids = {lang: [r.id for r in source.records(lang, data.split)] for lang in languages}
    return ids, source.skipped


def _subset(ids: Mapping[str, list[str]], n: int | None, seed: int) -> dict[str, tuple[str, ...]]:
    """Per language, the first ``n`` ids of ONE seeded order of all ids (so the languages'
    subsets overlap as much as their ids do: parallel sentences stay parallel), sorted."""
    every = sorted({i for v in ids.values() for i in v}, key=id_key)
    rank = {i: r for r, i in enumerate(np.random.default_rng(seed).permutation(len(every)))}
    order = {i: rank[k] for k, i in enumerate(every)}
    out = {}
    for lang, values in ids.items():
        chosen = sorted(set(values), key=lambda i: order[i])[: n or None]
        out[lang] = tuple(sorted(chosen, key=id_key))
    return out


@dataclass(frozen=True)
class Plan:
    config: CollectConfig
    conditions: tuple[Condition, ...]
    dropped: tuple[str, ...]
    work_units: tuple[WorkUnit, ...]
    pilots: tuple[PilotUnit, ...]
    estimated: bool  # True: example counts are FLEURS' published sizes, not the data's
    note: str
    skipped: dict[str, dict[str, object]] = field(default_factory=dict)
    """Records the data source skipped while planning (``SkipReport.as_dict()``): they never
    become examples, so the per-condition ``n_skipped`` counts cannot include them."""

    @cached_property
    def hash(self) -> str:
        """sha256 of what the plan runs (work units with their ids, pilot ids)."""
        content = [[w.key, list(w.example_ids)] for w in self.work_units]
        content += [
            [p.task, p.modality, [[c.key, list(i)] for c, i in p.items]] for p in self.pilots
        ]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

    @property
    def n_examples(self) -> int:
        return sum(w.n_examples for w in self.work_units)

    def units_of(self, condition: Condition) -> list[WorkUnit]:
        return self._by_condition.get(condition.key, [])

    @cached_property
    def _by_condition(self) -> dict[str, list[WorkUnit]]:
        out: dict[str, list[WorkUnit]] = {}
        for w in self.work_units:
            out.setdefault(w.condition.key, []).append(w)
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: what the store's ``plan`` attrs keep."""
        units = [
            {"index": w.index, **asdict(w.condition), "shard": w.shard, "ids": list(w.example_ids)}
            for w in self.work_units
        ]
        pilots = [
            {
                "task": p.task,
                "modality": p.modality,
                "items": [{"language": c.language, "ids": list(i)} for c, i in p.items],
            }
            for p in self.pilots
        ]
        return {
            "hash": self.hash,
            "estimated": self.estimated,
            "dropped": list(self.dropped),
            "skipped": self.skipped,
            "work_units": units,
            "pilots": pilots,
        }


def _work_units(
    conds: Sequence[Condition],
    chosen: Mapping[str, tuple[str, ...]],
    per_lang: Mapping[str, int],
    shard_size: int,
) -> list[WorkUnit]:
    """Each condition's examples in shards of ``shard_size``, numbered in order."""
    units: list[WorkUnit] = []
    for cond in conds:
        n, ids_c = per_lang[cond.source], chosen[cond.source]
        for shard, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            units.append(WorkUnit(len(units), cond, shard, stop - start, ids_c[start:stop]))
    return units


def _pilots(
    conds: Sequence[Condition],
    chosen: Mapping[str, tuple[str, ...]],
    per_lang: Mapping[str, int],
    config: CollectConfig,
) -> list[PilotUnit]:
    """One pilot per (task, modality): ``pilot_size`` examples drawn evenly over its languages."""
    pilots = []
    rng = np.random.default_rng(config.seed + 1)
    for task, modality in dict.fromkeys((c.task, c.modality) for c in conds):
        group = [c for c in conds if (c.task, c.modality) == (task, modality)]
        base, extra = divmod(config.pilot_size, len(group))
        items = []
        for i, cond in enumerate(group):  # an even share of the pilot per language
            pool = chosen[cond.source]
            take = min(base + (i < extra), per_lang[cond.source])
            pick = rng.permutation(len(pool))[:take] if pool else range(0)
            items.append((cond, tuple(sorted((pool[j] for j in pick), key=id_key))))
        pilots.append(PilotUnit(task, modality, tuple(items)))
    return pilots


def build_plan(config: CollectConfig, ids: Mapping[str, list[str]] | None = None) -> Plan:
    """Plan ``config``; ``ids`` (language -> example ids) overrides reading the data source."""
    conds, dropped = conditions(config)
    if not conds:
        raise ValueError(
            f"tasks x modalities x languages must give one of [>= 1 condition], got 0 "
            f"({'; '.join(dropped) or 'nothing to run'}); add a task or language"
        )
    inputs = sorted({c.source for c in conds})
    raw, skipped = (dict(ids), SkipReport()) if ids is not None else _source_ids(config, inputs)
    estimated = raw is None
    if raw is None:
        n = FLEURS_SENTENCES[config.data.split]
        n = min(n, config.data.examples_per_language or n)
        per_lang = {lang: n for lang in inputs}
        chosen: dict[str, tuple[str, ...]] = {lang: () for lang in inputs}
        note = (
            f"ESTIMATE: data not found at {config.data.path!r}; example counts are FLEURS "
            f"{config.data.split} sizes ({n} sentences per language)"
        )
    else:
        chosen = _subset(
            {k: raw[k] for k in inputs}, config.data.examples_per_language, config.seed
        )
        per_lang = {lang: len(v) for lang, v in chosen.items()}
        empty = [lang for lang, n in per_lang.items() if n == 0]
        if empty:
            raise ValueError(
                f"data must have one of [>= 1 example] per language, got none for "
                f"{empty!r} in split {config.data.split!r}; check data.path"
            )
        note = f"examples from the data source ({config.data.source}, split {config.data.split})"
    units = _work_units(conds, chosen, per_lang, config.shard_size)
    pilots = _pilots(conds, chosen, per_lang, config)
    return Plan(
        config,
        tuple(conds),
        tuple(dropped),
        tuple(units),
        tuple(pilots),
        estimated,
        note,
        skipped.as_dict(),
    )


# ---------------------------------------------------------------- units without the weights


def model_config(config: CollectConfig) -> Any:
    """The model's ``SeamlessM4Tv2Config`` without loading (or downloading) its weights.

    The organism and directories (those of ``python -m crossmodal.model.make_random`` too)
    read ``config.json``; ``random:<size>`` is :data:`~crossmodal.model.load.RANDOM_SIZES`'s
    config; a hub id is read from the local cache, and ``facebook/seamless-m4t-v2-large``
    falls back to the config defaults, which are its shapes (docs/design.md, "Platform:
    transformers and SeamlessM4T v2"), so the reference plan prints on a machine without it.
    """
    from transformers import SeamlessM4Tv2Config

    from crossmodal.model.load import RANDOM_PREFIX, RANDOM_SIZES, REFERENCE_MODEL, large_config

    source = config.model
    if source.startswith(RANDOM_PREFIX):
        size = source.removeprefix(RANDOM_PREFIX)
        if size not in RANDOM_SIZES:
            allowed = [RANDOM_PREFIX + k for k in sorted(RANDOM_SIZES)]
            raise ValueError(
                f"model must be one of {allowed} (random weights), got {source!r}; "
                "use one of them or a directory of python -m crossmodal.model.make_random"
            )
        return RANDOM_SIZES[size]()
    if source == ORGANISM_SOURCE:
        from crossmodal.organism import organism_path

        return SeamlessM4Tv2Config.from_pretrained(organism_path())
    if is_url(source):  # its configs, synced once into the cache (store/inputs.py)
        from crossmodal.model.load import model_files

        return SeamlessM4Tv2Config.from_pretrained(model_files(source))
    if Path(source).expanduser().is_dir():
        return SeamlessM4Tv2Config.from_pretrained(Path(source).expanduser())
    try:  # the local cache first: no network when the config is already there
        return SeamlessM4Tv2Config.from_pretrained(
            source, revision=config.revision, local_files_only=True
        )
    except OSError:
        if source == REFERENCE_MODEL:
            return large_config()
    try:
        return SeamlessM4Tv2Config.from_pretrained(source, revision=config.revision)
    except OSError as err:
        raise ValueError(
            f"model must be one of [a hub id, a directory, 'organism', 'random:<size>'], got "
            f"{source!r}; its config.json could not be read ({err})"
        ) from None


def unit_index(config: CollectConfig) -> UnitIndex:
    """The unit index of the configured families, from a model built on the meta device."""
    import torch
    from transformers import SeamlessM4Tv2Model
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the meta build warns about layer_idx; nothing runs
    try:
        with torch.device("meta"):
            model = SeamlessM4Tv2Model(model_config(config))
    finally:
        hf_logging.set_verbosity(verbosity)
    return UnitIndex.from_model(model, config.families)


def family_sizes(index: UnitIndex) -> dict[str, int]:
    return {f: n for f, n in index.counts("family").items() if f in index.families}


# ---------------------------------------------------------------- store size


@cache  # a pure function of three ints; the dry run asks for the same few
def compression_ratios(n_examples: int, n_bins: int, seed: int = 0) -> dict[str, float]:
    """Uncompressed / compressed bytes of each stored array kind, measured on synthetic data.

    Heavy-tailed per-unit values (a quarter of the units ReLU-like, with exact zeros) go
    through the real :func:`choose_edges` and :class:`UnitStats` and are compressed with the
    store's codec (Blosc zstd level 3, bitshuffle), so the estimate tracks the real arrays.
    """
    import torch

    from crossmodal.stats.running import UnitStats, choose_edges

    rng = np.random.default_rng(seed)
    n, units = max(2, min(n_examples, 2000)), 256
    x = rng.standard_t(3, size=(n, units)) * rng.lognormal(0, 1, units) + rng.normal(0, 1, units)
    relu = rng.random(units) < 0.25
    x[:, relu] = np.maximum(x[:, relu], 0.0)
    values = torch.from_numpy(x.astype(np.float32))
    edges = choose_edges(values[: min(256, max(2, n // 5))], n_bins)
    stats = UnitStats.empty(edges)
    stats.update(values)
    arrays = stats.to_numpy()
    codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)
    kinds = ("mean", "m2", "min", "max", "hist", "edges")
    return {k: arrays[k].nbytes / len(codec.encode(np.ascontiguousarray(arrays[k]))) for k in kinds}


@dataclass(frozen=True)
class SizeLine:  # one row of the size estimate
    group: str
    uncompressed: int
    compressed: int
    note: str = ""


def estimate_size(plan: Plan, sizes: Mapping[str, int]) -> list[SizeLine]:
    """Bytes of ``stats``, ``edges`` and ``parts`` per family (unwritten chunks cost nothing)."""
    cfg = plan.config
    sp = len(cfg.steps) * len(cfg.poolings)
    n_cond, n_parts = len(plan.conditions), len(plan.work_units)
    pairs = len({(c.task, c.modality) for c in plan.conditions})
    per_cond = max(1, plan.n_examples // max(1, n_cond))
    per_part = max(1, plan.n_examples // max(1, n_parts))
    shards = max(len(plan.units_of(c)) for c in plan.conditions)
    in_flight = min(n_parts, shards * (cfg.actors.count + 1))
    k = cfg.n_bins + 2

    def packed(r: Mapping[str, float]) -> float:  # bytes per unit after compression
        return sum(8 / r[m] for m in ("mean", "m2", "min", "max")) + 4 * k / r["hist"]

    lines, raw_u = [], 4 * 8 + 4 * k  # mean, m2, min, max in float64; int32 histogram
    cond_u = packed(compression_ratios(per_cond, cfg.n_bins))
    part_u = packed(compression_ratios(per_part, cfg.n_bins, seed=1))
    r_edges = compression_ratios(cfg.pilot_size, cfg.n_bins, seed=2)["edges"]
    for family, n in sizes.items():
        stats = n_cond * sp * n
        lines.append(SizeLine(names.stats_group(family), stats * raw_u, int(stats * cond_u)))
        edges = pairs * sp * n * (cfg.n_bins + 1) * 4
        lines.append(SizeLine(names.edges_group(family), edges, int(edges / r_edges)))
        kept = n_parts if cfg.keep_parts else in_flight
        note = "kept" if cfg.keep_parts else f"transient: ~{kept} of {n_parts} parts at once"
        parts = kept * sp * n
        lines.append(SizeLine(names.parts_group(family), parts * raw_u, int(parts * part_u), note))
    return lines


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


SPEECH_FRAMES_PER_SECOND = 50
"""Speech encoder positions per second of audio: the feature extractor's 100 filterbank
frames per second, stacked by 2 (SeamlessM4T v2's ``stride``)."""


def attention_bytes(config: CollectConfig) -> int | None:
    """Peak bytes of one speech encoder layer's attention scores for one batch of the
    longest recording the bounds allow (``batch_size x heads x frames^2``): what grows with
    the square of the duration (a 10-minute clip: tens of GB), so the bound plans it. None
    without speech or a readable model config."""
    if "speech" not in config.modalities:
        return None
    try:
        heads = int(model_config(config).speech_encoder_attention_heads)
    except Exception:  # noqa: BLE001 - the plan prints without it
        return None
    frames = int(config.data.max_audio_seconds * SPEECH_FRAMES_PER_SECOND)
    itemsize = 4 if config.dtype == "float32" else 2
    return config.batch_size * heads * frames * frames * itemsize


# ---------------------------------------------------------------- actor memory


def plan_dtype(config: CollectConfig) -> Any:
    """The dtype the actors run: ``auto`` is bf16 on a GPU (fp16 before Ampere when the GPU
    is visible here), fp32 on the CPU; never raises (the driver's dtype check does)."""
    import torch

    from crossmodal.model.load import DTYPES

    gpu = config.actors.num_gpus > 0
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if gpu and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.bfloat16 if gpu else torch.float32


def _pilot_bytes(plan: Plan, sizes: Mapping[str, int]) -> int:
    """The largest pilot job's exact float32 values: one job per task with every modality's
    pilot (at most ``pilot_size`` examples each), at every (step, pooling) of every unit, plus
    two copies of one (step, pooling) while its edges are chosen (the collector concatenates
    its batches, ``choose_edges`` keeps the finite rows)."""
    cfg = plan.config
    examples: dict[tuple[str, str], int] = {}
    for w in plan.work_units:
        key = (w.condition.task, w.condition.modality)
        examples[key] = examples.get(key, 0) + w.n_examples
    per_task: dict[str, int] = {}
    for (task, modality), n in examples.items():
        units = sum(k for f, k in sizes.items() if applies(f, modality))
        per_task[task] = per_task.get(task, 0) + min(cfg.pilot_size, n) * units
    return max(per_task.values(), default=0) * (len(cfg.steps) * len(cfg.poolings) + 2) * 4


def actor_memory(plan: Plan, sizes: Mapping[str, int]) -> Any:
    """Bytes one actor needs (:class:`~crossmodal.model.memory.ActorMemory`): for each
    modality the plan runs, its longest input the bounds allow (``data.max_audio_seconds``;
    ``data.max_text_chars`` + 2 tokens: at most one token per character, plus the language
    tag and end of sentence) at ``batch_size``; the largest."""
    from crossmodal.model.memory import RUNTIME_BYTES, estimate_actor_memory

    cfg = plan.config
    model = model_config(cfg)
    lengths = {"speech": cfg.data.max_audio_seconds, "text": cfg.data.max_text_chars + 2}
    pilot = _pilot_bytes(plan, sizes)
    estimates = [
        estimate_actor_memory(
            model,
            dtype=plan_dtype(cfg),
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            modality=modality,
            source_length=lengths[modality],
            n_units=sum(n for f, n in sizes.items() if applies(f, modality)),
            n_steps=len(cfg.steps),
            n_poolings=len(cfg.poolings),
            n_bins=cfg.n_bins,
            pilot_values=pilot,
            runtime=0 if cfg.actors.num_gpus > 0 else RUNTIME_BYTES,
        )
        for modality in dict.fromkeys(c.modality for c in plan.conditions)
    ]
    return max(estimates, key=lambda m: m.total)


@dataclass(frozen=True)
class MemoryBudget:
    """What one actor may use: ``available`` bytes (None: not knowable here) on ``where``."""

    available: int | None
    where: str


def memory_budget(config: CollectConfig) -> MemoryBudget:
    """:data:`~crossmodal.model.memory.HEADROOM` of the GPU's memory (times ``num_gpus``
    when actors share one) when the actors use GPUs and CUDA is visible here; of the
    physical memory divided by ``actors.count`` on the CPU. GPU actors planned on a driver
    without CUDA (a CPU head node of a cluster) are not checked: their GPU is elsewhere."""
    import os

    import torch

    from crossmodal.model.memory import HEADROOM

    count, share = config.actors.count, min(1.0, config.actors.num_gpus)
    if share > 0:
        if not torch.cuda.is_available():
            return MemoryBudget(None, "a GPU (none visible here: checked where CUDA is)")
        props = torch.cuda.get_device_properties(0)
        total = props.total_memory * share
        where = f"{props.name} ({share:g} x {props.total_memory / 1e9:.1f} GB)"
    else:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        total = physical / count
        where = f"the CPU ({physical / 1e9:.1f} GB physical / {count} actor(s))"
    return MemoryBudget(int(total * HEADROOM), f"{where}, {HEADROOM:.0%} of it")


def check_memory(plan: Plan, sizes: Mapping[str, int]) -> tuple[Any, MemoryBudget]:
    """The per-actor estimate and the budget; refuses a plan that cannot fit (one line).

    Raises:
        ValueError: from :meth:`~crossmodal.model.memory.ActorMemory.check`.
    """
    memory, budget = actor_memory(plan, sizes), memory_budget(plan.config)
    if budget.available is not None:
        memory.check(budget.available, budget.where)
    return memory, budget


def _memory_line(plan: Plan, sizes: Mapping[str, int]) -> str:
    """The dry run's per-actor memory, its parts and whether it fits."""
    try:
        memory, budget = actor_memory(plan, sizes), memory_budget(plan.config)
    except (OSError, ValueError) as err:  # an unreadable model config: the plan prints without
        return f"  memory     not estimated ({err})"
    if budget.available is None:
        verdict = f"not checked: {budget.where}"
    elif memory.total <= budget.available:
        verdict = f"fits <= {budget.available / 1e9:.1f} GB on {budget.where}"
    else:
        verdict = f"DOES NOT FIT <= {budget.available / 1e9:.1f} GB on {budget.where}: refused"
    return (
        f"  memory     per actor {memory.describe()} ({memory.modality} inputs, "
        f"{str(plan_dtype(plan.config)).removeprefix('torch.')}); {verdict}"
    )


def _inputs_line(cfg: CollectConfig) -> str:
    """The input bounds and the speech memory they plan."""
    attn = attention_bytes(cfg)
    memory = "" if attn is None else f" (speech encoder attention <= {_gb(attn)} per batch)"
    return (
        f"  inputs     audio <= {cfg.data.max_audio_seconds:g} s{memory}, text <= "
        f"{cfg.data.max_text_chars:,} chars; longer examples are skipped and counted"
    )


def format_plan(plan: Plan, sizes: Mapping[str, int], source: str = "") -> str:
    """The ``--dry-run`` report: conditions, work units, examples, units, store size."""
    cfg, where = plan.config, f" {source}" if source else ""
    out = [
        f"collect plan{where}: config {cfg.hash()}, plan {plan.hash}",
        f"  model      {cfg.model} ({cfg.dtype}); units from its config on the meta device "
        "(no weights loaded)",
        "  units      " + ", ".join(f"{f} {n:,}" for f, n in sizes.items()),
        f"  languages  {len(cfg.languages)} (pivot {cfg.pivot}): {' '.join(cfg.languages)}",
        f"  examples   {plan.note}",
        f"  steps {list(cfg.steps)} x poolings {list(cfg.poolings)}; n_bins {cfg.n_bins}; "
        f"shard_size {cfg.shard_size}; batch_size {cfg.batch_size}",
        _inputs_line(cfg),
        _memory_line(plan, sizes),
        f"  {'task/modality':<15}{'conditions':>11}{'work units':>11}{'examples':>10}",
    ]
    rows: dict[str, list[int]] = {}
    for w in plan.work_units:
        row = rows.setdefault(
            names.condition_key(w.condition.task, w.condition.modality), [0, 0, 0]
        )
        row[0] += w.shard == 0
        row[1:] = [row[1] + 1, row[2] + w.n_examples]
    rows["total"] = [len(plan.conditions), len(plan.work_units), plan.n_examples]
    out += [f"  {k:<15}{a:>11}{b:>11}{c:>10,}" for k, (a, b, c) in rows.items()]
    pilot = sum(
        min(cfg.pilot_size, rows[names.condition_key(p.task, p.modality)][2]) for p in plan.pilots
    )
    out.append(f"  pilot      {len(plan.pilots)} units, {pilot:,} examples (bin edges)")
    dropped: dict[str, list[str]] = {}
    for line in plan.dropped:  # "task/modality/lang: reason" -> one line per task/modality+reason
        key, why = line.split(": ", 1)
        dropped.setdefault(f"{key.rsplit('/', 1)[0]}: {why}", []).append(key.rsplit("/", 1)[1])
    out += [
        f"  dropped    {k.split(': ')[0]} {' '.join(v)} ({k.split(': ', 1)[1]})"
        for k, v in dropped.items()
    ]
    if plan.skipped:
        counts = ", ".join(f"{k}={v['count']}" for k, v in plan.skipped.items())
        out.append(f"  skipped    {counts} (records the data source could not use)")
        for reason, v in plan.skipped.items():  # which ones: the store's plan attrs list all
            shown = ", ".join(v.get("ids", v.get("examples", []))[:5])
            more = f" (+{v['count'] - 5} more)" if v["count"] > 5 else ""
            out.append(f"    {reason:<18} {shown}{more}")
    lines = estimate_size(plan, sizes)
    out.append(f"  store {cfg.output} (ESTIMATE; compressed = measured ratio on synthetic values):")
    total = SizeLine(
        "total (peak)", sum(s.uncompressed for s in lines), sum(s.compressed for s in lines)
    )
    lines.append(total)
    out += [
        f"    {s.group:<22}{_gb(s.uncompressed):>12} uncompressed {_gb(s.compressed):>11}"
        f" compressed  {s.note}".rstrip()
        for s in lines
    ]
    return "\n".join(out)
