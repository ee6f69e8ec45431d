"""``crossmodal bench``: how fast generation, capture, the reference, steering and the reducer run.

For each (modality, batch size), on the same synthetic inputs: ``bare`` HF ``generate`` (greedy,
``min_new_tokens = max_new_tokens`` so every row runs every step); ``fast``
(:func:`crossmodal.model.fastgen.greedy_generate`, with an identity check); ``capture_hf`` /
``capture_fast`` (:class:`~crossmodal.model.capture.Capturer` + :class:`~crossmodal.stats.running.UnitStats`
updates per step, ``prefix_mean`` by default); ``reference`` (:func:`~crossmodal.model.reference.reference_capture`,
batch 1, on a few examples); ``steer_hf`` / ``steer_fast`` (a different forcing per row, HF generate
under :func:`~crossmodal.model.forcing.forcing` vs :func:`~crossmodal.model.forcing.generate_forced`). Once:
the reducer (AP, AUROC, medians) over synthetic statistics of the real size, chunked over units.
Times are the best of ``repeats`` after a warm-up (CUDA events on GPU). Per cell also: peak
memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS), and the replay
check: one batched teacher-forced capture of the reference examples against the per-prefix
reference, both poolings, within the dtype's tolerance (:data:`REPLAY_TOL`). Then the goals
(:func:`goals`) at the largest batch size. Imports only torch, transformers and numpy
besides the project (no Ray, Zarr, click or sentencepiece): the GPU check is
``python -m crossmodal.bench --device cuda --out gpu-check.json`` (large random model, bf16,
speech 10 s and text, batch 32 and 128, within :data:`GPU_DEFAULTS`' time limit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import transformers

from crossmodal.bench_config import (  # noqa: F401 - re-exported: crossmodal.bench.BenchConfig
    _PARSE,
    DECODER_UNITS_LARGE,
    GPU_DEFAULTS,
    HELP,
    BenchConfig,
    _flag_help,
    _show,
)
from crossmodal.model import fastgen
from crossmodal.model.capture import POOLINGS, Capturer
from crossmodal.model.forcing import forcing, generate_forced, plan_batch
from crossmodal.model.inputs import ModelBatch, batch_from_token_ids
from crossmodal.model.load import LoadedModel, build_random_model, feature_extractor, load_model
from crossmodal.model.reference import reference_capture
from crossmodal.model.units import UnitIndex
from crossmodal.stats import kernel as fold
from crossmodal.stats.finalize import selectivity_from_stats
from crossmodal.stats.running import UnitStats, choose_edges


def _once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds and output of one call: wall clock on CPU, CUDA events on GPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    out = fn()
    if not cuda:
        return time.perf_counter() - t0, out
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3, out


def timed(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, tuple[float, Any]]:
    """Best time (s) and last output of each function: one warm-up, then ``repeats`` rounds.

    Rounds interleave the functions, so a change in machine load hits all of them alike.
    """
    outs = {k: fn() for k, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            seconds, outs[k] = _once(fn, device)
            best[k] = min(best[k], seconds)
    return {k: (best[k], outs[k]) for k in fns}


@contextmanager
def fixed_length(model: torch.nn.Module, n: int):  # noqa: ANN201 - a context manager
    """Ban EOS for ``n`` tokens in every generate (HF's and the fast path honour the config)."""
    old = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = n
    try:
        yield
    finally:
        model.generation_config.min_new_tokens = old


def load(cfg: BenchConfig) -> LoadedModel:
    """The organism (or a path / hub id), or a random ``tiny``/``large`` model."""
    if cfg.model in ("tiny", "large"):
        return build_random_model(
            cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, processor=False
        )
    return load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)


def make_inputs(loaded: LoadedModel, modality: str, n: int, cfg: BenchConfig) -> ModelBatch:
    """``n`` synthetic examples: ``speech_seconds`` of tones + noise, or random token ids."""
    rng = np.random.default_rng(cfg.seed)
    if modality == "text":
        first_tag = min(loaded.lang_to_code_id.values(), default=loaded.model.config.vocab_size)
        ids = rng.integers(4, first_tag, size=(n, cfg.text_tokens)).tolist()
        return batch_from_token_ids(ids)
    t = np.arange(int(16_000 * cfg.speech_seconds)) / 16_000
    tone = [0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) for i in range(n)]
    waves = [(x + 0.05 * rng.standard_normal(t.size)).astype(np.float32) for x in tone]
    extractor = getattr(loaded.processor, "feature_extractor", None) or feature_extractor()
    feats = extractor(waves, sampling_rate=16_000, return_tensors="pt", padding=True)
    ids = tuple(str(i) for i in range(n))
    return ModelBatch("speech", feats["input_features"], feats["attention_mask"], ids, ("",) * n)


