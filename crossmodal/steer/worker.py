"""One steering replica: runs a task of grid cells over every input and writes its part file.

A :class:`SteerWorker` is a callable class, so it runs without Ray in tests and the driver
wraps it in actors (:mod:`crossmodal.fleet`): ``__init__`` loads the model, the selectivity
Dataset, the LID backends and the inputs once; each call runs ONE task (a list of cells of
one input modality) over every input, rows of many cells sharing each ``generate`` batch
(:mod:`crossmodal.model.forcing`), measures every output and writes ONE part file
(:mod:`crossmodal.steer.parts`). Which units each cell forces: :mod:`crossmodal.steer.units`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import xarray as xr

from crossmodal.data.records import Record
from crossmodal.fleet.faults import FaultPoint
from crossmodal.model.forcing import Intervention
from crossmodal.steer.grid import Cell, SelectivitySource, SteerConfig
from crossmodal.steer.lid import get_identifier, lid_columns
from crossmodal.steer.parts import CELL_FIELDS, PARTS, write_part
from crossmodal.steer.units import CellForcing, UnitForcing
from crossmodal.store.location import is_url, upath

References = dict[str, dict[str, str]]
"""Reference texts by language, then by input id."""


def open_selectivity(source: SelectivitySource) -> xr.Dataset:
    """The selectivity Dataset: a Zarr group (``xr.open_zarr``) or a NetCDF file."""
    path = upath(str(source.path))  # a local path or an s3:// URL (store/location.py)
    if not path.exists():
        raise ValueError(
            f"selectivity.path must be an existing store, got {str(path)!r}; run the collect "
            "and reduce jobs first"
        )
    if path.suffix == ".nc":
        return xr.open_dataset(path)
    from crossmodal.store.datasets import read_dataset

    return read_dataset(path, source.group)


def input_records(config: SteerConfig, speech: bool) -> tuple[list[Record], References]:
    """``n_inputs`` input records (with audio when ``speech``) and reference texts by language.

    The inputs are ``n_inputs`` ids every measured language has, drawn with ``data.seed``
    and read in the source's order; the references are those ids' texts in each language.
    """
    from crossmodal.data import open_source
    from crossmodal.data.sources import joined_records

    data, langs = config.data, list(config.measured_languages)
    corpus = {"n_sentences": config.n_inputs, "seed": data.seed}
    text = open_source(data.source, path=data.path, audio=False, **corpus)
    joined = joined_records(text, langs, data.split)
    ids = [r.id for r in joined[langs[0]]]
    chosen = sorted(np.random.default_rng(data.seed).permutation(ids)[: config.n_inputs].tolist())
    keep = set(chosen)
    source = open_source(
        data.source, path=data.path, audio=speech, audio_root=data.audio_root, **corpus
    )
    inputs = list(source.records(config.input_language, data.split, ids=tuple(chosen)))
    refs: References = {}
    for lang in langs:
        for r in joined[lang]:
            if r.id in keep:
                refs.setdefault(r.language, {})[r.id] = r.text
    return inputs, refs


class SteerWorker:
    """One model replica: ``worker(cells)`` runs those cells over every input, writes a part.

    Args:
        config: the validated grid.
        device: default ``cuda`` when ``config.actors.num_gpus > 0`` and available, else CPU.
    """

    def __init__(self, config: SteerConfig, device: str | None = None) -> None:
        from crossmodal.model.load import load_model

        self.config = config
        use_gpu = config.actors.num_gpus > 0 and torch.cuda.is_available()
        self.loaded = load_model(
            config.model,
            device=device or ("cuda" if use_gpu else "cpu"),
            dtype=config.dtype,
            revision=config.revision,
        )
        self.forcing = UnitForcing(open_selectivity(config.selectivity), self.loaded.model)
        self.identifiers = {b: get_identifier(b, self._lid_path(b)) for b in config.lid.backends}
        speech = "speech" in config.input_modalities
        self.inputs, self.references = input_records(config, speech)
        self.out_dir = upath(config.output) / PARTS
        self._fault = FaultPoint("steer_worker", config.output)  # CROSSMODAL_FAULT (faults.py)

    def _lid_path(self, backend: str) -> str | None:
        """fastText/GlotLID: the configured file; organism: the model's lexicon if it has one."""
        if backend != "organism":
            return self.config.lid.model_path
        model_dir = Path(self.config.model)
        if is_url(self.config.model):  # the synced copy of its configs (store/inputs.py)
            from crossmodal.model.load import model_files

            model_dir = model_files(self.config.model)
        return str(model_dir) if (model_dir / "organism_lexicon.json").is_file() else None

    def __call__(self, cells: Sequence[Cell]) -> dict[str, Any]:
        """Run ``cells`` (one input modality) and write their part; returns a small summary."""
        start = time.time()
        modality = {c.input_modality for c in cells}
        if len(modality) != 1:
            raise ValueError(
                f"cells must share one input modality, got {sorted(modality)}; use grid.tasks"
            )
        forcings = [self.forcing.cell_forcing(c) for c in cells]
        texts, tokens = self.generate(cells, [f.intervention for f in forcings], modality.pop())
        table = pa.table(self.measure(cells, forcings, texts, tokens))
        name = write_part(self.out_dir, cells, table)
        return {
            "part": name,
            "cells": [c.id for c in cells],
            "rows": table.num_rows,
            "seconds": time.time() - start,
        }

    def generate(
        self, cells: Sequence[Cell], interventions: Sequence[Intervention], modality: str
    ) -> tuple[list[list[str]], list[list[list[str]]]]:
        """Greedy outputs ``texts[cell][input]`` and their tokens, batched over cells x inputs."""
        from crossmodal.model.capture import end_token_ids, generated_tokens

        rows = [(c, i) for i in range(len(self.inputs)) for c in range(len(cells))]
        texts = [[""] * len(self.inputs) for _ in cells]
        tokens: list[list[list[str]]] = [[[] for _ in self.inputs] for _ in cells]
        tokenizer = self.loaded.processor.tokenizer
        end_ids = end_token_ids(self.loaded.model)
        size = self.config.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            seqs = self._generate_chunk(chunk, interventions, modality)
            ids = generated_tokens(seqs.cpu(), end_ids)
            decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
            for (c, i), row_ids, text in zip(chunk, ids, decoded, strict=True):
                texts[c][i] = text
                tokens[c][i] = tokenizer.convert_ids_to_tokens(row_ids)
            self._fault.tick()
        return texts, tokens

    def _generate_chunk(
        self,
        chunk: Sequence[tuple[int, int]],
        interventions: Sequence[Intervention],
        modality: str,
    ) -> torch.Tensor:
        """Generated sequences of one batch of (cell, input) rows; each input is encoded once."""
        from crossmodal.model.forcing import generate_forced
        from crossmodal.model.inputs import make_batch

        distinct = sorted({i for _, i in chunk})
        last = self.config.speech_last_frame
        batch = make_batch(
            [self.inputs[i] for i in distinct], modality, self.loaded, speech_last_frame=last
        )
        where = {i: n for n, i in enumerate(distinct)}
        return generate_forced(
            self.loaded,
            batch.model_kwargs(self.loaded.device, self.loaded.dtype),
            self.config.output_language,
            [interventions[c] for c, _ in chunk],
            max_new_tokens=self.config.max_new_tokens,
            rows=[where[i] for _, i in chunk],
            speech_frames=batch.speech_frames,
        )

    def measure(
        self,
        cells: Sequence[Cell],
        forcings: Sequence[CellForcing],
        texts: Sequence[Sequence[str]],
        tokens: Sequence[Sequence[Sequence[str]]],
    ) -> dict[str, list]:
        """One row per (cell, input): cell fields, output, LID, code-mixing and quality."""
        ids = [r.id for r in self.inputs]
        out_lang = self.config.output_language
        cols = _cell_columns(cells, forcings, texts, tokens, ids)
        langs = [c.language for c in cells for _ in ids]
        ref_out = [self.references.get(out_lang, {}).get(i, "") for _ in cells for i in ids]
        ref_tgt = [
            self.references.get(c.language, {}).get(i, "") if c.language else ""
            for c in cells
            for i in ids
        ]
        cols["reference_output"], cols["reference_target"] = ref_out, ref_tgt
        cols.update(self._lid_columns(cols["text"], langs))
        flat_tokens = [k for ts in tokens for k in ts]
        cols.update(_quality_columns(cols["text"], flat_tokens, ref_tgt, ref_out, langs, out_lang))
        return cols

    def _lid_columns(self, texts: Sequence[str], langs: Sequence[str | None]) -> dict[str, list]:
        """Every backend's ``lid_<backend>_*`` columns; the first backend also gives
        ``target_hit`` (top language is the cell's) and ``p_target`` (its probability)."""
        cols: dict[str, list] = {}
        for n, (name, ident) in enumerate(self.identifiers.items()):
            lid = lid_columns(ident, texts, self.config.measured_languages)
            cols.update({f"lid_{name}_{k}": v for k, v in lid.items()})
            if n == 0:
                cols["target_hit"] = [
                    None if lg is None else top == lg
                    for top, lg in zip(lid["top"], langs, strict=True)
                ]
                cols["p_target"] = [
                    float("nan") if lg is None else lid[f"p_{lg}"][j] for j, lg in enumerate(langs)
                ]
        return cols


