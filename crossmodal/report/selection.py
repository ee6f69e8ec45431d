"""Figures (PNG, PDF or SVG) and a Markdown summary of selection, overlap and Spearman results.

Input: the selectivity dataset of :mod:`crossmodal.reduce.selection` (in memory or opened lazily
from the store). Overlap and Spearman are computed for every task that has both a text and
a speech modality with data (x2en, en2x; not asr). Matplotlib is used through
``matplotlib.figure.Figure`` (Agg rendering for ``savefig``), never ``pyplot``, so no global
backend or figure registry is touched.

Figures are built for a paper: a heatmap drops the rows and columns with no value (en2x has
no English set), step and layer axes have integer ticks, every panel with lines has its own
legend. :func:`build_figures` returns them unsaved (the tests inspect their Axes).

Files written into ``out_dir`` (``<name>.<fmt>``, :data:`FORMATS`):
  * ``overlap_<task>_<kind>.png``: text-by-speech intersection heatmaps, one panel per step;
  * ``spearman_<task>.png``: AP Spearman heatmaps (all units), one panel per step;
  * ``spearman_<task>_components.png``: mean same-language Spearman per layer and per
    submodule against step;
  * ``layer_counts_<task>.png``: selected units per layer (mean over languages);
  * ``diagonal_vs_step.png``: same-language overlap against step, representation (x2en)
    vs control (en2x), with the random expectation and the off-diagonal mean;
  * ``concentration.png`` when a Gini summary is given (mean Gini per layer, one line per
    modality and step, with a 95% confidence band when std and count come with it);
    ``summary.md`` then also compares speech vs text and Latin vs
    non-Latin script languages (:data:`NON_LATIN`; for en2x the script is the output's);
  * ``summary.md``: the numbers behind every figure, as Markdown tables (with how many
    members of each set are step-invariant units), plus the v1 modality-selective unit
    counts per submodule and site kind when given, and a link to every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axis import Axis
from matplotlib.figure import Figure

from crossmodal.reduce.overlap import COL, ROW, SPEECH, TEXT, count_by, overlap, spearman_matrix
from crossmodal.reduce.roles import ROLE_TASKS
from crossmodal.reduce.selection import KINDS, scope_of, select_sets

FORMATS = ("png", "pdf", "svg")
"""Figure file formats ``crossmodal report --format`` accepts."""

NON_LATIN = ("jpn", "cmn")
"""Languages of the reference set not written in Latin script (docs/method.md, "v1 analyses":
concentration is higher for non-Latin scripts); every other language counts as Latin."""


def paired_tasks(ds: xr.Dataset) -> list[str]:
    """Tasks with finite AP in both the text and the speech modality."""
    has = np.isfinite(ds["ap"]).any([d for d in ds["ap"].dims if d not in ("task", "modality")])
    return [
        str(t) for t in ds["task"].values if bool(has.sel(task=t, modality=[TEXT, SPEECH]).all())
    ]


def write_report(
    selectivity_ds: xr.Dataset,
    out_dir: str | Path,
    *,
    k: int = 1000,
    sets: xr.DataArray | None = None,
    concentration: xr.DataArray | None = None,
    modality: xr.Dataset | None = None,
    skipped: Mapping[str, Sequence[str]] | None = None,
    dpi: int = 100,
    fmt: str = "png",
    figures: bool = True,
) -> list[Path]:
    """Write every figure and ``summary.md``; returns the paths written.

    Args:
        selectivity_ds: the selectivity dataset.
        out_dir: created if missing.
        k: set size per side, used when ``sets`` is None.
        sets: sets to report (e.g. from ``finalize_selection``); default: ``select_sets``
            on ``selectivity_ds["ap"]``.
        concentration: optional mean Gini per condition, dims ``(task, modality, step,
            language, layer)``: ``Results.concentration()["mean"]``, or the whole Dataset
            (``mean``, ``std``, ``count``), which adds a 95% confidence band to the figure.
        modality: optional v1 modality-selective units (``Results.modality()``): counts of
            the speech-/text-selective k-sets per submodule and site kind.
        skipped: the examples collect skipped, ``{reason: [language/split/id, ...]}``
            (:func:`crossmodal.store.collect_store.skipped_examples`); a section when any.
        dpi: resolution of raster output (PNG; embedded images of PDF/SVG).
        fmt: figure file format, one of :data:`FORMATS`.
        figures: False writes ``summary.md`` only (rendering ~14 figures takes seconds).
    """
    check_format(fmt, dpi)
    conc_ds, concentration = _gini_parts(concentration)
    out = Path(out_dir)
    data = _report_data(selectivity_ds, k, sets)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if figures:
        figs = _figures(*data, conc_ds if conc_ds is not None else concentration)
        paths = [_save(fig, out / f"{name}.{fmt}", dpi) for name, fig in figs.items()]
    md = _summary(selectivity_ds, *data, concentration)
    md += _extra_sections(concentration, modality, skipped)
    summary = out / "summary.md"
    summary.write_text(md + "\n" + figure_links(paths, out))
    return [*paths, summary]


def check_format(fmt: str, dpi: int) -> None:
    """Refuse a format outside :data:`FORMATS` or a dpi below 1, in one line."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}; e.g. pdf")
    if not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be one of [int >= 1], got {dpi!r}; e.g. 300")


