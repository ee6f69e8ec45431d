"""Steering figures and a Markdown summary from a steer run's ``summary.parquet``.

The figure behind the steering finding (docs/method.md, finding 3): the share of outputs
whose top language is the forced language L, against the identification step, per role
(rows) and unit-source modality (columns), one colour per language. Solid with error bars:
the selected set, with the 95% Wilson score interval of the share (a binomial proportion
over the cell's inputs, :func:`scipy.stats.binomtest`); dashed with a band: the random-unit
controls of the same size (mean and min-max over seeds); dotted: the unforced baseline's
share of L. Every panel has its legend; steps are integer ticks. One figure per (input
modality, set kind, scope, k, forcing), in the format asked for (PNG, PDF or SVG).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.stats import binomtest

from crossmodal.store.location import read_parquet, upath

ROLES = ("representation", "control")
MODALITIES = ("speech", "text")
_PANEL = ("input_modality", "set_kind", "scope", "k", "forcing")
CONFIDENCE = 0.95
"""Confidence level of the selected share's interval."""


def share_interval(share: float, n: int, level: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a share of ``n`` outputs (NaN without outputs)."""
    if not n or not np.isfinite(share):
        return (np.nan, np.nan)
    ci = binomtest(int(round(share * n)), int(n)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def load_run(output: str | Path) -> tuple[pd.DataFrame, dict]:
    """``summary.parquet`` and ``grid.json`` of a steer output directory."""
    out = upath(output)  # a local path or an s3:// URL (store/location.py)
    summary, grid = out / "summary.parquet", out / "grid.json"
    if not summary.is_file() or not grid.is_file():
        raise ValueError(
            f"output must be a finished steer directory (summary.parquet, grid.json), got "
            f"{str(out)!r}; run `crossmodal steer CONFIG` first"
        )
    return read_parquet(summary), json.loads(grid.read_text())


def _random_curve(random: pd.DataFrame, sel: pd.Series, share: str) -> tuple[float, float, float]:
    """Mean, min and max over seeds of the random controls matching a selected cell."""
    keys = (
        "input_modality",
        "role",
        "unit_modality",
        "step",
        "language",
        "scope",
        "forcing",
        "n_units",
    )
    match = random
    for key in keys:
        match = match[match[key] == sel[key]]
    vals = match[share].to_numpy(dtype=float)
    if vals.size == 0:
        return (np.nan, np.nan, np.nan)
    return float(vals.mean()), float(vals.min()), float(vals.max())


def share_table(summary: pd.DataFrame, backend: str) -> pd.DataFrame:
    """Selected vs random vs baseline share of L, one row per selected cell."""
    share = f"lid_{backend}_target_share"
    selected = summary[summary["kind"] == "selected"]
    random = summary[summary["kind"] == "random"]
    baseline = summary[summary["kind"] == "baseline"].set_index("input_modality")
    rows = []
    for _, sel in selected.iterrows():
        mean, lo, hi = _random_curve(random, sel, share)
        base_col = f"lid_{backend}_share_{sel['language']}"
        base = (
            baseline[base_col].get(sel["input_modality"], np.nan)
            if base_col in baseline
            else np.nan
        )
        keys = (*_PANEL, "role", "unit_modality", "step", "language")
        lo_ci, hi_ci = share_interval(float(sel[share]), int(sel["n_inputs"]))
        rows.append(
            {
                **{k: sel[k] for k in keys},
                "n_inputs": int(sel["n_inputs"]),
                "selected": sel[share],
                "selected_lo": lo_ci,
                "selected_hi": hi_ci,
                "random_mean": mean,
                "random_min": lo,
                "random_max": hi,
                "baseline": base,
            }
        )
    return pd.DataFrame(rows)


def _panel(ax: Axes, table: pd.DataFrame, languages: Sequence[str]) -> None:
    """One role x unit-modality panel, with its own legend (languages, then line styles)."""
    colours = matplotlib.colormaps["tab10"]
    handles = []
    for i, lang in enumerate(languages):
        t = table[table["language"] == lang].sort_values("step")
        if t.empty:
            continue
        c = colours(i % 10)
        steps = t["step"].to_numpy(dtype=int)
        sel = t["selected"].to_numpy(dtype=float)
        err = np.abs(np.vstack([sel - t["selected_lo"], t["selected_hi"] - sel]).astype(float))
        ax.errorbar(steps, sel, yerr=err, fmt="-o", color=c, capsize=3)
        ax.plot(steps, t["random_mean"], "--", color=c, alpha=0.8)
        ax.fill_between(steps, t["random_min"], t["random_max"], color=c, alpha=0.12)
        ax.axhline(float(t["baseline"].mean()), color=c, linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color=c, marker="o", label=lang))
    grey = "0.3"
    handles += [
        Line2D([], [], color=grey, marker="o", label=f"selected ({CONFIDENCE:.0%} Wilson CI)"),
        Line2D([], [], color=grey, ls="--", label="random: mean, band min-max"),
        Line2D([], [], color=grey, ls=":", label="unforced baseline"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_ylim(-0.02, 1.02)
    steps = sorted({int(x) for x in table["step"]})
    ax.set_xticks(steps, [str(x) for x in steps])
    ax.set_xlabel("identification step")


def steering_panels(
    table: pd.DataFrame, backend: str, languages: Sequence[str]
) -> dict[str, Figure]:
    """One Figure per (input modality, set kind, scope, k, forcing), by file stem (through
    ``matplotlib.figure.Figure``, never pyplot: no global figure registry)."""
    figs = {}
    for key, panel in table.groupby(list(_PANEL), sort=True):
        roles = [r for r in ROLES if r in set(panel["role"])]
        mods = [m for m in MODALITIES if m in set(panel["unit_modality"])]
        size = (4.4 * len(mods), 3.4 * len(roles) + 0.6)
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(len(roles), len(mods), squeeze=False, sharey=True)
        for r, role in enumerate(roles):
            for m, mod in enumerate(mods):
                ax = axes[r][m]
                rows = panel[(panel["role"] == role) & (panel["unit_modality"] == mod)]
                _panel(ax, rows, languages)
                ax.set_title(f"{role} units from {mod}")
                if m == 0:
                    ax.set_ylabel(f"share of outputs in L ({backend})")
        inp, kind, scope, k, forcing = key
        k = int(k)
        fig.suptitle(f"{inp} input, {kind}-{k} {scope} units forced to {forcing}")
        figs[f"steer_{inp}_{kind}{k}_{scope}_{forcing}"] = fig
    return figs


def steering_figures(
    output: str | Path,
    figures: str | Path | None = None,
    *,
    fmt: str = "png",
    dpi: int = 110,
) -> list[Path]:
    """Write the target-share figures and ``steering.md``; returns the files written.

    Args:
        output: the steer output directory (``summary.parquet``, ``grid.json``).
        figures: where to write (default: ``<output>/figures``).
        fmt: figure format (png, pdf or svg); dpi: raster resolution.
    """
    from crossmodal.report.selection import check_format, figure_links

    check_format(fmt, dpi)
    summary, grid = load_run(output)
    cfg = grid["config"]
    backend, languages = cfg["lid"]["backends"][0], cfg["languages"]
    table = share_table(summary, backend)
    dest = Path(figures) if figures is not None else Path(output) / "figures"
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in steering_panels(table, backend, languages).items():
        path = dest / f"{name}.{fmt}"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    md = dest / "steering.md"
    md.write_text(_markdown(table, backend) + "\n" + figure_links(written, dest))
    return [*written, md]


def _markdown(table: pd.DataFrame, backend: str) -> str:
    """Mean share of L per role, unit modality, input modality and step."""
    cols = ["role", "unit_modality", "input_modality", "step"]
    agg = table.groupby(cols)[["selected", "random_mean", "baseline"]].mean().reset_index()
    lines = [
        "# Steering: share of outputs in the forced language L",
        "",
        f"LID backend: {backend}. Mean over languages; random = mean over seeds.",
        "",
        "| role | units from | input | step | selected | random | baseline |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in agg.iterrows():
        lines.append(
            f"| {r['role']} | {r['unit_modality']} | {r['input_modality']} | {int(r['step'])} "
            f"| {r['selected']:.3f} | {r['random_mean']:.3f} | {r['baseline']:.3f} |"
        )
    return "\n".join(lines) + "\n"