def _rows(b: ModelBatch, r: slice) -> ModelBatch:
    return ModelBatch(b.modality, b.inputs[r], b.attention_mask[r], b.ids[r], b.languages[r])


def random_interventions(index: UnitIndex, rows: int, k: int, seed: int) -> list[dict]:
    """Per row, ``k`` random decoder units forced to random values (a steering-grid batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row: dict[str, tuple[list[int], list[float]]] = {}
        for unit in rng.choice(index.n_units, size=min(k, index.n_units), replace=False):
            name, feature = index.address(int(unit))
            feats, vals = row.setdefault(index.site(name).module_path, ([], []))
            feats.append(feature), vals.append(float(rng.normal()))
        out.append(row)
    return out


@dataclass
class CellInputs:
    """The synthetic inputs of one (modality, batch size) cell, shared by every measurement.

    Attributes:
        batches: ``n_batches`` batches of ``batch_size`` examples.
        kwargs: each batch's model kwargs on the device.
        reference: the first ``reference_examples`` examples (the batch-1 reference is slow).
        index: the decoder unit index.
        interventions: per batch, per row, random units forced to random values.
    """

    batches: list[ModelBatch]
    kwargs: list[dict]
    reference: ModelBatch
    index: UnitIndex
    interventions: list[list[dict]]

    @property
    def n_examples(self) -> int:
        return sum(len(b) for b in self.batches)


def cell_inputs(
    loaded: LoadedModel, modality: str, batch_size: int, cfg: BenchConfig
) -> CellInputs:
    """Synthetic batches, their model kwargs, the reference subset and random interventions."""
    n = batch_size * cfg.n_batches
    data = make_inputs(loaded, modality, n, cfg)
    batches = [_rows(data, slice(i, i + batch_size)) for i in range(0, n, batch_size)]
    index = UnitIndex.from_model(loaded.model, "decoder")
    return CellInputs(
        batches=batches,
        kwargs=[b.model_kwargs(loaded.device, loaded.dtype) for b in batches],
        reference=_rows(data, slice(0, min(cfg.reference_examples, n))),
        index=index,
        interventions=[
            random_interventions(index, len(b), cfg.steer_units, cfg.seed + i)
            for i, b in enumerate(batches)
        ],
    )


def _capture_fn(
    loaded: LoadedModel, inputs: CellInputs, generator: str, cfg: BenchConfig, pilots: dict
) -> Callable[[], dict]:
    """Capture + statistics updates over every batch; the pilot batch's values go to ``pilots``."""
    tgt = cfg.tgt_lang
    cap = Capturer(
        loaded, "decoder", cfg.steps, cfg.poolings, cfg.max_new_tokens, generator=generator
    )
    pilot = cap.run(inputs.batches[0], tgt).values
    edges = {key: choose_edges(v, cfg.n_bins) for key, v in pilot.items()}
    pilots.update({key: (v, edges[key]) for key, v in pilot.items()})

    # Created once, as collect keeps one set of statistics per work unit (hundreds of
    # examples): allocation and the CPU kernel's edge layout are not per-batch costs.
    stats = {key: UnitStats.empty(e, loaded.device) for key, e in edges.items()}

    def run() -> dict:
        for b in inputs.batches:
            for key, values in cap.run(b, tgt).values.items():
                stats[key].update(values)
        return stats

    return run


def cell_functions(
    loaded: LoadedModel, inputs: CellInputs, cfg: BenchConfig, pilots: dict
) -> dict[str, Callable[[], Any]]:
    """The timed functions of one cell, by name (``bare``, ``fast``, ``capture_*``, ...)."""
    model, dev, mnt, tgt = loaded.model, loaded.device, cfg.max_new_tokens, cfg.tgt_lang
    pairs = list(zip(inputs.kwargs, inputs.interventions, strict=True))

    def steer_hf() -> list[torch.Tensor]:  # planning is counted on both sides
        out = []
        for k, r in pairs:
            with forcing(model, plan_batch(model, r, device=dev)):
                out.append(fastgen.hf_generate(loaded, k, tgt, mnt))
        return out

    return {
        "bare": lambda: [fastgen.hf_generate(loaded, k, tgt, mnt) for k in inputs.kwargs],
        "fast": lambda: [
            fastgen.greedy_generate(loaded, k, tgt, mnt).sequences for k in inputs.kwargs
        ],
        "capture_hf": _capture_fn(loaded, inputs, "hf", cfg, pilots),
        "capture_fast": _capture_fn(loaded, inputs, "fast", cfg, pilots),
        "reference": lambda: reference_capture(
            loaded, inputs.reference, tgt, steps=cfg.steps, max_new_tokens=mnt
        ),
        "steer_hf": steer_hf,
        "steer_fast": lambda: [
            generate_forced(loaded, k, tgt, r, max_new_tokens=mnt) for k, r in pairs
        ],
    }