def _cell_columns(
    cells: Sequence[Cell],
    forcings: Sequence[CellForcing],
    texts: Sequence[Sequence[str]],
    tokens: Sequence[Sequence[Sequence[str]]],
    ids: Sequence[str],
) -> dict[str, list]:
    """The cell's fields and forcing facts, the input id, the output and its token count."""
    cols: dict[str, list] = {"cell_id": [], **{f: [] for f in CELL_FIELDS}}
    cols.update({k: [] for k in ("n_forced", "mean_ap", "input_id", "text", "n_tokens")})
    for cell, forcing, outs, toks in zip(cells, forcings, texts, tokens, strict=True):
        cols["cell_id"] += [cell.id] * len(ids)
        for f in CELL_FIELDS:
            cols[f] += [getattr(cell, f)] * len(ids)
        cols["n_forced"] += [forcing.n_forced] * len(ids)
        cols["mean_ap"] += [forcing.mean_ap] * len(ids)
        cols["input_id"] += ids
        cols["text"] += list(outs)
        cols["n_tokens"] += [len(t) for t in toks]
    return cols


def _quality_columns(
    texts: Sequence[str],
    tokens: Sequence[Sequence[str]],
    ref_target: Sequence[str],
    ref_output: Sequence[str],
    langs: Sequence[str | None],
    out_lang: str,
) -> dict[str, list]:
    """Code-mixing of each output, and its quality against the target language's reference
    (NaN for a cell without one) and against the output language's."""
    from crossmodal.steer import metrics

    cols: dict[str, list] = {}
    mix = [metrics.code_mixing(t, k) for t, k in zip(texts, tokens, strict=True)]
    for key in mix[0] if mix else ():
        cols[key] = [m[key] for m in mix]
    nan = float("nan")
    target = list(zip(texts, ref_target, langs, strict=True))
    output = list(zip(texts, ref_output, strict=True))
    cols["bleu_target"] = [metrics.sentence_bleu(h, r, lg) if lg else nan for h, r, lg in target]
    cols["chrf_target"] = [metrics.sentence_chrfpp(h, r) if lg else nan for h, r, lg in target]
    cols["bleu_output"] = [metrics.sentence_bleu(h, r, out_lang) for h, r in output]
    cols["chrf_output"] = [metrics.sentence_chrfpp(h, r) for h, r in output]
    cols["wer_output"] = [metrics.wer(r, h) for h, r in output]
    cols["cer_output"] = [metrics.cer(r, h) for h, r in output]
    return cols
