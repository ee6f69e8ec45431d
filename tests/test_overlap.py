"""Overlap counts, baselines, Spearman and v1 measures against brute force and scipy/sklearn.

Tricky cases: missing conditions (en2x/eng, asr/text) give NaN, not 0; per-layer splits with
layers holding no selected unit; tied and constant AP vectors in Spearman; all-zero rows in
Gini; groups without units.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from helpers import synthetic_selectivity
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from crossmodal.reduce.overlap import (
    count_by,
    expected_overlap,
    modality_selectivity,
    overlap,
    overlap_p_value,
    spearman_matrix,
    spearman_rows,
)
from crossmodal.reduce.selection import select_sets, set_ids
from crossmodal.stats.concentration import gini, gini_by_group


def brute_p(x: int, n: int, a: int, b: int) -> float:
    """P(|A ∩ B| >= x) for a random b-subset B of n items, |A| = a, by counting."""
    total = math.comb(n, b)
    return sum(math.comb(a, i) * math.comb(n - a, b - i) for i in range(x, min(a, b) + 1)) / total


@pytest.mark.parametrize(
    ("x", "n", "a", "b"), [(0, 10, 3, 4), (2, 10, 3, 4), (3, 20, 5, 5), (5, 60, 8, 9)]
)
def test_hypergeometric_baseline(x: int, n: int, a: int, b: int) -> None:
    assert float(overlap_p_value(x, a, b, n)) == pytest.approx(brute_p(x, n, a, b), rel=1e-10)
    assert float(expected_overlap(a, b, n)) == pytest.approx(a * b / n)
    assert float(expected_overlap(1000, 1000, 491_520)) == pytest.approx(2.0345, abs=1e-4)
    assert np.isnan(overlap_p_value(np.nan, a, b, n))


@pytest.mark.parametrize("by_layer", [False, True])
def test_overlap_counts_match_brute_force(by_layer: bool) -> None:
    ds = synthetic_selectivity(seed=7)
    sets = select_sets(ds["ap"], k=15)
    res = overlap(sets, ds, by_layer=by_layer)
    layer_of = dict(zip(ds["unit"].values.tolist(), ds["layer"].values.tolist(), strict=True))
    groups = sorted(set(layer_of.values())) if by_layer else [None]
    langs = list(ds["language"].values)
    for kind in ("both",) if by_layer else ("top", "bottom", "both"):
        for step in (1,) if by_layer else (1, 11):
            cell = {"task": "x2en", "step": step, "kind": kind}
            for g in groups:
                sel = cell | ({"layer": g} if by_layer else {})
                universe = sum(1 for v in layer_of.values() if g is None or v == g)
                for lt in langs:
                    for ls in langs:
                        a = {
                            u
                            for u in set_ids(sets, **cell, modality="text", language=lt).tolist()
                            if g is None or layer_of[u] == g
                        }
                        b = {
                            u
                            for u in set_ids(sets, **cell, modality="speech", language=ls).tolist()
                            if g is None or layer_of[u] == g
                        }
                        at = sel | {"text_language": lt, "speech_language": ls}
                        assert float(res["count"].sel(at)) == len(a & b)
                        assert float(res["expected"].sel(at)) == pytest.approx(
                            len(a) * len(b) / universe
                        )
                        p = brute_p(len(a & b), universe, len(a), len(b))
                        assert float(res["p_value"].sel(at)) == pytest.approx(p, rel=1e-9)
                off = [
                    float(res["count"].sel(sel | {"text_language": lt, "speech_language": ls}))
                    for lt in langs
                    for ls in langs
                    if lt != ls
                ]
                assert float(res["offdiag_mean"].sel(sel)) == pytest.approx(np.mean(off))
                diag = res["diagonal"].sel(sel | {"language": "jpn"})
                assert float(diag) == float(
                    res["count"].sel(sel | {"text_language": "jpn", "speech_language": "jpn"})
                )
    if by_layer:
        assert res["n_universe"].sum() == ds.sizes["unit"]
    else:
        assert int(res["n_universe"]) == ds.sizes["unit"]
    # en2x has no eng condition: NaN, not a count of 0; asr has no text sets at all.
    assert np.isnan(res["count"].sel(task="en2x", text_language="eng")).all()
    assert np.isnan(res["count"].sel(task="asr")).all()
    # the synthetic data shares structure across modalities at step 1: diagonal beats chance
    d = res["diagonal"].sel(task="x2en", step=1, kind="top")
    e = res["diagonal_expected"].sel(task="x2en", step=1, kind="top")
    if not by_layer:
        assert (d > e).all()


def test_count_by_layer_matches_brute_force() -> None:
    ds = synthetic_selectivity(seed=1)
    sets = select_sets(ds["ap"], k=20)
    counts = count_by(sets, ds, "layer")
    where = {"task": "en2x", "modality": "speech", "step": 11, "language": "deu", "kind": "both"}
    layer_of = dict(zip(ds["unit"].values, ds["layer"].values, strict=True))
    brute = pd.Series([layer_of[u] for u in set_ids(sets, **where)]).value_counts()
    got = counts.sel(where)
    for lay in counts["layer"].values:
        assert int(got.sel(layer=lay)) == int(brute.get(lay, 0))
    assert int(got.sum()) == set_ids(sets, **where).size


def test_overlap_rejects_sets_outside_units() -> None:
    ds = synthetic_selectivity(seed=1)
    sets = select_sets(ds["ap"], k=5)
    with pytest.raises(ValueError, match="sets must be one of \\[ids inside the scope"):
        overlap(sets, ds.isel(unit=slice(0, 10)))


def test_spearman_rows_match_scipy_with_ties_and_missing_rows() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.random((4, 50)), 1)  # many ties
    b = np.round(a[[1, 0, 3, 2]] + rng.normal(0, 0.3, (4, 50)), 1)
    a[2] = np.nan  # a missing condition
    b[3] = 0.5  # a constant vector
    got = spearman_rows(a, b)
    for i in range(4):
        for j in range(4):
            if i == 2 or j == 3:
                assert np.isnan(got[i, j])
                continue
            assert got[i, j] == pytest.approx(spearmanr(a[i], b[j]).statistic, abs=1e-12)


@pytest.mark.parametrize("by", [None, "layer", "submodule"])
def test_spearman_matrix_matches_scipy(by: str | None) -> None:
    ds = synthetic_selectivity(seed=8)
    rho = spearman_matrix(ds["ap"], by=by)
    coord = None if by is None else ds[by].values
    values = [None] if by is None else list(np.unique(coord))
    for step in (1, 11):
        for v in values:
            keep = np.ones(ds.sizes["unit"], dtype=bool) if v is None else coord == v
            t = ds["ap"].sel(task="x2en", modality="text", step=step, language="deu").values[keep]
            s = ds["ap"].sel(task="x2en", modality="speech", step=step, language="jpn").values[keep]
            at = {"task": "x2en", "step": step, "text_language": "deu", "speech_language": "jpn"}
            if by is not None:
                at[by] = v
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = spearmanr(t, s).statistic
            assert float(rho.sel(at)) == pytest.approx(ref, abs=1e-12, nan_ok=True)
    assert np.isnan(rho.sel(task="asr")).all()
    assert np.isnan(rho.sel(task="en2x", text_language="eng")).all()


def test_gini_matches_mean_absolute_difference() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (6, 37))
    x[1, :30] = 0.0
    x[2] = 0.0
    x[3] = 4.2  # equal magnitudes
    g = gini(torch.from_numpy(x).to(torch.float32)).numpy()
    for row, got in zip(np.abs(x), g, strict=True):
        mad = np.abs(row[:, None] - row[None, :]).sum()
        n = row.size
        ref = mad / (2 * n * n * row.mean()) if row.sum() > 0 else 0.0
        assert got == pytest.approx(ref, abs=1e-6)
    one_hot = torch.zeros(1, 10)
    one_hot[0, 3] = -5.0
    assert float(gini(one_hot)) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"values.ndim must be one of \[2\]"):
        gini(torch.ones(3))


def test_gini_by_group() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(0, 1, (4, 30)))
    groups = torch.tensor([0] * 10 + [2] * 20)
    out = gini_by_group(x, groups, 3)
    torch.testing.assert_close(out[:, 0], gini(x[:, :10]))
    torch.testing.assert_close(out[:, 2], gini(x[:, 10:]))
    assert torch.isnan(out[:, 1]).all()


def test_modality_selectivity_uses_the_finalizer() -> None:
    rng = np.random.default_rng(3)
    n_units, langs = 8, ["deu", "jpn"]
    units = synthetic_selectivity(n_units=n_units).drop_dims(
        ["task", "modality", "step", "language"]
    )
    data = {
        (t, m, s, lang): rng.normal(1.0 if m == "speech" and u_shift else 0.0, 1, (12, n_units))
        for t in ("x2en",)
        for m in ("speech", "text")
        for s in (1, 6)
        for lang in langs
        for u_shift in [lang == "jpn"]
    }

    def exact_ap(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        v = np.vstack([pos, neg])
        return np.array([average_precision_score(y, v[:, u]) for u in range(v.shape[1])])

    res = modality_selectivity(
        lambda t, m, s, lang: data[(t, m, s, lang)],
        exact_ap,
        tasks=["x2en"],
        steps=[1, 6],
        languages=langs,
        units=units,
    )
    assert res["ap"].dims == ("task", "step", "language", "unit")
    ref = exact_ap(data[("x2en", "speech", 6, "jpn")], data[("x2en", "text", 6, "jpn")])
    np.testing.assert_allclose(res["ap"].sel(task="x2en", step=6, language="jpn"), ref)
    xr.testing.assert_equal(res["ap_lo"], res["ap"])
    assert res["site"].values.tolist() == units["site"].values.tolist()
    with pytest.raises(ValueError, match=r"ap_fn output shape must be one of \[\(8,\)\]"):
        modality_selectivity(
            lambda *_: np.zeros((3, 8)),
            lambda p, n: p[0, :3],
            tasks=["x2en"],
            steps=[1],
            languages=["deu"],
            units=units,
        )