IDENTICAL = {
    "fast_identical": ("bare", "fast"),
    "steer_fast_identical": ("steer_hf", "steer_fast"),
    "compiled_identical": ("bare", "compiled"),
}
"""Result key -> the two functions whose outputs must be the same tokens."""
REPLAY_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Largest ``|replay - reference| / max |reference|`` accepted per dtype: batched and
per-prefix runs round differently, and bf16 keeps 8 significant bits (fp16 11, fp32 24)."""


def replay_check(loaded: LoadedModel, inputs: CellInputs, reference: Any, cfg: BenchConfig) -> dict:
    """One batched capture of the reference examples (both poolings) vs the per-prefix
    reference's tokens and values, relative to the reference's largest value."""
    res = Capturer(loaded, "decoder", cfg.steps, POOLINGS, cfg.max_new_tokens)
    got = res.run(inputs.reference, cfg.tgt_lang)
    same = all(
        got.sequences[i, : len(seq)].tolist() == seq.tolist()
        for i, seq in enumerate(reference.sequences)
    )
    scale = max(float(np.nanmax(np.abs(v), initial=0.0)) for v in reference.values.values())
    worst = 0.0
    for key, expected in reference.values.items():
        values = got.values[key].float().cpu().numpy()
        if values.shape != expected.shape:
            same, worst = False, float("inf")
            continue
        worst = max(worst, float(np.nanmax(np.abs(values - expected), initial=0.0)) / scale)
    tol = REPLAY_TOL.get(loaded.dtype, REPLAY_TOL[torch.float32])
    return {
        "replay_tokens_equal": same,
        "replay_max_rel_diff": worst,
        "replay_tol": tol,
        "replay_ok": same and worst <= tol,
    }


def cell_result(
    modality: str,
    batch_size: int,
    inputs: CellInputs,
    t: dict[str, tuple[float, Any]],
    cfg: BenchConfig,
) -> dict[str, Any]:
    """Throughputs (examples/s), ratios to ``bare`` and to the reference, identity checks."""
    n, n_ref = inputs.n_examples, len(inputs.reference)
    eps = {k: (n_ref if k == "reference" else n) / seconds for k, (seconds, _) in t.items()}
    res: dict[str, Any] = {
        "modality": modality,
        "batch_size": batch_size,
        "n_examples": n,
        "n_units": inputs.index.n_units,
        "reference_examples": n_ref,
        "steer_units_per_row": cfg.steer_units,
    }
    res["fast_speedup"] = eps["fast"] / eps["bare"]
    for k, v in eps.items():
        res[f"{k}_eps"] = v
        if k not in ("bare", "fast", "reference"):
            res[f"{k}_ratio"] = v / eps["bare"]
        if k.startswith("capture"):
            res[f"{k}_vs_reference"] = v / eps["reference"]
    for key, (a, b) in IDENTICAL.items():
        if a in t and b in t:
            res[key] = all(torch.equal(x, y) for x, y in zip(t[a][1], t[b][1], strict=True))
    # examples folded into each statistic over the warm-up and every timed round
    res["stats_count"] = {f"{p}@{s}": v.n for (p, s), v in t["capture_fast"][1].items()}
    return res


def compiled_function(
    loaded: LoadedModel, inputs: CellInputs, cfg: BenchConfig
) -> tuple[Callable[[], list[torch.Tensor]] | None, dict[str, Any]]:
    """The compiled fast path over every batch, compiled by one call here, with what that
    call cost: ``compile_s`` (its seconds: the compile, or only new CUDA graphs where an
    earlier cell's compile serves, and one run) and ``compiled_graphs`` (the graphs dynamo
    made for it: at most 1, more if something split the step, which CUDA graphs would then
    not cover whole); or its ``compiled_error`` line (a compile that fails costs this
    variant, not the cell)."""
    from torch._dynamo.utils import counters

    tgt = cfg.tgt_lang

    def run() -> list[torch.Tensor]:
        return [
            fastgen.greedy_generate(loaded, k, tgt, cfg.max_new_tokens, compiled=step).sequences
            for k in inputs.kwargs
        ]

    graphs = counters["stats"]["unique_graphs"]
    try:
        step = fastgen.CompiledStep(loaded)
        seconds, _ = _once(run, loaded.device)
    except Exception as e:  # noqa: BLE001 - recorded in the cell and printed
        traceback.print_exc()
        return None, {"compiled_error": error_line(e)}
    return run, {
        "compile_s": seconds,
        "compiled_graphs": counters["stats"]["unique_graphs"] - graphs,
    }


def bench_cell(loaded: LoadedModel, modality: str, batch_size: int, cfg: BenchConfig) -> dict:
    """Every measurement for one (modality, batch size) on the same inputs."""
    inputs = cell_inputs(loaded, modality, batch_size, cfg)
    pilots: dict = {}
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    with fixed_length(loaded.model, cfg.max_new_tokens):
        fns = cell_functions(loaded, inputs, cfg, pilots)
        compile_info: dict[str, Any] = {}
        if cfg.compile and batch_size == max(cfg.batch_sizes):
            compiled, compile_info = compiled_function(loaded, inputs, cfg)
            fns.update({"compiled": compiled} if compiled else {})
        t = timed(fns, loaded.device, cfg.repeats)
        replay = replay_check(loaded, inputs, t["reference"][1], cfg)
    res = cell_result(modality, batch_size, inputs, t, cfg)
    res.update(replay)
    res.update(compile_info)
    if cuda:
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(loaded.device) / 2**30
        res["peak_memory_kind"] = "gpu max_memory_allocated"
    else:
        res["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        res["peak_memory_kind"] = "process peak RSS"
    cpu_kernel = fold.AVAILABLE and loaded.device.type == "cpu"
    res["stats_kernel"] = "numba" if cpu_kernel else "torch"
    res.update(bench_stats_update(pilots, loaded.device, cfg.repeats))
    return res


def bench_stats_update(pilots: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds to fold one batch into the statistics of every (pooling, step), per kernel
    (``stats_{torch,numba}_ms``; numba only on CPU where installed), on the pilot batch."""
    kernels = ["torch"] + (["numba"] if fold.AVAILABLE and device.type == "cpu" else [])
    fresh = {
        k: {key: UnitStats.empty(e, device) for key, (_, e) in pilots.items()} for k in kernels
    }

    def fold_all(kernel: str) -> Callable[[], None]:
        def run() -> None:
            for key, (values, _) in pilots.items():
                fresh[kernel][key].update(values, kernel=kernel)

        return run

    t = timed({k: fold_all(k) for k in kernels}, device, repeats)
    return {f"stats_{k}_ms": seconds * 1e3 for k, (seconds, _) in t.items()}


