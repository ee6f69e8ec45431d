"""bf16 capture against fp32 on the organism: how far the selected unit sets move.

GPUs run bf16 by default; the organism on CPU runs fp32. Here the same examples are captured
in both dtypes (the shipped organism; x2en, text and speech; five source languages), folded
into statistics with edges from each run's own pilot, as collect does, and turned into AP per
(language, unit) by the reducer's finalizer. The top-k sets per language (k = 50, the
demo's order of magnitude for 4,704 units) are compared: the numbers are recorded in
docs/benchmarks.md, "bf16 capture vs fp32"; the assertions are the floor measured there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossmodal.model.capture import Capturer
from crossmodal.model.inputs import make_batch
from crossmodal.model.load import load_model
from crossmodal.stats.finalize import selectivity_from_stats
from crossmodal.stats.running import UnitStats, choose_edges

SOURCES = ("deu", "spa", "fra", "jpn", "cmn")
N_PER_LANGUAGE = 24
STEP, POOLING, K = 6, "prefix_mean", 50


def selectivity(dtype: str, modality: str) -> dict[str, np.ndarray]:
    """AP per unit of each source language against the others, x2en at :data:`STEP`."""
    from crossmodal.organism import organism_corpus

    loaded = load_model("organism", device="cpu", dtype=dtype)
    cap = Capturer(loaded, "decoder", (STEP,), (POOLING,), max_new_tokens=STEP + 1)
    values = {}
    for lang in SOURCES:
        records = organism_corpus("test", [lang], n_sentences=N_PER_LANGUAGE)
        res = cap.run(make_batch(records, modality, loaded), "eng")
        values[lang] = res.values[(POOLING, STEP)].float()
    edges = choose_edges(torch.cat([v[: N_PER_LANGUAGE // 2] for v in values.values()]), 64)
    stats = {}
    for lang, v in values.items():
        stats[lang] = UnitStats.empty(edges)
        stats[lang].update(v)
    return {lang: s.ap.numpy() for lang, s in selectivity_from_stats(stats).items()}


def top_k(ap: np.ndarray, k: int = K) -> set[int]:
    return set(np.argsort(-ap, kind="stable")[:k].tolist())


def compare(modality: str) -> dict[str, float]:
    """Per-language mean top-k overlap (|A & B| / k), worst language, largest |AP difference|."""
    a, b = selectivity("float32", modality), selectivity("bfloat16", modality)
    overlap = {lang: len(top_k(a[lang]) & top_k(b[lang])) / K for lang in SOURCES}
    return {
        "mean_overlap": float(np.mean(list(overlap.values()))),
        "min_overlap": min(overlap.values()),
        "max_abs_ap_diff": max(float(np.abs(a[x] - b[x]).max()) for x in SOURCES),
        "mean_abs_ap_diff": float(np.mean([np.abs(a[x] - b[x]).mean() for x in SOURCES])),
    }


@pytest.mark.integration
@pytest.mark.parametrize("modality", ["text", "speech"])
def test_bf16_top_sets_stay_close_to_fp32(modality):
    got = compare(modality)
    assert got["min_overlap"] >= 0.9, got
    assert got["mean_abs_ap_diff"] <= 0.005, got


if __name__ == "__main__":  # the measurement of docs/benchmarks.md
    for m in ("text", "speech"):
        print(m, compare(m))