def _report_data(ds: xr.Dataset, k: int, sets: xr.DataArray | None) -> tuple:
    """(tasks, k, sets, overlap, Spearman, by layer, by submodule, layer counts): what
    the figures and the summary show."""
    tasks = paired_tasks(ds)
    if not tasks:
        raise ValueError(
            f"task must be one of [tasks with text and speech data], got none in "
            f"{ds['task'].values.tolist()!r}; reduce x2en or en2x for both modalities"
        )
    sets = select_sets(ds["ap"], k=k) if sets is None else sets
    k = scope_of(sets)[0]
    ov = overlap(sets.sel(task=tasks), ds)
    ap = ds["ap"].sel(task=tasks)
    rho = spearman_matrix(ap)
    rho_layer = _diagonal(spearman_matrix(ap, by="layer"))
    rho_sub = _diagonal(spearman_matrix(ap, by="submodule"))
    present = (sets.sel(task=tasks) >= 0).any("rank")  # en2x/eng has no set: not a zero
    counts = count_by(sets.sel(task=tasks), ds, "layer").where(present)
    counts = counts.mean("language", skipna=True)
    return tasks, k, sets, ov, rho, rho_layer, rho_sub, counts


def build_figures(
    selectivity_ds: xr.Dataset,
    *,
    k: int = 1000,
    sets: xr.DataArray | None = None,
    concentration: xr.DataArray | xr.Dataset | None = None,
) -> dict[str, Figure]:
    """Every selection figure by file stem, unsaved (what :func:`write_report` writes)."""
    return _figures(*_report_data(selectivity_ds, k, sets), concentration)


def _gini_parts(
    concentration: xr.DataArray | xr.Dataset | None,
) -> tuple[xr.Dataset | None, xr.DataArray | None]:
    """(the Dataset when given one, the mean Gini): the figure's band needs std and count,
    the tables only the mean."""
    if isinstance(concentration, xr.Dataset):
        return concentration, concentration["mean"]
    return None, concentration


def figure_links(paths: Sequence[Path], root: Path, title: str = "Figures") -> str:
    """A Markdown section linking every figure in ``paths`` (relative to ``root``)."""
    figs = [p for p in paths if p.suffix.lstrip(".") in FORMATS]
    if not figs:
        return ""
    lines = [f"## {title}", ""]
    lines += [f"- [{p.stem}]({p.relative_to(root).as_posix()})" for p in figs]
    return "\n".join([*lines, ""])


def _extra_sections(
    concentration: xr.DataArray | None,
    modality: xr.Dataset | None,
    skipped: Mapping[str, Sequence[str]] | None,
) -> str:
    """The summary's optional sections: concentration, modality-selective units, skips."""
    md = "\n" + _concentration_md(concentration) if concentration is not None else ""
    md += "\n" + _modality_md(modality) if modality is not None else ""
    return md + ("\n" + _skipped_md(skipped) if skipped else "")


