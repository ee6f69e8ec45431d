"""The steering fleet: :class:`SteerWorker` runs grid cells; :func:`run_steer` drives the grid.

A :class:`SteerWorker` is a callable class (style lesson 10): ``__init__`` loads the model,
the selectivity Dataset, the LID backends and the inputs once; each call runs ONE task (a
list of cells of one input modality) over every input, rows of many cells sharing each
``generate`` batch (:mod:`crossmodal.model.forcing`), measures every output and writes ONE part
file ``parts/<task id>.parquet`` (written to a temporary name, then renamed). It runs
without Ray; the driver wraps it in Ray actors of its own, separate from the collectors.

Resume and exactly-once: a cell is done when a part file holds it. A worker killed mid-task
leaves no part and its task is run again; a task retried after its part landed rewrites the
same file (the name hashes its cell ids) with the same rows. :func:`consolidate` keeps one
row per (cell, input) from the parts of the current grid.

Which units each cell forces, and with what: :class:`crossmodal.model.forcing.UnitForcing`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xarray as xr
from tqdm import tqdm

from crossmodal.fleet.faults import FaultPoint, env_vars
from crossmodal.steer.grid import Cell, SelectivitySource, SteerConfig, expand, tasks
from crossmodal.store.lock import OutputLock
from crossmodal.model.forcing import Intervention, UnitForcing

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PARTS = "parts"
CELL_FIELDS = ("kind", "input_modality", "role", "unit_modality", "step", "language",
               "set_kind", "scope", "k", "n_units", "forcing", "seed")  # fmt: skip


def open_selectivity(source: SelectivitySource) -> xr.Dataset:
    """The selectivity Dataset: a Zarr group (``xr.open_zarr``) or a NetCDF file."""
    path = Path(str(source.path))
    if not path.exists():
        raise ValueError(
            f"selectivity.path must be an existing store, got {str(path)!r}; run the collect "
            "and reduce jobs first"
        )
    if path.suffix == ".nc":
        return xr.open_dataset(path)
    from crossmodal.store.results import decode_strings

    # Zarr returns string labels as numpy StringDType, which ``.astype(str)`` cannot convert.
    return decode_strings(xr.open_zarr(path, group=source.group, consolidated=False))


def _input_records(config: SteerConfig, speech: bool) -> tuple[list, dict[str, dict[str, str]]]:
    """``n_inputs`` input records (with audio when ``speech``) and reference texts by language."""
    data, langs = config.data, list(config.measured_languages)
    if data.source == "organism":
        from crossmodal.organism import organism_corpus

        recs = organism_corpus(data.split, langs, config.n_inputs, data.seed, audio=False)
        inputs = organism_corpus(
            data.split, [config.input_language], config.n_inputs, data.seed, audio=speech
        )
    else:
        from crossmodal.data.sources import join_by_id
        from crossmodal.data.fleurs import FleursParquetSource, FleursSource

        kind = FleursSource if data.source == "fleurs_raw" else FleursParquetSource
        text = kind(data.path, audio=False)
        joined = join_by_id({lang: text.records(lang, data.split) for lang in langs})
        ids = [r.id for r in joined[langs[0]]]
        chosen = sorted(
            np.random.default_rng(data.seed).permutation(ids)[: config.n_inputs].tolist()
        )
        recs = [r for lang in langs for r in joined[lang] if r.id in set(chosen)]
        src = kind(data.path, audio=speech, audio_root=data.audio_root)
        inputs = list(src.records(config.input_language, data.split, ids=tuple(chosen)))
    refs: dict[str, dict[str, str]] = {}
    for r in recs:
        refs.setdefault(r.language, {})[r.id] = r.text
    return inputs, refs


def part_name(cells: Sequence[Cell]) -> str:
    """The part file of a task: a hash of its sorted cell ids."""
    text = ",".join(sorted(c.id for c in cells))
    return hashlib.sha256(text.encode()).hexdigest()[:16] + ".parquet"


class SteerWorker:
    """One model replica: ``worker(cells)`` runs those cells over every input, writes a part.

    Args:
        config: the validated grid.
        device: default ``cuda`` when ``config.actors.num_gpus > 0`` and available, else CPU.
    """

    def __init__(self, config: SteerConfig, device: str | None = None) -> None:
        from crossmodal.steer.lid_backends import get_identifier
        from crossmodal.model.load import load_model

        self.config = config
        use_gpu = config.actors.num_gpus > 0 and torch.cuda.is_available()
        self.loaded = load_model(config.model, device=device or ("cuda" if use_gpu else "cpu"),
                                 dtype=config.dtype, revision=config.revision)  # fmt: skip
        self.forcing = UnitForcing(open_selectivity(config.selectivity), self.loaded.model)
        self.identifiers = {b: get_identifier(b, self._lid_path(b)) for b in config.lid.backends}
        speech = "speech" in config.input_modalities
        self.inputs, self.references = _input_records(config, speech)
        self.out_dir = Path(config.output) / PARTS
        self._fault = FaultPoint("steer_worker", config.output)  # CROSSMODAL_FAULT (faults.py)

    def _lid_path(self, backend: str) -> str | None:
        """fastText/GlotLID: the configured file; organism: the model's lexicon if it has one."""
        if backend != "organism":
            return self.config.lid.model_path
        model_dir = Path(self.config.model)
        return str(model_dir) if (model_dir / "organism_lexicon.json").is_file() else None

    def __call__(self, cells: Sequence[Cell]) -> dict[str, Any]:
        """Run ``cells`` (one input modality) and write their part; returns a small summary."""
        start = time.time()
        modality = {c.input_modality for c in cells}
        if len(modality) != 1:
            raise ValueError(
                f"cells must share one input modality, got {sorted(modality)}; use grid.tasks"
            )
        plans = [self.forcing.intervention(c) for c in cells]
        texts, tokens = self.generate(cells, [p[0] for p in plans], modality.pop())
        table = pa.table(self.measure(cells, [p[1] for p in plans], texts, tokens))
        name = part_name(cells)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out_dir / name)
        return {"part": name, "cells": [c.id for c in cells], "rows": table.num_rows,
                "seconds": time.time() - start}  # fmt: skip

    def generate(
        self, cells: Sequence[Cell], interventions: Sequence[Intervention], modality: str
    ) -> tuple[list[list[str]], list[list[list[str]]]]:
        """Greedy outputs ``texts[cell][input]`` and their tokens, batched over cells x inputs."""
        from crossmodal.model.capture import end_token_ids, generated_tokens
        from crossmodal.model.inputs import make_batch
        from crossmodal.model.forcing import generate_forced

        rows = [(c, i) for i in range(len(self.inputs)) for c in range(len(cells))]
        texts = [[""] * len(self.inputs) for _ in cells]
        tokens: list[list[list[str]]] = [[[] for _ in self.inputs] for _ in cells]
        tokenizer = self.loaded.processor.tokenizer
        end_ids = end_token_ids(self.loaded.model)
        size = self.config.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            distinct = sorted({i for _, i in chunk})
            batch = make_batch([self.inputs[i] for i in distinct], modality, self.loaded)
            where = {i: n for n, i in enumerate(distinct)}
            seqs = generate_forced(
                self.loaded,
                batch.model_kwargs(self.loaded.device, self.loaded.dtype),
                self.config.output_language,
                [interventions[c] for c, _ in chunk],
                max_new_tokens=self.config.max_new_tokens,
                rows=[where[i] for _, i in chunk],
            )
            ids = generated_tokens(seqs.cpu(), end_ids)
            decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
            for (c, i), row_ids, text in zip(chunk, ids, decoded, strict=True):
                texts[c][i] = text
                tokens[c][i] = tokenizer.convert_ids_to_tokens(row_ids)
            self._fault.tick()
        return texts, tokens

    def measure(
        self,
        cells: Sequence[Cell],
        facts: Sequence[Mapping[str, float]],
        texts: Sequence[Sequence[str]],
        tokens: Sequence[Sequence[Sequence[str]]],
    ) -> dict[str, list]:
        """One row per (cell, input): cell fields, output, LID, code-mixing and quality."""
        from crossmodal.steer import metrics
        from crossmodal.steer.lid_backends import lid_columns

        cfg, out_lang = self.config, self.config.output_language
        ids = [r.id for r in self.inputs]
        cols: dict[str, list] = {"cell_id": [], **{f: [] for f in CELL_FIELDS}, "n_forced": [],
                                 "mean_ap": [], "input_id": [], "text": [], "n_tokens": []}  # fmt: skip
        for cell, fact, outs, toks in zip(cells, facts, texts, tokens, strict=True):
            cols["cell_id"] += [cell.id] * len(ids)
            for f in CELL_FIELDS:
                cols[f] += [getattr(cell, f)] * len(ids)
            cols["n_forced"] += [fact["n_forced"]] * len(ids)
            cols["mean_ap"] += [fact["mean_ap"]] * len(ids)
            cols["input_id"] += ids
            cols["text"] += list(outs)
            cols["n_tokens"] += [len(t) for t in toks]
        langs = [c.language for c in cells for _ in ids]
        ref_out = [self.references.get(out_lang, {}).get(i, "") for _ in cells for i in ids]
        ref_tgt = [
            self.references.get(c.language, {}).get(i, "") if c.language else ""
            for c in cells
            for i in ids
        ]
        cols["reference_output"], cols["reference_target"] = ref_out, ref_tgt
        for n, (name, ident) in enumerate(self.identifiers.items()):
            lid = lid_columns(ident, cols["text"], cfg.measured_languages)
            cols.update({f"lid_{name}_{k}": v for k, v in lid.items()})
            if n == 0:
                cols["target_hit"] = [
                    None if lg is None else top == lg
                    for top, lg in zip(lid["top"], langs, strict=True)
                ]
                cols["p_target"] = [
                    float("nan") if lg is None else lid[f"p_{lg}"][j] for j, lg in enumerate(langs)
                ]
        mix = [
            metrics.code_mixing(t, k)
            for t, k in zip(cols["text"], (k for ts in tokens for k in ts), strict=True)
        ]
        for key in mix[0] if mix else ():
            cols[key] = [m[key] for m in mix]
        nan = float("nan")
        cols["bleu_target"] = [
            metrics.sentence_bleu(h, r, lg) if lg else nan
            for h, r, lg in zip(cols["text"], ref_tgt, langs, strict=True)
        ]
        cols["chrf_target"] = [
            metrics.sentence_chrfpp(h, r) if lg else nan
            for h, r, lg in zip(cols["text"], ref_tgt, langs, strict=True)
        ]
        cols["bleu_output"] = [
            metrics.sentence_bleu(h, r, out_lang)
            for h, r in zip(cols["text"], ref_out, strict=True)
        ]
        cols["chrf_output"] = [
            metrics.sentence_chrfpp(h, r) for h, r in zip(cols["text"], ref_out, strict=True)
        ]
        cols["wer_output"] = [metrics.wer(r, h) for h, r in zip(cols["text"], ref_out, strict=True)]
        cols["cer_output"] = [metrics.cer(r, h) for h, r in zip(cols["text"], ref_out, strict=True)]
        return cols


