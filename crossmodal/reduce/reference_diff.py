"""The differences from the reference implementation, measured on the model organism.

``python -m crossmodal.reduce.reference_diff --out results/reference-diff.json`` runs x2en,
text and speech, steps 1/6/11, the demo's examples (40 per source language x the five
non-pivot languages) through crossmodal's capture, once as crossmodal does it and once per
reference behaviour (docs/method.md, "Differences from the reference implementation"):

* text ``default_tag``: inputs tokenized with the tokenizer's default source tag;
* text ``pad256_kv``: inputs padded to 256 positions, cross-attention ``k_proj``/``v_proj``
  means over all 256 (padding included);
* speech ``length_filter``: the examples the reference reader's transpose heuristic and
  length-majority filter keep (crossmodal's values otherwise);
* speech ``keep_last_frame``: the half-padded last frame read by the adapter (the model's
  own batch-1 run), ``k_proj``/``v_proj`` means over every frame the lone run has;
* ``reference``: all of a modality's reference behaviours at once.

For each variant, condition (step, language: positives the language, negatives the other
four) and pooling ``prefix_mean`` it computes every ``decoder`` unit's exact AP (sklearn's
``average_precision_score``; this validation mode holds the ``[example, unit]`` matrix) and
compares the AP vector with crossmodal's: Spearman over all units and the overlap of the
top-100 sets (ties by the smaller unit id, as the selected sets break them). ``--quick``
(8 examples per language) is what the tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossmodal.data.records import Record
from crossmodal.model.capture import Capturer
from crossmodal.model.inputs import (
    ModelBatch,
    last_frame_reaches_decoder,
    make_batch,
    padding_guard,
    speech_lengths,
)
from crossmodal.model.load import LoadedModel
from crossmodal.model.reference import (
    REFERENCE_TEXT_WIDTH,
    kv_means_over,
    length_majority_filter,
    reference_text_batch,
    speech_key_lengths,
)
from crossmodal.model.units import UnitIndex
from crossmodal.reduce.overlap import spearman_rows
from crossmodal.reduce.selection import _top_k
from crossmodal.stats.finalize import exact_ap

SOURCES = ("deu", "spa", "fra", "jpn", "cmn")
STEPS = (1, 6, 11)
TOP_K = 100
VARIANTS = {
    "text": ("default_tag", "pad256_kv", "reference"),
    "speech": ("length_filter", "keep_last_frame", "reference"),
}
"""Reference behaviours measured per modality, each against crossmodal's own run."""