def _figures(
    tasks: Sequence[str],
    k: int,
    sets: xr.DataArray | None,
    ov: xr.Dataset,
    rho: xr.DataArray,
    rho_layer: xr.DataArray,
    rho_sub: xr.DataArray,
    counts: xr.DataArray,
    concentration: xr.DataArray | None,
) -> dict[str, Figure]:
    """Every figure by file stem (see the module docstring)."""
    figs: dict[str, Figure] = {}
    for task in tasks:
        for kind in KINDS:
            title = f"{task} {kind}-{k} overlap (rows text, columns speech)"
            figs[f"overlap_{task}_{kind}"] = _heatmaps(
                ov["count"].sel(task=task, kind=kind), title, "{:.0f}"
            )
        title = f"{task} AP Spearman, all units"
        figs[f"spearman_{task}"] = _heatmaps(rho.sel(task=task), title, "{:.2f}", vlim=(-1, 1))
        figs[f"spearman_{task}_components"] = _components(
            rho_layer.sel(task=task), rho_sub.sel(task=task), task
        )
        figs[f"layer_counts_{task}"] = _layer_counts(counts.sel(task=task), task, k)
    figs["diagonal_vs_step"] = _diagonal_vs_step(ov, k)
    if concentration is not None:
        figs["concentration"] = _concentration(concentration)
    return figs


def _diagonal(rho: xr.DataArray) -> xr.DataArray:
    """Mean over languages of the same-language Spearman (text L vs speech L)."""
    langs = [lang for lang in rho[ROW].values if lang in set(rho[COL].values)]
    idx = xr.DataArray(langs, dims="language")
    return rho.sel({ROW: idx, COL: idx}).mean("language", skipna=True)


# ----------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def nonempty(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the rows and of the columns of ``m`` holding some finite value."""
    finite = np.isfinite(m)
    return np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))


def integer_ticks(axis: Axis, values: Sequence) -> None:
    """Ticks at exactly the (integer) ``values``, labelled as integers."""
    ticks = sorted({int(v) for v in values})
    axis.set_ticks(ticks, [str(t) for t in ticks])


