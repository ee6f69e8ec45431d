"""How well the organism does its five tasks on held-out sentences.

Exact match of the greedy output against the reference, per (task, modality, language),
where the language is the source for x2en, the target for en2x, and both for asr (as in
the method's conditions). The floors (90% text, 80% speech) apply per task and modality,
pooled over languages; the per-language numbers are shown beside them. Also the share of outputs with at least 12 generated tokens:
the method analyses decoding steps 1, 6 and 11, so outputs must reach step 11.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import SeamlessM4TProcessor, SeamlessM4Tv2Model

from crossmodal.data.records import TARGET_SAMPLING_RATE, Record
from crossmodal.organism.corpus import check_languages, organism_corpus

TEXT_MIN, SPEECH_MIN = 0.90, 0.80
"""Exact-match floors the organism is built to meet on held-out sentences."""
MIN_STEPS = 12
TASKS = (
    ("x2en", "text"),
    ("en2x", "text"),
    ("x2en", "speech"),
    ("en2x", "speech"),
    ("asr", "speech"),
)


@dataclass
class OrganismReport:
    """Exact match per condition plus a few (input, output, reference) samples per task.

    Attributes:
        table: one row per (task, modality, language) with ``n``, ``exact_match`` and
            ``long_enough`` (share of outputs with >= 12 generated tokens).
        samples: ``{"task/modality": [(input, output, reference), ...]}``.
    """

    table: pd.DataFrame
    samples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    def floor(self, modality: str) -> float:
        return TEXT_MIN if modality == "text" else SPEECH_MIN

    def by_task(self) -> pd.DataFrame:
        """Exact match per (task, modality), pooled over languages (weighted by ``n``)."""
        t = self.table.assign(hits=self.table["exact_match"] * self.table["n"])
        pooled = t.groupby(["task", "modality"], sort=False)[["hits", "n"]].sum()
        return (pooled["hits"] / pooled["n"]).rename("exact_match").reset_index()

    def failures(self) -> pd.DataFrame:
        """Tasks (per modality) below their floor (90% text, 80% speech)."""
        pooled = self.by_task()
        return pooled[pooled["exact_match"] < pooled["modality"].map(self.floor)]

    @property
    def passed(self) -> bool:
        return self.failures().empty

    def format(self) -> str:
        """A task x language table of exact match (in %), then the samples."""
        grid = self.table.assign(em=(100 * self.table["exact_match"]).round(1))
        grid = grid.pivot_table(
            index=["task", "modality"], columns="language", values="em", sort=False
        )
        pooled = self.by_task().set_index(["task", "modality"])["exact_match"]
        grid["all"] = (100 * pooled).round(1)
        grid["floor"] = [100 * self.floor(m) for _, m in grid.index]
        lines = ["exact match (%) on held-out sentences", grid.to_string(na_rep="-"), ""]
        short = 1 - self.table["long_enough"].min()
        lines.append(
            f"outputs with >= {MIN_STEPS} tokens: worst condition {100 * (1 - short):.1f}%"
        )
        lines.append("PASS" if self.passed else f"FAIL: {len(self.failures())} task(s) below floor")
        for key, triples in self.samples.items():
            lines += ["", key]
            for src, out, ref in triples:
                mark = "=" if out == ref else "x"
                lines += [f"  in : {src}", f"  out: {out}", f"  ref: {ref} [{mark}]"]
        return "\n".join(lines)


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.inference_mode()
def translate(
    model: SeamlessM4Tv2Model,
    processor: SeamlessM4TProcessor,
    sources: Sequence[Record],
    tgt_lang: str,
    modality: str,
    batch_size: int = 64,
) -> tuple[list[str], list[int]]:
    """Greedy outputs (text, number of generated tokens before EOS) for ``sources``."""
    texts, lengths = [], []
    for batch in _batches(sources, batch_size):
        if modality == "text":
            src_lang = batch[0].language
            inputs = processor(
                text=[r.text for r in batch], src_lang=src_lang, padding=True, return_tensors="pt"
            )
        else:
            audio = [r.audio for r in batch]
            inputs = processor(audio=audio, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="pt")
        out = model.generate(**inputs, tgt_lang=tgt_lang, generate_speech=False, num_beams=1)
        seqs = out.sequences if hasattr(out, "sequences") else out[0]
        generated = seqs[:, 2:]  # after [</s>, __tgt__]
        eos = model.generation_config.eos_token_id
        for row in generated.tolist():
            n = row.index(eos) if eos in row else len(row)
            lengths.append(n)
        texts += processor.batch_decode(generated, skip_special_tokens=True)
    return [t.strip() for t in texts], lengths


def _conditions(languages: Sequence[str]) -> list[tuple[str, str, str, str, str]]:
    """(task, modality, language, source language, target language) of every condition."""
    out = []
    for task, modality in TASKS:
        for lang in languages:
            if task == "asr":
                out.append((task, modality, lang, lang, lang))
            elif lang != "eng":
                src, tgt = (lang, "eng") if task == "x2en" else ("eng", lang)
                out.append((task, modality, lang, src, tgt))
    return out


def evaluate_model(
    model: SeamlessM4Tv2Model,
    processor: SeamlessM4TProcessor,
    records: Sequence[Record],
    batch_size: int = 64,
    n_samples: int = 3,
) -> OrganismReport:
    """Evaluate every condition the languages of ``records`` allow (they must include eng)."""
    by_lang: dict[str, list[Record]] = {}
    for rec in records:
        by_lang.setdefault(rec.language, []).append(rec)
    refs = {lang: {r.id: r.text for r in recs} for lang, recs in by_lang.items()}
    rows, samples = [], {}
    model.eval()
    for task, modality, lang, src, tgt in _conditions(list(by_lang)):
        sources = by_lang[src]
        outputs, lengths = translate(model, processor, sources, tgt, modality, batch_size)
        expected = [refs[tgt][r.id] for r in sources]
        hits = [o == e for o, e in zip(outputs, expected, strict=True)]
        rows.append(
            {
                "task": task,
                "modality": modality,
                "language": lang,
                "n": len(sources),
                "exact_match": float(np.mean(hits)),
                "long_enough": float(np.mean([n >= MIN_STEPS for n in lengths])),
            }
        )
        key = f"{task}/{modality}"
        if len(samples.get(key, [])) < n_samples:
            shown = ("[speech] " if modality == "speech" else "") + sources[0].text
            samples.setdefault(key, []).append((shown, outputs[0], expected[0]))
    return OrganismReport(pd.DataFrame(rows), samples)


def evaluate_organism(
    path: str | Path | None = None,
    n_per_language: int = 100,
    split: str = "test",
    batch_size: int = 64,
    languages: Sequence[str] | None = None,
    seed: int = 0,
) -> OrganismReport:
    """Load an organism directory with the plain transformers classes and evaluate it.

    Args:
        path: model directory; default the shipped organism.
        n_per_language: held-out sentences per language.
        split: ``test`` (default) or ``dev``; ``train`` measures memorisation.
        batch_size: generation batch size.
        languages: subset of the organism languages; English is always added (pivot).
        seed: corpus seed of the evaluation sentences.
    """
    from crossmodal.organism import organism_path

    directory = Path(path) if path is not None else organism_path()
    langs = check_languages(languages)
    langs = langs if "eng" in langs else ("eng", *langs)
    model = SeamlessM4Tv2Model.from_pretrained(directory).eval()
    processor = SeamlessM4TProcessor.from_pretrained(directory)
    records = organism_corpus(split, langs, n_per_language, seed)
    return evaluate_model(model, processor, records, batch_size=batch_size)