@dataclass
class Run:
    """One variant's values: step -> ``[example, unit]`` float64 (NaN rows: ended before the
    step or dropped), and the examples' languages."""

    values: dict[int, np.ndarray]
    languages: np.ndarray


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman of two AP vectors over the units finite in both (scipy's ``spearmanr``)."""
    return float(spearman_rows(a[None, :], b[None, :])[0, 0])


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> int:
    """Units in both top-k sets (largest AP first, ties by the smaller unit id, NaN never)."""
    ids = np.arange(a.size)
    return int(np.intersect1d(_top_k(a, ids, k), _top_k(b, ids, k)).size)


def per_unit_ap(run: Run, step: int, languages: Sequence[str]) -> np.ndarray:
    """``[language, unit]`` exact AP of the rows present at ``step`` (one vs the others)."""
    rows = ~np.isnan(run.values[step]).all(axis=1)
    labels = torch.from_numpy(run.languages[rows][:, None] == np.asarray(languages)[None, :])
    return exact_ap(torch.from_numpy(run.values[step][rows]), labels).numpy()


def _batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def _write_kv(values: np.ndarray, index: UnitIndex, kv: dict[str, np.ndarray]) -> None:
    """Overwrite the ``k_proj``/``v_proj`` columns of ``values [row, step, unit]``."""
    for site in index.sites:
        if site.name in kv:
            values[:, :, site.offset : site.offset + site.n_features] = kv[site.name][:, None]


def _text_kv(loaded: LoadedModel, index: UnitIndex, batch: ModelBatch) -> dict[str, np.ndarray]:
    """k/v means over every position of the padded text inputs (padding included)."""
    kwargs = batch.model_kwargs(loaded.device, loaded.dtype)
    with torch.inference_mode():
        hidden = loaded.model.text_encoder(**kwargs).last_hidden_state
    lengths = torch.full((len(batch),), hidden.shape[1])
    return kv_means_over(loaded, index, hidden, lengths)


def _speech_kv(loaded: LoadedModel, index: UnitIndex, batch: ModelBatch) -> dict[str, np.ndarray]:
    """k/v means over every frame a lone run of each row has (its last frame kept)."""
    kwargs = batch.model_kwargs(loaded.device, loaded.dtype)
    mask = kwargs["attention_mask"]
    with torch.inference_mode(), padding_guard(loaded.model, mask, batch.speech_frames):
        hidden = loaded.model.speech_encoder(**kwargs).last_hidden_state
    lengths = speech_lengths(loaded.model, mask, batch.speech_frames)[-1].long()
    return kv_means_over(loaded, index, hidden, lengths)


def _builder(modality: str, variant: str, loaded: LoadedModel) -> tuple[Callable, Callable | None]:
    """(records -> batch, batch -> k/v columns to overwrite or None) of a variant."""
    if modality == "speech":
        keep = variant in ("keep_last_frame", "reference")
        last = "keep" if keep else "drop"
        return (lambda rs: make_batch(rs, "speech", loaded, speech_last_frame=last)), (
            _speech_kv if keep else None
        )
    if variant == "crossmodal":
        return (lambda rs: make_batch(rs, "text", loaded)), None
    tag = variant in ("default_tag", "reference")
    pad = variant in ("pad256_kv", "reference")
    width = REFERENCE_TEXT_WIDTH if pad else None
    return (lambda rs: reference_text_batch(rs, loaded, default_tag=tag, pad_to=width)), (
        _text_kv if pad else None
    )


def capture_run(
    loaded: LoadedModel,
    records: dict[str, list[Record]],
    modality: str,
    variant: str,
    *,
    steps: Sequence[int] = STEPS,
    batch_size: int = 16,
    max_new_tokens: int = 16,
) -> Run:
    """Capture every record of ``records`` (language -> records) as ``variant`` builds them."""
    cap = Capturer(loaded, "decoder", steps, ("prefix_mean",), max_new_tokens)
    build, kv = _builder(modality, variant, loaded)
    parts, langs = [], []
    for language, recs in records.items():
        for chunk in _batches(recs, batch_size):
            batch = build(chunk)
            res = cap.run(batch, "eng")
            values = res.buffers["prefix_mean"].double().cpu().numpy()
            if kv is not None:
                _write_kv(values, cap.index, kv(loaded, cap.index, batch))
                values[~res.valid.cpu().numpy()] = np.nan
            parts.append(values)
            langs += [language] * len(chunk)
    stacked = np.concatenate(parts)
    return Run({t: stacked[:, i] for i, t in enumerate(cap.steps)}, np.asarray(langs))


def filtered(run: Run, kept: np.ndarray) -> Run:
    """``run`` with the rows the length filter drops set to NaN (left out of every step)."""
    return Run(
        {t: np.where(kept[:, None], v, np.nan) for t, v in run.values.items()}, run.languages
    )


def length_filter(loaded: LoadedModel, records: dict[str, list[Record]]) -> dict:
    """The reference reader's filter over all x2en speech examples (every language together,
    as it reads a task's responses), on the reference's inputs (last frame kept)."""
    every = [r for recs in records.values() for r in recs]
    batch = make_batch(every, "speech", loaded, speech_last_frame="keep")
    result = length_majority_filter(speech_key_lengths(loaded, batch))
    frames = batch.speech_frames.numpy()
    return {
        "kept": result.kept,
        "n_examples": len(every),
        "n_dropped": int((~result.kept).sum()),
        "dropped": [
            f"{r.language}/{r.id}" for r, k in zip(every, result.kept, strict=True) if not k
        ],
        "weak_keys": len(result.weak_keys),
        "hidden_size": int(loaded.model.config.hidden_size),
        "frames_max": int(frames.max()),
        "frames_over_hidden": int((frames > loaded.model.config.hidden_size).sum()),
        "half_padded_last_frame": int((frames > batch.attention_mask.sum(1).numpy()).sum()),
        "last_frame_reaches_decoder": int(
            last_frame_reaches_decoder(
                loaded.model, batch.attention_mask, batch.speech_frames
            ).sum()
        ),
    }


def max_change(a: Run, b: Run, units: np.ndarray | slice = slice(None)) -> float:
    """Largest |value difference| over the (example, step, unit) cells finite in both."""
    diffs = [np.abs(a.values[t][:, units] - b.values[t][:, units]) for t in a.values]
    return float(max(np.nanmax(d, initial=0.0) for d in diffs))


def kv_units(index: UnitIndex) -> np.ndarray:
    """bool ``[unit]``: the cross-attention ``k_proj``/``v_proj`` units."""
    out = np.zeros(index.n_units, dtype=bool)
    for site in index.sites:
        if site.positions == "encoder_output":
            out[site.offset : site.offset + site.n_features] = True
    return out


def compare(base: Run, other: Run, steps: Sequence[int], languages: Sequence[str]) -> list[dict]:
    """Per (step, language): Spearman of the AP vectors and top-100 overlap, with counts."""
    out = []
    for t in steps:
        ap_a, ap_b = per_unit_ap(base, t, languages), per_unit_ap(other, t, languages)
        n_b = int((~np.isnan(other.values[t]).all(axis=1)).sum())
        for li, language in enumerate(languages):
            out.append(
                {
                    "step": t,
                    "language": language,
                    "spearman": spearman(ap_a[li], ap_b[li]),
                    "top100_overlap": top_overlap(ap_a[li], ap_b[li]),
                    "n_examples": n_b,
                }
            )
    return out


def _runs(loaded: LoadedModel, records: dict, modality: str, steps: Sequence[int]) -> dict:
    """crossmodal's run and each reference variant's of one modality (the filter's too)."""
    run = lambda variant: capture_run(loaded, records, modality, variant, steps=steps)  # noqa: E731
    runs = {"crossmodal": run("crossmodal")}
    if modality == "text":
        runs.update({v: run(v) for v in VARIANTS["text"]})
        return {"runs": runs}
    filt = length_filter(loaded, records)
    keep = run("keep_last_frame")
    runs.update(
        length_filter=filtered(runs["crossmodal"], filt["kept"]),
        keep_last_frame=keep,
        reference=filtered(keep, filt["kept"]),
    )
    filt.pop("kept")
    return {"runs": runs, "length_filter": filt}


def measure(
    n_per_language: int = 40, steps: Sequence[int] = STEPS, seed: int = 0
) -> dict[str, object]:
    """Run every variant of both modalities on the organism; the JSON-ready result."""
    from crossmodal.data.sources import OrganismSource
    from crossmodal.model.load import load_model

    loaded = load_model("organism", device="cpu", dtype="float32")
    source = OrganismSource(n_per_language, seed)
    records = {lang: list(source.records(lang, "test")) for lang in SOURCES}
    result: dict[str, object] = {"n_per_language": n_per_language, "steps": list(steps)}
    rows, changes = [], {}
    other_units = ~kv_units(UnitIndex.from_model(loaded.model, "decoder"))
    for modality in ("text", "speech"):
        got = _runs(loaded, records, modality, steps)
        if "length_filter" in got:
            result["length_filter"] = got["length_filter"]
        base = got["runs"]["crossmodal"]
        for variant in VARIANTS[modality]:
            other = got["runs"][variant]
            changes[f"{modality}/{variant}"] = {
                "all_units": max_change(base, other),
                "outside_kv": max_change(base, other, other_units),
            }
            for row in compare(base, other, steps, SOURCES):
                rows.append({"modality": modality, "variant": variant, **row})
    result["max_abs_value_change"] = changes
    result["rows"] = rows
    return result


def table(result: dict) -> str:
    """A Markdown table: per (modality, difference, step), each language's Spearman / top-100
    overlap, and the examples used."""
    head = "| modality | difference | step | " + " | ".join(SOURCES) + " | examples |"
    lines = [head, "|" + " --- |" * (len(SOURCES) + 4)]
    rows = result["rows"]
    keys = dict.fromkeys((r["modality"], r["variant"], r["step"]) for r in rows)
    for modality, variant, step in keys:
        cells = [
            r for r in rows if (r["modality"], r["variant"], r["step"]) == (modality, variant, step)
        ]
        by_lang = {r["language"]: f"{r['spearman']:.4f} / {r['top100_overlap']}" for r in cells}
        lang_cells = " | ".join(by_lang.get(lang, "") for lang in SOURCES)
        lines.append(
            f"| {modality} | {variant} | {step} | {lang_cells} | {cells[0]['n_examples']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crossmodal.reduce.reference_diff [--quick] [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal.reduce.reference_diff",
        description="Measure the differences from the reference implementation on the organism "
        "(docs/method.md, 'Differences from the reference implementation').",
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--quick", action="store_true", help="8 examples per language (tests)")
    parser.add_argument("--n-per-language", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    result = measure(8 if args.quick else args.n_per_language)
    result["command"] = "python -m crossmodal.reduce.reference_diff " + " ".join(
        argv or sys.argv[1:]
    )
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    result["seconds"] = round(time.time() - start, 1)
    print(table(result))
    print(f"speech inputs: {json.dumps(result['length_filter'])}")
    print(f"max |value change|: {json.dumps(result['max_abs_value_change'])}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
