"""The report's fidelity pages: exemplars of the strongest units, set stability, Spearman source.

``exemplars.md``: for every condition, the first unit of its top set and of its bottom set
(the strongest by exact AP), each with the examples of its highest and lowest values.
``stability.md``: per condition, how many of the top/bottom-k units two disjoint halves of
the examples both select, beside chance (k*k/N). ``summary.md`` gets a short section linking
both, with the stability table and how exact the Spearman analyses are.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

if TYPE_CHECKING:
    from crossmodal.store.results import Results

_TEXT_CHARS = 60


def _cell(text: object) -> str:
    """One Markdown table cell: one line, no pipes, at most :data:`_TEXT_CHARS` characters."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= _TEXT_CHARS else s[: _TEXT_CHARS - 1] + "…"


def _unit_block(
    ex: pd.DataFrame, units: pd.DataFrame, unit: int, ap: float, side: str
) -> list[str]:
    """One unit's heading and exemplar table."""
    name = f"{units.loc[unit, 'site']}:{units.loc[unit, 'feature']}" if unit in units.index else ""
    rows = ex[ex["unit"] == unit].sort_values(["side", "rank"], ascending=[False, True])
    out = [
        f"{side} unit {unit} ({name}, exact AP {ap:.3f})",
        "",
        "| side | rank | value | language | example | input | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        cells = [r.side, r.rank, f"{r.value:.4g}", r.language, r.example_id, r.input, r.output]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*out, ""]


def exemplars_md(res: Results, family: str, pooling: str | None, scope: str) -> str:
    """``exemplars.md``: the strongest top and bottom unit of every condition."""
    sets = res.sets(family, pooling, scope)
    ex_ds = res.exemplars(family, pooling=pooling)
    sel = res.selectivity(family, pooling)
    exact = res.exact(family)["ap"].sel(pooling=sel.attrs.get("pooling", pooling))
    units = res.units(family)
    lines = [
        f"# Exemplars ({family}, scope {scope})",
        "",
        "For each condition, the first unit of its top set and of its bottom set, with the "
        "examples on which it takes its highest (top) and lowest (bottom) values at the step, "
        "over every language of the (task, modality). Input: the sentence (speech: the "
        "transcript of the recording). All units: `results.open(store).exemplars(...)`.",
        "",
    ]
    dims = ("task", "modality", "step", "language")
    for labels in itertools.product(*(sets[d].values for d in dims)):
        at = dict(zip(dims, labels, strict=True))
        block = sets.sel(at)
        firsts = {k: int(block.sel(kind=k).values[0]) for k in ("top", "bottom")}
        if firsts["top"] < 0:
            continue
        lines += [f"## {at['task']} / {at['modality']} / step {at['step']} / {at['language']}", ""]
        ex = ex_ds[
            (ex_ds["task"] == at["task"])
            & (ex_ds["modality"] == at["modality"])
            & (ex_ds["step"] == at["step"])
        ]
        for kind, unit in firsts.items():
            ap = float(exact.sel(at).sel(unit=unit)) if unit in exact["unit"] else np.nan
            lines += _unit_block(ex, units, unit, ap, kind)
    return "\n".join(lines)


def stability_table(st: xr.Dataset) -> pd.DataFrame:
    """One row per measured condition: top and bottom overlap of the halves, k, chance."""
    df = st[["overlap", "expected", "k"]].to_dataframe().reset_index()
    df = df[df["overlap"].notna()]
    wide = df.pivot_table(
        index=["task", "modality", "step", "language"], columns="kind", values="overlap"
    )
    first = df.groupby(["task", "modality", "step", "language"])[["k", "expected"]].first()
    out = pd.DataFrame(
        {
            "top overlap": wide["top"].astype(int),
            "bottom overlap": wide["bottom"].astype(int),
            "k": first["k"].astype(int),
            "chance k*k/N": first["expected"].round(2),
        }
    )
    return out.reset_index()


def _md(df: pd.DataFrame) -> list[str]:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rows = ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return [head, "|" + "---|" * len(df.columns), *rows]


def _spearman_line(res: Results, family: str) -> str:
    """How exact the Spearman analyses are (the overlap group's ``ap`` attr and bounds)."""
    try:
        rho = res.overlap(family, "spearman", scope=None)
    except ValueError:
        return ""
    if rho.attrs.get("ap") == "exact":
        return "Spearman analyses: every unit's AP is exact (bound 0)."
    if "spearman_bound" not in rho:
        return ""
    worst = float(rho["spearman_bound"].max())
    return f"Spearman analyses: histogram AP; largest guaranteed bound {worst:.3f}."


def write_fidelity_report(
    res: Results,
    dest: Path,
    family: str = "decoder",
    pooling: str | None = None,
    scope: str = "all",
) -> list[Path]:
    """Write ``exemplars.md`` and ``stability.md`` (when the store has them) and append the
    section linking them to ``dest/summary.md``; returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    written, section = [], ["", "## Fidelity", ""]
    spearman = _spearman_line(res, family)
    section += [spearman, ""] if spearman else []
    with contextlib.suppress(ValueError):  # stores reduced before exemplars were kept
        (dest / "exemplars.md").write_text(exemplars_md(res, family, pooling, scope) + "\n")
        written.append(dest / "exemplars.md")
        section += ["Exemplars of the strongest units: [exemplars.md](exemplars.md).", ""]
    with contextlib.suppress(ValueError):  # measured only when every unit is exact
        table = _md(stability_table(res.stability(family, pooling, scope)))
        intro = (
            "Set stability: units of the top/bottom-k sets that two disjoint halves of the "
            f"examples both select (scope {scope}), beside chance k*k/N."
        )
        (dest / "stability.md").write_text(
            "\n".join(["# Set stability", "", intro, "", *table]) + "\n"
        )
        written.append(dest / "stability.md")
        section += [intro + " Also in [stability.md](stability.md).", "", *table, ""]
    summary = dest / "summary.md"
    if summary.is_file() and len(section) > 3:
        summary.write_text(summary.read_text().rstrip("\n") + "\n" + "\n".join(section) + "\n")
    return written
