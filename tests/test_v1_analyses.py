"""The v1 analyses end to end: activation concentration and modality-selective units.

Store: the real collect driver with one in-process Collector (tests/test_verify.py helpers) on
a random tiny SeamlessM4T v2 and the organism corpus: x2en speech and text, eng/deu/jpn,
steps 1 and 3, both poolings, families decoder and ffn_act (so concentration uses ffn_act),
4 examples per language in shards of 2. Reference: every example's values captured again with
:class:`~crossmodal.model.capture.Capturer` (exact mode), Gini by the pairwise definition in numpy,
modality AP by sklearn / :func:`~crossmodal.stats.finalize.exact_ap`.

Edge cases: rows that ended before a step (not counted), a row with NaN (dropped, not merged),
unequal layer sizes (per-layer path), one part per condition vs two (merge = addition), a part
redone on resume, a store whose speech and text edges differ (modality pass skipped), x2en/eng
(no condition: NaN counts, not 0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import build_model_dir, collect_config, local_collect, synthetic_selectivity
from sklearn.metrics import average_precision_score

from crossmodal.reduce.exact import work_units
from crossmodal.reduce.labels import store_labels
from crossmodal.reduce.modality import modality_pass
from crossmodal.report.selection import NON_LATIN, write_report
from crossmodal.stats.concentration import GiniStats, LayerGini, concentration_family, mean_std
from crossmodal.stats.finalize import exact_ap
from crossmodal.store import results

LANGS = ["eng", "deu", "jpn"]


def np_gini(x: np.ndarray) -> float:
    """sum_ij |x_i - x_j| / (2 n^2 mean): the definition, O(n^2)."""
    a = np.abs(x.astype(np.float64))
    if a.sum() == 0:
        return 0.0
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size**2 * a.mean()))


def test_layer_gini_and_stats_against_numpy():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(9, 30, generator=g) * torch.rand(30, generator=g) * 5
    values[:, :10] = values[:, :10].clamp(min=0)
    values[4, 12] = float("nan")  # layer 1 of row 4: dropped there only
    unit_layer = np.repeat([0, 1, 2], 10)
    unit_layer[-3:] = -1  # outside the layers (final norm): left out
    got = LayerGini(unit_layer)(values).numpy()
    want = np.array(
        [[np_gini(r[unit_layer == layer]) for layer in range(3)] for r in values.numpy()]
    )
    assert np.isnan(got[4, 1]) and np.isnan(want[4, 1])
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)  # unequal layer sizes
    one, a, b = (GiniStats.empty(3) for _ in range(3))
    one.update(torch.from_numpy(got))
    a.update(torch.from_numpy(got[:5]))
    b.update(torch.from_numpy(got[5:]))
    merged = a.merge(b).to_numpy()
    for k, v in one.to_numpy().items():
        np.testing.assert_allclose(merged[k], v, rtol=1e-10)
    assert merged["count"].tolist() == [9, 8, 9] and merged["dropped"].tolist() == [0, 1, 0]
    mean, std = mean_std(merged["count"], merged["mean"], merged["m2"])
    ok = np.where(np.isfinite(want), want, np.nan)
    np.testing.assert_allclose(mean, np.nanmean(ok, 0), rtol=1e-12)
    np.testing.assert_allclose(std, np.nanstd(ok, 0, ddof=1), rtol=1e-9)
    assert concentration_family(["decoder", "ffn_act"]) == "ffn_act"
    assert concentration_family(["speech_encoder"]) is None
    with pytest.raises(ValueError, match=r"g.shape must be one of \[\(batch, 3\)\]"):
        one.update(torch.zeros(2, 4))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


def _raw(model_dir: Path, out: Path, **kw) -> dict:
    return collect_config(
        model_dir,
        out,
        modalities=["speech", "text"],
        tasks=["x2en"],
        languages=LANGS,
        batch_size=2,
        pilot_size=4,
        data={"source": "organism", "examples_per_language": 4},
        **kw,
    )


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v1") / "s.zarr"
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, _raw(model_dir, out))
    return out


@pytest.fixture(scope="module")
def reference(store):
    """Per (modality, language): ``{(pooling, step): [rows, unit]}`` per family, captured
    exactly as collect batches them (its work units, in order)."""
    from crossmodal.collect.config import from_dict
    from crossmodal.model.capture import Capturer
    from crossmodal.model.inputs import make_batch
    from crossmodal.model.load import load_model
    from crossmodal.organism import organism_corpus

    root = zarr.open_group(str(store), mode="r")
    cfg = from_dict(root.attrs["config"])
    loaded = load_model(cfg.model, device="cpu", dtype="float32")
    cap = Capturer(loaded, cfg.families, cfg.steps, cfg.poolings, cfg.max_new_tokens)
    n_dec = cap.index.counts("family")["decoder"]
    out: dict = {}
    for unit in work_units(root):
        c = unit.condition
        by_id = {
            r.id: r
            for r in organism_corpus(
                cfg.data.split, [c.source], 4, cfg.seed, audio=c.modality == "speech"
            )
        }
        recs = [by_id[i] for i in unit.example_ids if i in by_id]
        for start in range(0, len(recs), cfg.batch_size):
            res = cap.run(
                make_batch(recs[start : start + cfg.batch_size], c.modality, loaded),
                tgt_lang=c.target,
            )
            for key, v in res.values.items():
                out.setdefault((c.modality, c.language), {}).setdefault(key, []).append(v)
    return {k: {q: torch.cat(v).numpy() for q, v in d.items()} for k, d in out.items()}, n_dec


def test_concentration_matches_numpy_gini_per_example(store, reference):
    ref, n_dec = reference
    r = results.open(store)
    for pooling in ("prefix_mean", "last"):
        ds = r.concentration(pooling)
        assert ds.attrs["family"] == "ffn_act" and ds.attrs["n_units"] == [128, 128]
        assert ds["mean"].dims == ("task", "modality", "step", "language", "layer")
        for (mod, lang), by in ref.items():
            for step in (1, 3):
                ffn = by[(pooling, step)][:, n_dec:]  # ffn_act follows decoder in the index
                g = np.array(
                    [[np_gini(row[i * 128 : (i + 1) * 128]) for i in range(2)] for row in ffn]
                ).reshape(-1, 2)
                got = ds.sel(task="x2en", modality=mod, language=lang, step=step)
                assert got["count"].values.tolist() == [len(g)] * 2
                if len(g):
                    np.testing.assert_allclose(got["mean"].values, g.mean(0), rtol=1e-10)
                if len(g) > 1:
                    np.testing.assert_allclose(got["std"].values, g.std(0, ddof=1), rtol=1e-8)
    assert np.isnan(r.concentration()["mean"].sel(language="eng").values).all()  # x2en/eng
    raw = xr.open_zarr(store, group="concentration/ffn_act", consolidated=False)
    assert raw["m2"].dims == ("task", "modality", "language", "step", "pooling", "layer")
    assert list(raw["layer"].values) == [0, 1] and list(raw["pooling"].values) == [
        "prefix_mean",
        "last",
    ]
    parts = xr.open_zarr(store, group="concentration/ffn_act/parts", consolidated=False)
    assert parts["count"].dims == ("part", "step", "pooling", "layer")
    assert {"part_task", "part_language"} <= set(parts.coords)


def test_one_part_equals_two_and_resume_redoes_a_part(store, model_dir, tmp_path):
    """Merge-of-2-parts == 1 part (addition), and a half-written part is redone on resume."""
    one = tmp_path / "one.zarr"
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, _raw(model_dir, one, shard_size=8))
    a = xr.open_zarr(store, group="concentration/ffn_act", consolidated=False).load()
    b = xr.open_zarr(one, group="concentration/ffn_act", consolidated=False).load()
    for k in ("count", "dropped"):
        np.testing.assert_array_equal(a[k].values, b[k].values)
    for k in ("mean", "m2"):  # Chan merge: equal up to rounding
        np.testing.assert_allclose(a[k].values, b[k].values, rtol=1e-10)
    # The driver died after part p's collector half-wrote it: p redone, condition re-merged.
    again = Path(shutil.copytree(store, tmp_path / "again.zarr"))
    root = zarr.open_group(str(again), mode="r+")
    p = next(w for w in work_units(root) if w.key == "x2en/speech/deu/1")
    parts = dict(root["manifest"].attrs["parts"])
    del parts[str(p.index)]
    root["manifest"].attrs["parts"] = parts
    root["manifest"].attrs["merged"] = [
        k for k in root["manifest"].attrs["merged"] if k != "x2en/speech/deu"
    ]
    root["concentration/ffn_act/parts/mean"][p.index] = 99.0
    root["concentration/ffn_act/mean"][0, 0, 1] = 0.0
    raw = _raw(model_dir, again)
    with pytest.MonkeyPatch.context() as mp:
        assert local_collect(mp, raw)["ran"] == 1
    c = xr.open_zarr(again, group="concentration/ffn_act", consolidated=False).load()
    xr.testing.assert_allclose(c, a, rtol=1e-12)


def test_modality_ap_brackets_exact_and_counts(store, reference, tmp_path):
    ref, n_dec = reference
    root = zarr.open_group(str(store), mode="r+")
    for family in ("decoder", "ffn_act"):  # one edge set per (task, step, pooling)
        e = root[f"edges/{family}/edges"]
        np.testing.assert_array_equal(e[0, 0], e[0, 1])
    summary = modality_pass(root, str(store), "decoder", store_labels(root, "decoder"), 20)
    assert summary == {"tasks": ["x2en"], "k": 20, "note": ""}
    r = results.open(store)
    for pooling in ("prefix_mean", "last"):
        mod = r.modality(pooling=pooling).load()
        assert mod["ap"].dims == ("task", "step", "language", "unit")
        for lang in ("deu", "jpn"):
            for step in (1, 3):
                s = ref[("speech", lang)][(pooling, step)][:, :n_dec]
                t = ref[("text", lang)][(pooling, step)][:, :n_dec]
                y = np.r_[np.ones(len(s)), np.zeros(len(t))]
                exact = exact_ap(torch.from_numpy(np.r_[s, t]), torch.from_numpy(y > 0)).numpy()
                got = mod.sel(task="x2en", step=step, language=lang)
                lo, hi = got["ap_lo"].values, got["ap_hi"].values
                assert (lo <= exact + 1e-12).all() and (exact <= hi + 1e-12).all()
                for u in (0, 330, 1800):  # exact_ap is sklearn's
                    sk = average_precision_score(y, np.r_[s[:, u], t[:, u]])
                    assert exact[u] == pytest.approx(sk, abs=1e-12)
                assert int(got["n_speech"]) == len(s) and int(got["n_text"]) == len(t)
        top = mod["units"].sel(task="x2en", step=1, language="deu", kind="top").values
        units = r.units()
        want = units.loc[top[top >= 0], "submodule"].value_counts()
        by_sub = mod["by_submodule"].sel(task="x2en", step=1, language="deu", kind="top")
        for sub, n in want.items():
            assert int(by_sub.sel(submodules=sub)) == n
        assert int(by_sub.sum()) == 20
        assert np.isnan(mod["by_site"].sel(language="eng")).all()  # x2en/eng: no condition
    # A store collected with per-modality edges: skipped, with a note.
    old = Path(shutil.copytree(store, tmp_path / "old.zarr"))
    root = zarr.open_group(str(old), mode="r+")
    root["edges/decoder/edges"][0, 1] = root["edges/decoder/edges"][0, 1] + 1.0
    assert modality_pass(root, str(old), "decoder", store_labels(root, "decoder"), 20) == {
        "tasks": [],
        "note": "skipped: edges not shared by modalities",
    }


def test_report_shows_concentration_and_modality(store, tmp_path):
    r = results.open(store)
    zroot = zarr.open_group(str(store), mode="r+")
    if "modality" not in zroot:
        modality_pass(zroot, str(store), "decoder", store_labels(zroot, "decoder"), 20)
    conc = r.concentration()["mean"]
    paths = write_report(
        synthetic_selectivity(seed=3),
        tmp_path,
        k=10,
        concentration=conc,
        modality=r.modality(),
        dpi=30,
    )
    assert tmp_path / "concentration.png" in paths
    text = (tmp_path / "summary.md").read_text()
    assert "## Activation concentration: speech vs text, Latin vs non-Latin script" in text
    assert "### Modality-selective units by submodule x2en" in text
    assert "### Modality-selective units by site_kind x2en" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| x2en step 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    per_lang = conc.sel(task="x2en", step=1).mean("layer")
    assert float(cells[1]) == pytest.approx(float(per_lang.sel(modality="speech").mean()), abs=1e-4)
    non = per_lang.sel(language=[x for x in LANGS if x in NON_LATIN]).mean()
    assert float(cells[5]) == pytest.approx(float(non), abs=1e-4)