def _synthetic_stats(units: int, cfg: BenchConfig, gen: torch.Generator) -> dict[str, UnitStats]:
    """One (task, modality, step) chunk: per-language stats of the real shapes, shared edges.

    Histograms are drawn directly (binned normals shifted per language), which is much cheaper
    than ``UnitStats.update`` and gives the finalizer the same work.
    """
    n_k, n = cfg.n_bins + 2, cfg.reducer_examples
    edges = torch.linspace(-4.0, 4.0, cfg.n_bins + 1)[None, :] * (torch.rand(units, 1) + 0.5)
    out = {}
    for lang in range(cfg.reducer_languages):
        centre = n_k / 2 + torch.randn(units, 1, generator=gen) * lang * 6
        bins = (centre + torch.randn(units, n, generator=gen) * n_k / 6).round()
        hist = torch.zeros(units, n_k, dtype=torch.int32)
        hist.scatter_add_(1, bins.clamp(0, n_k - 1).long(), torch.ones(units, n, dtype=torch.int32))
        mean = torch.randn(units, dtype=torch.float64, generator=gen)
        out[f"l{lang}"] = UnitStats(
            edges=edges,
            count=torch.tensor(n),
            dropped=torch.tensor(0),
            mean=mean,
            m2=torch.full((units,), float(n), dtype=torch.float64),
            min=mean - 4,
            max=mean + 4,
            hist=hist,
        )
    return out


