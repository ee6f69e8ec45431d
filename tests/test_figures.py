"""Figures fit for a paper, checked on the Axes before saving and on the files written.

Properties: no heatmap row or column without a value (en2x has no English set), integer
ticks on every step and layer axis, a legend on every panel that draws lines, the steering
share's confidence interval equal to the Wilson score interval computed by hand, every
figure in the format asked for and linked from summary.md with each steering run's summary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_concentration as concentration
from helpers import synthetic_selectivity
from matplotlib.figure import Figure
from scipy.stats import norm

from crossmodal.report.selection import build_figures, write_report
from crossmodal.report.steering import share_table, steering_panels

LANGS = ["deu", "jpn"]


def assert_paper_ready(fig: Figure, name: str) -> None:
    """Every data panel: a legend where lines are drawn, integer step/layer ticks, and no
    image row or column that is all missing."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        if ax.get_lines():
            assert ax.get_legend() is not None, (name, ax.get_title())
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if re.search(r"\b(step|layer)\b", label):
                texts = [t.get_text() for t in axis.get_ticklabels()]
                assert texts and all(re.fullmatch(r"-?\d+", t) for t in texts), (name, texts)
        for image in ax.get_images():
            mask = np.ma.getmaskarray(image.get_array())
            assert not mask.all(axis=1).any() and not mask.all(axis=0).any(), name


def test_selection_figures_are_paper_ready() -> None:
    ds = synthetic_selectivity(seed=11)
    figs = build_figures(ds, k=10, concentration=concentration(ds))
    assert {"diagonal_vs_step", "layer_counts_en2x", "overlap_en2x_top"} <= set(figs)
    for name, fig in figs.items():
        assert_paper_ready(fig, name)
    ax = figs["overlap_en2x_top"].axes[0]  # en2x has no English: no eng row or column
    assert "eng" not in [t.get_text() for t in ax.get_xticklabels()]
    assert "eng" not in [t.get_text() for t in ax.get_yticklabels()]
    assert [t.get_text() for t in figs["layer_counts_x2en"].axes[0].get_xticklabels()] == [
        "-1",
        "0",
        "1",
        "2",
        "3",
    ]


def _summary(n_inputs: int = 25) -> pd.DataFrame:
    """A steering summary: selected cells at steps 1 and 6, two seeds of random controls,
    one baseline per input modality."""
    rng = np.random.default_rng(3)
    rows = []
    base = dict(input_modality="text", set_kind="top", scope="all", k=4, forcing="on_p50")
    for role in ("representation", "control"):
        for mod in ("speech", "text"):
            for step in (1, 6):
                for lang in LANGS:
                    cell = dict(base, role=role, unit_modality=mod, step=step, language=lang)
                    share = rng.integers(0, n_inputs + 1) / n_inputs
                    rows.append(dict(cell, kind="selected", n_units=4, lid_x_target_share=share))
                    for seed in (0, 1):
                        rows.append(
                            dict(cell, kind="random", set_kind="random", n_units=4, seed=seed)
                            | {"lid_x_target_share": rng.random() / 3}
                        )
    rows.append(
        dict(kind="baseline", input_modality="text", lid_x_share_deu=0.1, lid_x_share_jpn=0.0)
    )
    frame = pd.DataFrame(rows)
    frame["n_inputs"] = n_inputs
    return frame


