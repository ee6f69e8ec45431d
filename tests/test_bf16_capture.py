"""bf16 capture against fp32 on the organism: how far the selected unit sets move.

GPUs run bf16 by default; the organism on CPU runs fp32. Here the same examples are captured
in both dtypes (the shipped organism; x2en, text and speech; five source languages) and the
sets are compared two ways (k = 50, the demo's order of magnitude for 4,704 units):

* binned: statistics with edges from each run's own pilot, as collect does, turned into AP
  per (language, unit) by the reducer's finalizer; top-k by that AP;
* certified: exact AP of every unit (sklearn's definition, :func:`exact_ap`) and the sets
  the reduce job's exact selection returns from it (top-k and bottom-k, ties by the smaller
  unit id: :func:`crossmodal.reduce.selection.select_sets`).

The numbers are recorded in docs/benchmarks.md, "bf16 capture vs fp32"; the assertions are
the floors measured there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from crossmodal.model.capture import Capturer
from crossmodal.model.inputs import make_batch
from crossmodal.model.load import load_model
from crossmodal.reduce.selection import select_sets
from crossmodal.stats.finalize import exact_ap, selectivity_from_stats
from crossmodal.stats.running import UnitStats, choose_edges

SOURCES = ("deu", "spa", "fra", "jpn", "cmn")
N_PER_LANGUAGE = 24
STEP, POOLING, K = 6, "prefix_mean", 50


def captured(dtype: str, modality: str) -> dict[str, torch.Tensor]:
    """Values ``[example, unit]`` (float32) per source language, x2en at :data:`STEP`."""
    from crossmodal.organism import organism_corpus

    loaded = load_model("organism", device="cpu", dtype=dtype)
    cap = Capturer(loaded, "decoder", (STEP,), (POOLING,), max_new_tokens=STEP + 1)
    values = {}
    for lang in SOURCES:
        records = organism_corpus("test", [lang], n_sentences=N_PER_LANGUAGE)
        res = cap.run(make_batch(records, modality, loaded), "eng")
        values[lang] = res.values[(POOLING, STEP)].float()
    return values


def binned_ap(values: dict[str, torch.Tensor]) -> np.ndarray:
    """AP ``[language, unit]`` from 64-bin statistics, edges from half of each language."""
    edges = choose_edges(torch.cat([v[: N_PER_LANGUAGE // 2] for v in values.values()]), 64)
    stats = {}
    for lang, v in values.items():
        stats[lang] = UnitStats.empty(edges)
        stats[lang].update(v)
    ap = selectivity_from_stats(stats)
    return np.stack([ap[lang].ap.numpy() for lang in SOURCES])


def certified_ap(values: dict[str, torch.Tensor]) -> np.ndarray:
    """Exact AP ``[language, unit]``: each language against the other four."""
    lang = torch.cat([torch.full((values[x].shape[0],), i) for i, x in enumerate(SOURCES)])
    onehot = lang[:, None] == torch.arange(len(SOURCES))[None, :]
    return exact_ap(torch.cat([values[x] for x in SOURCES]), onehot).numpy()


def sets(ap: np.ndarray) -> dict[tuple[str, str], set[int]]:
    """Top-k and bottom-k per language, as the reduce job selects them."""
    da = xr.DataArray(ap, dims=("language", "unit"), coords={"language": list(SOURCES)})
    chosen = select_sets(da, k=K)
    return {
        (lang, kind): {int(u) for u in chosen.sel(language=lang, kind=kind).values if u >= 0}
        for lang in SOURCES
        for kind in ("top", "bottom")
    }


def overlaps(a: np.ndarray, b: np.ndarray, kinds: tuple[str, ...]) -> dict[str, float]:
    """Mean and worst |A & B| / k over languages (and ``kinds``), mean and largest |AP diff|."""
    sa, sb = sets(a), sets(b)
    got = [len(sa[key] & sb[key]) / K for key in sa if key[1] in kinds]
    return {
        "mean_overlap": float(np.mean(got)),
        "min_overlap": float(min(got)),
        "mean_abs_ap_diff": float(np.nanmean(np.abs(a - b))),
        "max_abs_ap_diff": float(np.nanmax(np.abs(a - b))),
    }


def compare(modality: str) -> dict[str, dict[str, float]]:
    """fp32 against bf16: binned top-k sets, and certified top-k and bottom-k sets."""
    a, b = captured("float32", modality), captured("bfloat16", modality)
    return {
        "binned_top": overlaps(binned_ap(a), binned_ap(b), ("top",)),
        "certified": overlaps(certified_ap(a), certified_ap(b), ("top", "bottom")),
    }


@pytest.mark.integration
@pytest.mark.parametrize("modality", ["text", "speech"])
def test_bf16_sets_stay_close_to_fp32(modality):
    got = compare(modality)
    assert got["binned_top"]["min_overlap"] >= 0.9, got
    assert got["binned_top"]["mean_abs_ap_diff"] <= 0.005, got
    assert got["certified"]["min_overlap"] >= 0.9, got
    assert got["certified"]["mean_abs_ap_diff"] <= 0.005, got


def test_certified_ap_is_sklearns():
    """The certified AP above is sklearn's, language by language (a small random case)."""
    from sklearn.metrics import average_precision_score

    gen = torch.Generator().manual_seed(0)
    values = {x: torch.randn(6, 7, generator=gen) for x in SOURCES}
    got = certified_ap(values)
    stacked = torch.cat([values[x] for x in SOURCES]).numpy()
    for i in range(len(SOURCES)):
        y = np.repeat(np.arange(len(SOURCES)) == i, 6)
        want = [average_precision_score(y, stacked[:, u]) for u in range(7)]
        np.testing.assert_allclose(got[i], want, rtol=1e-12)


if __name__ == "__main__":  # the measurement of docs/benchmarks.md
    for m in ("text", "speech"):
        print(m, compare(m))