def bench_reducer(cfg: BenchConfig) -> dict:
    """AP, AUROC, on_p50/p90, off_mean for units x (groups x languages) conditions, by chunks.

    Synthetic statistics are built per chunk of units (not timed), then the finalizer is
    timed; chunking over units bounds memory, as a reducer reading a unit-chunked store does.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.reducer_threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    finalize = build = 0.0
    chunks = [
        min(cfg.reducer_chunk, cfg.reducer_units - i)
        for i in range(0, cfg.reducer_units, cfg.reducer_chunk)
    ]
    try:
        for units in chunks * cfg.reducer_groups:
            t0 = time.perf_counter()
            stats = _synthetic_stats(units, cfg, gen)
            t1 = time.perf_counter()
            sel = selectivity_from_stats(stats)
            finalize, build = finalize + time.perf_counter() - t1, build + t1 - t0
            if not all(torch.isfinite(s.ap).all() for s in sel.values()):
                raise RuntimeError("reducer benchmark produced non-finite AP")
    finally:
        torch.set_num_threads(threads)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {
        "units": cfg.reducer_units,
        "conditions": cfg.reducer_groups * cfg.reducer_languages,
        "n_bins": cfg.n_bins,
        "examples_per_language": cfg.reducer_examples,
        "chunk_units": cfg.reducer_chunk,
        "threads": cfg.reducer_threads,
        "finalize_s": finalize,
        "synthetic_build_s": build,
        "peak_rss_gib": rss,
    }


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, memory, GPU, versions, load."""
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def error_line(e: BaseException) -> str:
    """``"Type: first line of the message"``: what a failed measurement records."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def run_cell(loaded: LoadedModel, modality: str, batch_size: int, cfg: BenchConfig) -> dict:
    """:func:`bench_cell`, or the cell with its ``error`` (one line; traceback on stderr):
    the GPU check runs once in a few minutes of lent time, so a cell that fails (out of
    memory at the largest batch) must not cost the cells after it."""
    try:
        return bench_cell(loaded, modality, batch_size, cfg)
    except Exception as e:  # noqa: BLE001 - recorded in the result and printed, not hidden
        traceback.print_exc()
        return {"modality": modality, "batch_size": batch_size, "error": error_line(e)}
    finally:
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()  # what a failed cell held, for the next one


def run_bench(
    cfg: BenchConfig, on_cell: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run every measurement of ``cfg``; returns the JSON-ready result. ``on_cell`` gets the
    result so far after each cell (``bench`` writes it, so a run killed at its time limit
    still leaves the cells it finished)."""
    transformers.logging.set_verbosity_error()  # the reference's model() calls warn per call
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m crossmodal.bench", *sys.argv[1:]]),
        "config": asdict(cfg),
        "machine": machine(),
        "finished": False,
        "cells": [],
    }
    if cfg.reducer:  # first, so its peak RSS is not the model's
        out["reducer"] = bench_reducer(cfg)
        print(format_table({"cells": [], "reducer": out["reducer"]}), flush=True)
    if cfg.modalities:
        start = time.perf_counter()
        loaded = load(cfg)
        out["model"] = loaded.provenance()
        out["model_load_s"] = time.perf_counter() - start
        print(format_table({"cells": []}, header=True), flush=True)
        for modality in cfg.modalities:
            for bs in cfg.batch_sizes:
                if cfg.time_limit_s and time.perf_counter() - start > cfg.time_limit_s:
                    cell = {"modality": modality, "batch_size": bs, "skipped": "time limit"}
                else:
                    cell = run_cell(loaded, modality, bs, cfg)
                out["cells"].append(cell)
                print(format_row(cell), flush=True)
                if on_cell:
                    on_cell(out)
        out["goals"] = goals(out["cells"])
    out["load_avg_end"] = os.getloadavg()
    out["finished"] = True
    return out


GOALS = (
    ("capture_fast_ratio", 0.90, "capture with statistics within 10% of bare generate"),
    ("fast_speedup", 2.0, "the fast path at least 2x HF generate"),
    ("compiled_ratio", 2.0, "the compiled fast path (static caches, CUDA graphs) at least 2x"),
    ("steer_fast_ratio", 0.80, "steering within 20% of bare generate"),
)
"""(cell key, least value, meaning), judged at each modality's largest batch size."""


