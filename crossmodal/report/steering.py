"""Steering figures and a Markdown summary from a steer run's ``summary.parquet``.

The figure behind the steering finding (docs/method.md, finding 3): the share of outputs
whose top language is the forced language L, against the identification step, per role
(rows) and unit-source modality (columns), one colour per language. Solid: the selected
set; dashed with a band: the random-unit controls of the same size (mean and min-max over
seeds); dotted: the unforced baseline's share of L. One PNG per (input modality, set kind,
scope, k, forcing).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROLES = ("representation", "control")
MODALITIES = ("speech", "text")
_PANEL = ("input_modality", "set_kind", "scope", "k", "forcing")


def load_run(output: str | Path) -> tuple[pd.DataFrame, dict]:
    """``summary.parquet`` and ``grid.json`` of a steer output directory."""
    out = Path(output)
    summary, grid = out / "summary.parquet", out / "grid.json"
    if not summary.is_file() or not grid.is_file():
        raise ValueError(
            f"output must be a finished steer directory (summary.parquet, grid.json), got "
            f"{str(out)!r}; run `crossmodal steer CONFIG` first"
        )
    return pd.read_parquet(summary), json.loads(grid.read_text())


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
        rows.append(
            {
                **{k: sel[k] for k in keys},
                "selected": sel[share],
                "random_mean": mean,
                "random_min": lo,
                "random_max": hi,
                "baseline": base,
            }
        )
    return pd.DataFrame(rows)


def _panel(ax: plt.Axes, table: pd.DataFrame, languages: Sequence[str]) -> None:
    colours = plt.get_cmap("tab10")
    for i, lang in enumerate(languages):
        t = table[table["language"] == lang].sort_values("step")
        if t.empty:
            continue
        c = colours(i % 10)
        ax.plot(t["step"], t["selected"], "-o", color=c, label=lang)
        ax.plot(t["step"], t["random_mean"], "--", color=c, alpha=0.8)
        ax.fill_between(t["step"], t["random_min"], t["random_max"], color=c, alpha=0.12)
        ax.axhline(float(t["baseline"].mean()), color=c, linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(sorted(set(table["step"].astype(int))))
    ax.set_xlabel("identification step")


def steering_figures(output: str | Path, figures: str | Path | None = None) -> list[Path]:
    """Write the target-share figures and ``steering.md``; returns the files written.

    Args:
        output: the steer output directory (``summary.parquet``, ``grid.json``).
        figures: where to write (default: ``<output>/figures``).
    """
    summary, grid = load_run(output)
    cfg = grid["config"]
    backend, languages = cfg["lid"]["backends"][0], cfg["languages"]
    table = share_table(summary, backend)
    dest = Path(figures) if figures is not None else Path(output) / "figures"
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key, panel in table.groupby(list(_PANEL), sort=True):
        roles = [r for r in ROLES if r in set(panel["role"])]
        mods = [m for m in MODALITIES if m in set(panel["unit_modality"])]
        size = (4 * len(mods), 3.2 * len(roles))
        fig, axes = plt.subplots(len(roles), len(mods), figsize=size, squeeze=False, sharey=True)
        for r, role in enumerate(roles):
            for m, mod in enumerate(mods):
                ax = axes[r][m]
                _panel(
                    ax, panel[(panel["role"] == role) & (panel["unit_modality"] == mod)], languages
                )
                ax.set_title(f"{role} units from {mod}")
                if m == 0:
                    ax.set_ylabel(f"share of outputs in L ({backend})")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=len(labels) or 1,
            fontsize=8,
            title="L (solid: selected set, dashed + band: random controls, dotted: baseline)",
        )
        inp, kind, scope, k, forcing = key
        k = int(k)
        fig.suptitle(f"{inp} input, {kind}-{k} {scope} units forced to {forcing}")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        path = dest / f"steer_{inp}_{kind}{k}_{scope}_{forcing}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    md = dest / "steering.md"
    md.write_text(_markdown(table, backend))
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
