"""The whole report of a reduced store: selection figures and summary, then each steering run.

``crossmodal report STORE`` and the pipeline's last stage call :func:`write_store_report`. It
reads the store through :class:`~crossmodal.store.results.Results`, writes the selection half
with :func:`crossmodal.report.selection.write_report` (exact sets, overlap, Spearman, and the
v1 concentration and modality tables when the store has them), and the steering figures of
every finished run of :meth:`~crossmodal.store.results.Results.steering_runs` (the runs the
steer driver linked from the store's attrs) under ``steering/<run>`` with
:func:`crossmodal.report.steering.steering_figures`; ``summary.md`` then links each run's
``steering.md`` and figures.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossmodal.store.location import is_url, upath, upload_tree, zarr_store

if TYPE_CHECKING:
    from crossmodal.store.results import Results


def write_store_report(
    results_or_store: Results | str | Path,
    out: str | Path | None = None,
    *,
    family: str = "decoder",
    pooling: str | None = None,
    scope: str = "all",
    figures: bool = True,
    fmt: str = "png",
    dpi: int = 150,
) -> list[Path]:
    """Write the report of a store; returns the files written.

    Args:
        results_or_store: the store's :class:`Results`, or its path.
        out: the report directory (default: ``<store>-report`` next to the store).
        family, pooling, scope: which units' sets to report (default pooling: the store's).
        figures: False writes the Markdown summaries only.
        fmt: figure format (png, pdf or svg); dpi: raster resolution.
    """
    from crossmodal.report.fidelity import write_fidelity_report
    from crossmodal.report.selection import write_report
    from crossmodal.store import results

    res = results_or_store
    if not isinstance(res, results.Results):
        res = results.open(res)
    dest = upath(out) if out is not None else res.path.parent / f"{res.path.stem}-report"
    if is_url(dest):  # rendered in a local folder, then each file uploaded whole
        kw = {"family": family, "pooling": pooling, "scope": scope, "figures": figures}
        return _via_local(res, dest, **kw, fmt=fmt, dpi=dpi)
    sets = res.sets(family, pooling, scope)
    ds = res.selectivity(family, pooling)
    conc = mod = None
    with contextlib.suppress(ValueError):  # stores collected before these analyses
        conc = res.concentration(pooling)  # mean, std, count: the figure's band
    with contextlib.suppress(ValueError):
        mod = res.modality(family, pooling)
    import zarr

    from crossmodal.store.collect_store import skipped_examples

    skipped = skipped_examples(zarr.open_group(zarr_store(res.path), mode="r"))
    paths = write_report(
        ds,
        dest,
        sets=sets,
        figures=figures,
        concentration=conc,
        modality=mod,
        skipped=skipped,
        fmt=fmt,
        dpi=dpi,
    )
    paths += write_fidelity_report(res, dest, family, pooling, scope)  # exemplars, stability
    steering = _steering_report(res, dest, fmt, dpi)
    return [*paths, *steering]


def _via_local(res: Results, dest: Path, **kw: Any) -> list[Path]:
    """The report written to a local temporary folder, then uploaded to the URL ``dest``
    file by file (one whole object each)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_store_report(res, Path(tmp), **kw)
        return upload_tree(Path(tmp), dest)


def _steering_report(res: Results, dest: Path, fmt: str, dpi: int) -> list[Path]:
    """Each linked steering run's figures, and their links appended to ``summary.md``."""
    from crossmodal.report.steering import steering_figures

    steering: list[Path] = []
    for run in res.steering_runs():
        if (run / "summary.parquet").is_file():
            steering += steering_figures(run, dest / "steering" / run.name, fmt=fmt, dpi=dpi)
    if steering:
        with (dest / "summary.md").open("a") as md:
            md.write("\n" + _steering_links(steering, dest))
    return steering


def _steering_links(paths: list[Path], root: Path) -> str:
    """The summary's steering section: each run's ``steering.md`` and its figures."""
    from crossmodal.report.selection import figure_links

    lines = ["## Steering", ""]
    for md in (p for p in paths if p.name == "steering.md"):
        rel = md.relative_to(root).as_posix()
        lines.append(f"- run `{md.parent.name}`: [steering summary]({rel})")
    return "\n".join([*lines, "", figure_links(paths, root, "Steering figures")])