# --------------------------------------------------------------------------- driver


def done_cells(output: str | Path) -> set[str]:
    """Cell ids held by the finished part files under ``output``."""
    parts = Path(output) / PARTS
    done: set[str] = set()
    for path in sorted(parts.glob("*.parquet")) if parts.is_dir() else []:
        done.update(pq.read_table(path, columns=["cell_id"]).column("cell_id").to_pylist())
    return done


def consolidate(config: SteerConfig, cells: Sequence[Cell]) -> tuple[Path, Path]:
    """``results.parquet`` (one row per cell and input, this grid only) and ``summary.parquet``."""
    from crossmodal.steer.metrics import summarize

    out = Path(config.output)
    wanted = {c.id for c in cells}
    tables = [pq.read_table(p) for p in sorted((out / PARTS).glob("*.parquet"))]
    frame = pa.concat_tables(tables, promote_options="default").to_pandas() if tables else None
    if frame is None or frame.empty:
        raise ValueError(
            f"output must hold finished parts, got none under {str(out / PARTS)!r}; run the grid"
        )
    frame = frame[frame["cell_id"].isin(wanted)].drop_duplicates(
        ["cell_id", "input_id"], keep="first"
    )
    frame = frame.reset_index(drop=True)
    results, summary = out / "results.parquet", out / "summary.parquet"
    frame.to_parquet(results, index=False)
    prefixes = [f"lid_{b}" for b in config.lid.backends]
    table = summarize(
        frame,
        keys=(*CELL_FIELDS, "n_forced", "mean_ap"),
        lid_prefixes=prefixes,
        languages=config.measured_languages,
        output_language=config.output_language,
    )
    table.to_parquet(summary, index=False)
    return results, summary


