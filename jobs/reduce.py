"""The reduce job and the report: selectivity, exact sets, roles and overlap of a collect store.

Runs three ways, like the collect job:

    python -m jobs.reduce results/organism.zarr                    # in-process ray.init()
    python -m jobs.reduce results/organism.zarr --address auto     # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.reduce results/organism.zarr

Re-running skips the passes already recorded in the store. ``report_command`` writes the
figures and summary of a reduced store (``crossmodal report STORE``).
"""

from __future__ import annotations

import os
import sys

import click

for _key, _value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)  # platform.md: before Ray is imported anywhere

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=_CONTEXT)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--k", default=1000, show_default=True, help="Units per side of each set.")
@click.option(
    "--scopes",
    default="all,attention,ffn",
    show_default=True,
    help="Comma-separated unit groups each ranking runs over.",
)
@click.option(
    "--widen",
    default=1e-6,
    show_default=True,
    help="Margin added to every AP interval before planning the exact pass.",
)
@click.option("--csv-dir", default=None, help="Where the CSVs go (default: STORE-sets next to it).")
@click.option(
    "--address",
    default=None,
    help="Ray address: 'auto' joins a running head; default: the submitting cluster under "
    "`ray job submit`, else an in-process Ray.",
)
@click.option("--num-cpus", default=0.25, show_default=True, help="Ray CPUs per selectivity task.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
def main(
    store: str,
    k: int,
    scopes: str,
    widen: float,
    csv_dir: str | None,
    address: str | None,
    num_cpus: float,
    no_progress: bool,
) -> None:
    """Reduce a collect STORE: selectivity, exact top/bottom-k sets, roles, overlap (resumable).

    \b
    Example:
      crossmodal reduce results/organism.zarr --k 1000
    """
    from crossmodal.reduce import run_reduce

    try:
        run_reduce(
            store,
            k=k,
            scopes=[s.strip() for s in scopes.split(",") if s.strip()],
            widen=widen,
            csv_dir=csv_dir,
            address=address,
            num_cpus=num_cpus,
            progress=not no_progress,
            echo=click.echo,
        )
    except ValueError as err:  # store, option and exact-pass errors: one clear message
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


@click.command(context_settings=_CONTEXT)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="Output directory (default: STORE-report next to it).")
@click.option("--family", default="decoder", show_default=True, help="Unit family to report.")
@click.option("--pooling", default=None, help="Pooling (default: prefix_mean if collected).")
@click.option("--scope", default="all", show_default=True, help="Set scope: all/attention/ffn.")
@click.option("--no-figures", is_flag=True, help="Write summary.md only (no PNGs).")
def report_command(
    store: str,
    out: str | None,
    family: str,
    pooling: str | None,
    scope: str,
    no_figures: bool,
) -> None:
    """Figures and a Markdown summary of a reduced STORE, plus its steering runs' figures.

    \b
    Example:
      crossmodal report results/organism.zarr --out results/organism-report
    """
    from crossmodal import results

    try:
        paths = results.open(store).report(
            out, family=family, pooling=pooling, scope=scope, figures=not no_figures
        )
    except ValueError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"wrote {len(paths)} files to {paths[0].parent if paths else out}")


if __name__ == "__main__":
    main()