def goals(cells: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """``"<modality>@<batch>" -> key -> {value, goal, met}`` at each modality's largest batch."""
    out: dict[str, dict[str, Any]] = {}
    for modality in dict.fromkeys(c["modality"] for c in cells):
        ran = [c for c in cells if c["modality"] == modality and "bare_eps" in c]
        if not ran:
            continue
        cell = max(ran, key=lambda c: c["batch_size"])
        out[f"{modality}@{cell['batch_size']}"] = {
            key: {"value": cell[key], "goal": least, "met": cell[key] >= least, "means": what}
            for key, least, what in GOALS
            if key in cell  # compiled_ratio: with --compile true
        }
    return out


COLUMNS = (
    ("modality", "{}"),
    ("batch_size", "{}"),
    ("bare_eps", "{:.1f}"),
    ("fast_eps", "{:.1f}"),
    ("fast_identical", "{}"),
    ("fast_speedup", "{:.2f}"),
    ("compiled_ratio", "{:.2f}"),
    ("compiled_identical", "{}"),
    ("compiled_graphs", "{}"),
    ("compile_s", "{:.1f}"),
    ("capture_hf_ratio", "{:.2f}"),
    ("capture_fast_ratio", "{:.2f}"),
    ("reference_eps", "{:.2f}"),
    ("capture_fast_vs_reference", "{:.1f}"),
    ("steer_hf_ratio", "{:.2f}"),
    ("steer_fast_ratio", "{:.2f}"),
    ("stats_torch_ms", "{:.2f}"),
    ("stats_numba_ms", "{:.2f}"),
    ("peak_memory_gib", "{:.2f}"),
    ("replay_ok", "{}"),
)


def format_row(cell: dict) -> str:
    """One table row; ``-`` where a cell lacks the measurement (numba off CPU), then why a
    cell has none (skipped, error) or why its compiled variant has none."""
    row = " ".join(f"{fmt.format(cell[key]) if key in cell else '-':>13}" for key, fmt in COLUMNS)
    why = cell.get("error") or cell.get("skipped")
    why = why or (f"compiled: {cell['compiled_error']}" if "compiled_error" in cell else None)
    return f"{row}  {why}" if why else row


def format_table(result: dict, header: bool = False) -> str:
    """The printed summary: one row per (modality, batch size), then the reducer."""
    lines = [" ".join(f"{k[:13]:>13}" for k, _ in COLUMNS)] if header or result["cells"] else []
    lines += [format_row(c) for c in result["cells"]]
    for where, checks in result.get("goals", {}).items():
        lines += [
            f"goal {where}: {key} {c['value']:.2f} >= {c['goal']:.2f}: "
            f"{'met' if c['met'] else 'NOT met'} ({c['means']})"
            for key, c in checks.items()
        ]
    if r := result.get("reducer"):
        lines.append(
            f"reducer: {r['units']} units x {r['conditions']} conditions: finalize "
            f"{r['finalize_s']:.1f} s on {r['threads']} threads, peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
    return "\n".join(lines)


def bench(out: str | None = None, **options: Any) -> dict[str, Any]:
    """The ``crossmodal bench`` command: run, print the table, write JSON to ``out``.

    Args:
        out: JSON path, or ``None``.
        options: :class:`BenchConfig` fields; ``device`` defaults to ``cuda`` when present,
            and a CUDA run defaults to :data:`GPU_DEFAULTS` (large random model, bf16,
            B=32/128, 16 new tokens, no reducer); a CPU run to the organism
            (:class:`BenchConfig`).
    """
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else {}
    given = {k: v for k, v in options.items() if v is not None}
    cfg = BenchConfig(**{**defaults, **given, "device": device})
    result = run_bench(cfg, on_cell=(lambda partial: _write_json(partial, out)) if out else None)
    print(format_table(result))
    if out:
        _write_json(result, out)
    return result


def _write_json(result: dict[str, Any], path: str) -> None:
    """Write whole or not at all (a run killed mid-write keeps the previous version)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crossmodal.bench [--device cuda --model large] [--out results.json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal.bench",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=None, help="write the JSON result here")
    for f in fields(BenchConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_PARSE.get(str(f.type), str),
            metavar=f.name.upper(),
            help=_flag_help(f.name, f.default),
        )
    return exit_status(bench(**vars(parser.parse_args(argv))))


def exit_status(result: dict[str, Any]) -> int:
    """1 when a cell failed (its error is in the table and the JSON), else 0."""
    return 1 if any("error" in cell for cell in result["cells"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