def _start_actors(config: SteerConfig, address: str | None) -> tuple[list[Any], bool]:
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    started = not ray.is_initialized()
    if started:
        env = {**RAY_ENV, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **env_vars()}
        ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env})
    a = config.actors
    remote = ray.remote(num_gpus=a.num_gpus, num_cpus=a.num_cpus, max_restarts=a.max_restarts,
                        max_task_retries=a.max_task_retries)(SteerWorker)  # fmt: skip
    return [remote.remote(config) for _ in range(a.count)], started


def run_steer(
    config: SteerConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending cell of the grid on Ray actors, then consolidate the results.

    Returns:
        ``{"output", "cells", "ran", "resumed", "results", "summary", "seconds"}``.
    """
    out = Path(config.output)
    with OutputLock(out, "steer", echo=echo):  # one writer per output (lock.py)
        return _steer(config, out, address=address, progress=progress, echo=echo)


def _steer(
    config: SteerConfig,
    out: Path,
    *,
    address: str | None,
    progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The locked part of :func:`run_steer`."""
    start = time.time()
    cells = expand(config)
    (out / "grid.json").write_text(_grid_json(config, cells))
    done = done_cells(out) & {c.id for c in cells}
    pending = tasks([c for c in cells if c.id not in done], config.cells_per_task)
    summary: dict[str, Any] = {"output": str(out.resolve()), "cells": len(cells), "ran": 0,
                               "resumed": len(done)}  # fmt: skip
    if pending:
        from ray.util import ActorPool

        actors, started = _start_actors(config, address)
        driver_fault = FaultPoint("driver", out)  # CROSSMODAL_FAULT (faults.py)
        bar = tqdm(
            total=len(cells), initial=len(done), unit="cell", desc="steer", disable=not progress
        )
        try:
            with bar:
                pool = ActorPool(actors)
                for res in pool.map_unordered(lambda a, task: a.__call__.remote(task), pending):
                    summary["ran"] += len(res["cells"])
                    bar.update(len(res["cells"]))
                    driver_fault.tick()
        finally:
            if started:
                import ray

                ray.shutdown()
    results, cell_summary = consolidate(config, cells)
    summary.update(results=str(results), summary=str(cell_summary), seconds=time.time() - start)
    echo(f"steered {summary['ran']} cells ({summary['resumed']} already done) into {out} "
         f"in {summary['seconds']:.1f} s")  # fmt: skip
    return summary


def _grid_json(config: SteerConfig, cells: Sequence[Cell]) -> str:
    import json

    return json.dumps(
        {"config": config.to_dict(), "cells": [dict(c.to_dict(), id=c.id) for c in cells]}, indent=1
    )