def wilson(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval, by its formula."""
    z = norm.ppf(0.5 + level / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_steering_share_has_a_wilson_interval_and_every_panel_a_legend() -> None:
    table = share_table(_summary(), "x")
    for _, row in table.iterrows():
        lo, hi = wilson(round(row["selected"] * 25), 25)
        assert row["selected_lo"] == pytest.approx(lo, abs=1e-9)
        assert row["selected_hi"] == pytest.approx(hi, abs=1e-9)
        assert row["selected_lo"] <= row["selected"] <= row["selected_hi"]
    figs = steering_panels(table, "x", LANGS)
    assert list(figs) == ["steer_text_top4_all_on_p50"]
    fig = figs["steer_text_top4_all_on_p50"]
    assert len(fig.axes) == 4  # 2 roles x 2 unit modalities, none empty
    for ax in fig.axes:
        assert ax.get_legend() is not None
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert LANGS[0] in labels and any("Wilson" in t for t in labels)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "6"]
        assert ax.containers, "the selected share has error bars"
    assert_paper_ready(fig, "steering")


@pytest.mark.integration
def test_report_writes_the_chosen_format_and_links_every_figure(tmp_path) -> None:
    """PDF (SVG: the store report below); rendering every figure takes seconds."""
    fmt = "pdf"
    ds = synthetic_selectivity(seed=11)
    paths = write_report(ds, tmp_path, k=10, fmt=fmt, dpi=30)
    figures = [p for p in paths if p.suffix != ".md"]
    assert figures and all(p.suffix == f".{fmt}" and p.stat().st_size > 0 for p in figures)
    head = figures[0].read_bytes()[:64]
    assert head.startswith(b"%PDF") if fmt == "pdf" else b"<svg" in figures[0].read_bytes()
    summary = (tmp_path / "summary.md").read_text()
    for p in figures:
        assert f"]({p.name})" in summary
    with pytest.raises(ValueError, match="format must be one of \\['png', 'pdf', 'svg'\\]"):
        write_report(ds, tmp_path, k=10, fmt="jpg")


@pytest.mark.integration
def test_store_report_links_steering_runs(tmp_path) -> None:
    """A reduced store with a linked steering run: `crossmodal report --format svg --dpi`
    writes every figure as SVG and summary.md links each one and the run's steering.md."""
    from click.testing import CliRunner
    from helpers import LocalSession, build_model_dir, collect_config, local_collect

    from crossmodal.cli import main
    from crossmodal.reduce import driver
    from crossmodal.steer.driver import link_run
    from crossmodal.steer.grid import load_grid

    model = build_model_dir(tmp_path / "model")
    raw = collect_config(
        model, tmp_path / "s.zarr", modalities=["speech", "text"], families=["decoder"]
    )
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
        mp.setattr(driver, "RaySession", LocalSession)
        driver.run_reduce(raw["output"], k=2, scopes=("all",), progress=False, echo=print)
    run = tmp_path / "steer"
    run.mkdir()
    _summary().to_parquet(run / "summary.parquet")
    grid = {"config": {"lid": {"backends": ["x"]}, "languages": LANGS}, "cells": []}
    (run / "grid.json").write_text(json.dumps(grid))
    config = load_grid({"selectivity": {"path": raw["output"]}, "output": str(run)})
    assert link_run(config, run, echo=print)
    out = tmp_path / "report"
    args = ["report", raw["output"], "--out", str(out), "--format", "svg", "--dpi", "40"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    figures = sorted(p for p in out.rglob("*") if p.suffix in (".png", ".pdf", ".svg"))
    assert figures and {p.suffix for p in figures} == {".svg"}
    summary = (out / "summary.md").read_text()
    for p in figures:
        assert f"]({p.relative_to(out).as_posix()})" in summary, p
    assert "](steering/steer/steering.md)" in summary
    assert Path(out / "steering" / "steer" / "steering.md").is_file()


def test_concentration_lines_have_a_confidence_band() -> None:
    """Given std and count, each mean-Gini line gets a 95% band whose half-width is
    1.96 * sqrt(sum over languages of std^2 / count) / n_languages."""
    import xarray as xr

    from crossmodal.report.selection import gini_band

    ds = synthetic_selectivity(seed=11)
    mean = concentration(ds)
    rng = np.random.default_rng(1)
    gini = xr.Dataset(
        {
            "mean": mean,
            "std": mean.copy(data=rng.random(mean.shape) / 5),
            "count": mean.copy(data=rng.integers(2, 40, mean.shape).astype(float)),
        }
    )
    avg, half = gini_band(gini)
    at = {"task": "x2en", "modality": "text", "step": 6, "layer": 2}
    sub = gini.sel(at)
    want = norm.ppf(0.975) * np.sqrt((sub["std"] ** 2 / sub["count"]).sum()) / 3
    assert float(half.sel(at)) == pytest.approx(float(want))
    assert float(avg.sel(at)) == pytest.approx(float(sub["mean"].mean()))
    fig = build_figures(ds, k=10, concentration=gini)["concentration"]
    assert_paper_ready(fig, "concentration")
    ax = fig.axes[0]
    assert len(ax.collections) == len(ax.get_lines())  # one band per line
    assert all("95% CI" in t.get_text() for t in ax.get_legend().get_texts())