def _heatmaps(da: xr.DataArray, title: str, fmt: str, vlim: tuple | None = None) -> Figure:
    """One heatmap per step of ``da [step, text_language, speech_language]``; rows and
    columns without any value (a condition that does not exist) are left out."""
    steps = da["step"].values
    fig = Figure(figsize=(3.6 * len(steps) + 0.8, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(steps)))
    finite = da.values[np.isfinite(da.values)]
    lo, hi = vlim or ((finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    im = None
    for ax, step in zip(axes, steps, strict=True):
        full = da.sel(step=step).transpose(ROW, COL)
        rows, cols = nonempty(full.values)
        m = full.values[np.ix_(rows, cols)]
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(f"step {step}")
        ax.set_xticks(range(m.shape[1]), full[COL].values[cols], rotation=45)
        ax.set_yticks(range(m.shape[0]), full[ROW].values[rows])
        ax.set_xlabel("speech")
        ax.set_ylabel("text")
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):  # dark text on the bright end of viridis
                color = "k" if (v - lo) > 0.6 * (hi - lo) else "w"
                ax.text(j, i, fmt.format(v), ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(title)
    return fig


def _components(by_layer: xr.DataArray, by_sub: xr.DataArray, task: str) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    im = None
    for ax, da, dim in ((axes[0], by_layer, "layer"), (axes[1], by_sub, "submodule")):
        full = da.transpose(dim, "step")
        rows, cols = nonempty(full.values)
        m = full.values[np.ix_(rows, cols)]
        im = ax.imshow(np.ma.masked_invalid(m), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(m.shape[0]), [str(v) for v in full[dim].values[rows]])
        ax.set_xticks(range(m.shape[1]), [str(int(v)) for v in full["step"].values[cols]])
        ax.set_xlabel("step")
        ax.set_ylabel(dim)
        ax.set_title(f"{task}: same-language Spearman by {dim}")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="Spearman rho")
    return fig


def _layer_counts(counts: xr.DataArray, task: str, k: int) -> Figure:
    """``counts [modality, step, kind, layer]``: lines per step, panels modality x kind."""
    mods, layers = counts["modality"].values, counts["layer"].values
    fig = Figure(figsize=(4 * len(KINDS), 3 * len(mods)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(mods), len(KINDS), squeeze=False))
    for r, mod in enumerate(mods):
        for c, kind in enumerate(KINDS):
            ax = axes[r, c]
            for step in counts["step"].values:
                ax.plot(
                    layers,
                    counts.sel(modality=mod, kind=kind, step=step).values,
                    marker="o",
                    label=f"step {step}",
                )
            ax.set_title(f"{task} {mod} {kind}-{k}")
            ax.set_xlabel("layer (-1: outside layers)")
            ax.set_ylabel("selected units (mean over languages)")
            integer_ticks(ax.xaxis, layers)
            ax.legend(fontsize=7)
    return fig


def _role_series(ov: xr.Dataset, kind: str) -> dict[str, xr.Dataset]:
    """Per role (or task when roles are absent): diagonal mean, expectation, off-diagonal."""
    tasks = [str(t) for t in ov["task"].values]
    names = {role: t for role, t in ROLE_TASKS.items() if t in tasks} or {t: t for t in tasks}
    out = {}
    for name, task in names.items():
        sub = ov.sel(task=task, kind=kind)
        out[f"{name} ({task})"] = xr.Dataset(
            {
                "diagonal": sub["diagonal"].mean("language", skipna=True),
                "expected": sub["diagonal_expected"].mean("language", skipna=True),
                "offdiag": sub["offdiag_mean"],
            }
        )
    return out


def _diagonal_vs_step(ov: xr.Dataset, k: int) -> Figure:
    fig = Figure(figsize=(4.5 * len(KINDS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(KINDS))
    for ax, kind in zip(axes, KINDS, strict=True):
        for (name, s), color in zip(
            _role_series(ov, kind).items(), ("C0", "C1", "C2", "C3"), strict=False
        ):
            steps = s["step"].values
            ax.plot(
                steps, s["diagonal"].values, marker="o", color=color, label=f"{name}: same language"
            )
            ax.plot(
                steps, s["offdiag"].values, ls=":", color=color, label=f"{name}: other languages"
            )
            ax.plot(
                steps,
                s["expected"].values,
                ls="--",
                color=color,
                alpha=0.5,
                label=f"{name}: random expectation",
            )
        ax.set_title(f"{kind}-{k}: text/speech overlap")
        ax.set_xlabel("step")
        ax.set_ylabel("shared units")
        integer_ticks(ax.xaxis, ov["step"].values)
        ax.legend(fontsize=7)
    return fig


def gini_band(gini: xr.Dataset, level: float = 0.95) -> tuple[xr.DataArray, xr.DataArray]:
    """Mean over languages of the per-language mean Gini, and the half-width of its
    ``level`` normal confidence interval: the languages' examples are independent, so the
    variance of the average is ``sum(std**2 / count) / n_languages**2``."""
    from scipy.stats import norm

    has = np.isfinite(gini["mean"]) & (gini["count"] > 1)
    n_lang = has.sum("language")
    avg = gini["mean"].where(has).mean("language", skipna=True)
    var = (gini["std"] ** 2 / gini["count"]).where(has).sum("language") / n_lang**2
    return avg, float(norm.ppf(0.5 + level / 2)) * np.sqrt(var)


def _concentration(gini: xr.DataArray | xr.Dataset) -> Figure:
    """Mean Gini per layer, one line per modality and step; with std and count, a 95%
    confidence band around each line."""
    tasks = gini["task"].values
    fig = Figure(figsize=(4.5 * len(tasks), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(tasks)))
    if isinstance(gini, xr.Dataset):
        avg, half = gini_band(gini)
    else:
        avg, half = gini.mean("language", skipna=True), None
    band = " (band: 95% CI)" if half is not None else ""
    for ax, task in zip(axes, tasks, strict=True):
        for mod in avg["modality"].values:
            for step in avg["step"].values:
                at = {"task": task, "modality": mod, "step": step}
                y = avg.sel(at).values
                (line,) = ax.plot(
                    avg["layer"].values, y, marker=".", label=f"{mod} step {step}{band}"
                )
                if half is not None:
                    h = half.sel(at).values
                    ax.fill_between(
                        avg["layer"].values, y - h, y + h, color=line.get_color(), alpha=0.15
                    )
        ax.set_title(f"{task}: Gini of |activation|")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean Gini")
        integer_ticks(ax.xaxis, avg["layer"].values)
        ax.legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------- Markdown


def fmt_value(v: float, spec: str) -> str:
    """A table cell: ``spec`` format, or an en dash for a missing (NaN) value."""
    return "–" if v is None or not np.isfinite(v) else spec.format(v)


def md_table(df: pd.DataFrame, spec: str | Sequence[str], index_name: str = "") -> str:
    """A Markdown table of ``df``; numbers formatted by ``spec`` (one, or one per column)."""
    specs = [spec] * len(df.columns) if isinstance(spec, str) else list(spec)
    head = "| " + " | ".join([index_name or df.index.name or "", *map(str, df.columns)]) + " |"
    rule = "|" + "---|" * (len(df.columns) + 1)
    body = [
        "| "
        + " | ".join([str(idx), *(fmt_value(float(v), f) for v, f in zip(row, specs, strict=True))])
        + " |"
        for idx, row in zip(df.index, df.to_numpy(), strict=True)
    ]
    return "\n".join([head, rule, *body])


def _matrix_frame(da: xr.DataArray) -> pd.DataFrame:
    m = da.transpose(ROW, COL)
    return pd.DataFrame(m.values, index=m[ROW].values, columns=m[COL].values)


def _summary(
    ds: xr.Dataset,
    tasks: Sequence[str],
    k: int,
    sets: xr.DataArray,
    ov: xr.Dataset,
    rho: xr.DataArray,
    rho_layer: xr.DataArray,
    rho_sub: xr.DataArray,
    counts: xr.DataArray,
    concentration: xr.DataArray | None,
) -> str:
    """``summary.md`` up to the v1 sections: the numbers behind every selection figure."""
    _, group, layer = scope_of(sets)
    steps = ", ".join(map(str, ds["step"].values))
    scope = f"group {group}, layer {layer or 'all'}"
    lines = [
        "# Cross-modal selectivity report",
        "",
        f"- units: {ds.sizes['unit']} (scope: {scope}); k = {k} per side",
        f"- tasks compared across modalities: {', '.join(tasks)}; steps: {steps}",
        f"- languages: {', '.join(map(str, ds['language'].values))}",
        "- overlap rows are text sets, columns speech sets; "
        "'–' marks a condition that does not exist",
        "",
    ]
    lines += _diagonal_md(tasks, ov)
    lines += _step_invariant_md(ds, sets)
    lines += _overlap_md(tasks, ov)
    lines += _spearman_md(tasks, rho, rho_sub)
    lines += _layer_counts_md(tasks, counts)
    if concentration is not None:
        lines += _gini_md(concentration)
    return "\n".join(lines)


def _diagonal_md(tasks: Sequence[str], ov: xr.Dataset) -> list[str]:
    """Same-language overlap per task, kind and step, against the random expectation."""
    rows = []
    for task in tasks:
        for kind in KINDS:
            for step in ov["step"].values:
                s = ov.sel(task=task, kind=kind, step=step)
                rows.append(
                    {
                        "condition": f"{task} {kind} step {step}",
                        "diagonal mean": float(s["diagonal"].mean(skipna=True)),
                        "off-diagonal mean": float(s["offdiag_mean"]),
                        "random expectation": float(s["diagonal_expected"].mean(skipna=True)),
                        "max diagonal p": float(s["diagonal_p"].max(skipna=True)),
                    }
                )
    table = pd.DataFrame(rows).set_index("condition")
    return [
        "## Same-language overlap against chance",
        "",
        md_table(table, ["{:.2f}"] * 3 + ["{:.2e}"]),
        "",
    ]


def _step_invariant_md(ds: xr.Dataset, sets: xr.DataArray) -> list[str]:
    """Members of each set that are step-invariant units (docs/method.md, "Units"), mean
    over the languages with a set, against the set size."""
    if "step_invariant" not in ds.coords:
        return []
    present = (sets >= 0).any("rank")
    size = (sets >= 0).sum("rank").where(present)
    flagged = count_by(sets, ds, "step_invariant")
    invariant = np.asarray(flagged["step_invariant"].values, dtype=bool)
    n = flagged.isel(step_invariant=invariant).sum("step_invariant")  # 0 without any
    frame = (
        xr.Dataset({"step-invariant": n.where(present), "set size": size})
        .mean("language", skipna=True)
        .to_dataframe()
        .dropna()
    )
    frame = frame[["step-invariant", "set size"]]
    frame.index = [" ".join(map(str, i)) for i in frame.index]
    return [
        "## Step-invariant units in the sets",
        "",
        "Members of each set whose value cannot depend on the decoding step (cross-attention "
        "k/v of the encoder output), mean over languages; the `dynamic` scope leaves them out.",
        "",
        md_table(frame, "{:.1f}", "task modality step kind"),
        "",
    ]


def _overlap_md(tasks: Sequence[str], ov: xr.Dataset) -> list[str]:
    """Every text-by-speech intersection matrix."""
    lines = ["## Overlap matrices", ""]
    for task in tasks:
        for kind in KINDS:
            for step in ov["step"].values:
                da = ov["count"].sel(task=task, kind=kind, step=step)
                lines += [
                    f"### Overlap {task} {kind} step {step}",
                    "",
                    md_table(_matrix_frame(da), "{:.0f}", "text \\ speech"),
                    "",
                ]
    return lines


def _spearman_md(tasks: Sequence[str], rho: xr.DataArray, rho_sub: xr.DataArray) -> list[str]:
    """AP Spearman matrices (all units), then the same-language Spearman by submodule."""
    lines = ["## Spearman of AP vectors (all units)", ""]
    for task in tasks:
        for step in rho["step"].values:
            da = rho.sel(task=task, step=step)
            lines += [
                f"### Spearman {task} step {step}",
                "",
                md_table(_matrix_frame(da), "{:.3f}", "text \\ speech"),
                "",
            ]
    lines += ["## Same-language Spearman by submodule (mean over languages)", ""]
    for task in tasks:
        frame = rho_sub.sel(task=task).transpose("submodule", "step").to_pandas()
        lines += [
            f"### Spearman by submodule {task}",
            "",
            md_table(frame, "{:.3f}", "submodule \\ step"),
            "",
        ]
    return lines


def _layer_counts_md(tasks: Sequence[str], counts: xr.DataArray) -> list[str]:
    """Units of the ``both`` sets per layer, one column per (modality, step)."""
    lines = ["## Selected units per layer (both sets, mean over languages)", ""]
    for task in tasks:
        c = (
            counts.sel(task=task, kind="both")
            .stack(col=("modality", "step"))
            .transpose("layer", "col")
        )
        frame = pd.DataFrame(
            c.values, index=c["layer"].values, columns=[f"{m} {s}" for m, s in c["col"].values]
        )
        lines += [f"### Units per layer {task}", "", md_table(frame, "{:.1f}", "layer"), ""]
    return lines


def _gini_md(concentration: xr.DataArray) -> list[str]:
    """Mean Gini over languages and layers per task, modality and step."""
    avg = concentration.mean(["language", "layer"], skipna=True)
    lines = ["## Activation concentration (mean Gini over languages and layers)", ""]
    for task in avg["task"].values:
        frame = avg.sel(task=task).transpose("modality", "step").to_pandas()
        lines += [f"### Gini {task}", "", md_table(frame, "{:.3f}", "modality \\ step"), ""]
    return lines


def concentration_table(gini_mean: xr.DataArray) -> pd.DataFrame:
    """Mean Gini (over layers, then languages) per (task, step): speech vs text and Latin vs
    non-Latin script languages, with the differences."""
    per_lang = gini_mean.mean("layer", skipna=True)
    langs = [str(x) for x in per_lang["language"].values]
    non_latin = [x for x in langs if x in NON_LATIN]
    latin = [x for x in langs if x not in NON_LATIN]

    def mean(da: xr.DataArray) -> float:
        return float(da.mean(skipna=True)) if da.size else float("nan")

    rows = {}
    for task in per_lang["task"].values:
        for step in per_lang["step"].values:
            sub = per_lang.sel(task=task, step=step)
            mods = [str(m) for m in sub["modality"].values]
            speech = mean(sub.sel(modality=SPEECH)) if SPEECH in mods else float("nan")
            text = mean(sub.sel(modality=TEXT)) if TEXT in mods else float("nan")
            lat, non = mean(sub.sel(language=latin)), mean(sub.sel(language=non_latin))
            rows[f"{task} step {step}"] = {
                "speech": speech,
                "text": text,
                "speech - text": speech - text,
                "Latin": lat,
                "non-Latin": non,
                "non-Latin - Latin": non - lat,
            }
    return pd.DataFrame.from_dict(rows, orient="index")


def _concentration_md(gini_mean: xr.DataArray) -> str:
    non = ", ".join(x for x in map(str, gini_mean["language"].values) if x in NON_LATIN)
    lines = [
        "## Activation concentration: speech vs text, Latin vs non-Latin script",
        "",
        "Mean Gini of |activation| over a layer's units (mean over layers and languages); "
        f"non-Latin: {non or 'none'}; for en2x the language (and script) is the output's.",
        "",
        md_table(concentration_table(gini_mean), "{:.4f}", "condition"),
        "",
    ]
    return "\n".join(lines)


def _modality_md(mod: xr.Dataset) -> str:
    """Speech-/text-selective k-sets per submodule and site kind, mean over languages, with
    what a random set of k units would hold (the group's share of units x k)."""
    k = int(mod.attrs.get("k", 0))
    lines = [
        "## Modality-selective units (speech vs text task example)",
        "",
        f"Top-{k} (speech-selective) and bottom-{k} (text-selective) units by AP of speech vs "
        "text examples of the same task, language and step; mean over languages. 'random' is "
        "the expected count of a random set of k units.",
        "",
    ]
    for name, coord in (("by_submodule", "submodule"), ("by_site", "site_kind")):
        share = pd.Series(np.asarray(mod[coord].values, dtype=str)).value_counts(normalize=True)
        for task in mod["task"].values:
            da = mod[name].sel(task=task, kind=["top", "bottom"]).mean("language", skipna=True)
            da = da.stack(col=("kind", "step")).transpose(f"{coord}s", "col")
            frame = pd.DataFrame(
                da.values,
                index=[str(g) for g in da[f"{coord}s"].values],
                columns=[f"{kd} step {st}" for kd, st in da["col"].values],
            )
            frame["random"] = [k * share.get(g, 0.0) for g in frame.index]
            frame = frame.sort_values(frame.columns[0], ascending=False)
            lines += [
                f"### Modality-selective units by {coord} {task}",
                "",
                md_table(frame, "{:.1f}", coord),
                "",
            ]
    return "\n".join(lines)


def _skipped_md(skipped: Mapping[str, Sequence[str]], shown: int = 5) -> str:
    """How many examples collect skipped, per reason, with the first ``shown`` ids."""
    lines = ["## Skipped examples", "", "| reason | examples | first ids |", "| --- | --- | --- |"]
    for reason, ids in sorted(skipped.items()):
        first = ", ".join(f"`{i}`" for i in list(ids)[:shown])
        lines.append(f"| {reason} | {len(ids)} | {first} |")
    return "\n".join([*lines, ""])
