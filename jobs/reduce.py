"""The reduce job and the report: selectivity, exact sets, roles and overlap of a collect store.

Runs three ways, like the collect job:

    python -m jobs.reduce results/organism.zarr                    # in-process ray.init()
    python -m jobs.reduce results/organism.zarr --address auto     # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.reduce results/organism.zarr

Re-running skips the passes already recorded in the store. ``report_command`` writes the
figures and summary of a reduced store (``crossmodal report STORE``).
"""

from __future__ import annotations

import click

from crossmodal import cli_options as opts

opts.set_ray_env()  # before Ray is imported anywhere


@click.command(context_settings=opts.CONTEXT)
@opts.store_argument
@click.option("--k", default=1000, show_default=True, help="Units per side of each set.")
@click.option(
    "--scopes",
    default="all,attention,ffn",
    show_default=True,
    help="Comma-separated unit groups each ranking runs over: all, attention, self_attn, "
    "cross_attn, ffn; GROUP@LAYER ranks one layer's units, GROUP@* each layer's.",
)
@click.option(
    "--widen",
    default=1e-6,
    show_default=True,
    help="Margin added to every AP interval before planning the exact pass.",
)
@click.option("--csv-dir", default=None, help="Where the CSVs go (default: STORE-sets next to it).")
@opts.address_option
@click.option("--num-cpus", default=0.25, show_default=True, help="Ray CPUs per selectivity task.")
@opts.no_progress_option("bars")
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
    from crossmodal.reduce.driver import run_reduce

    with opts.exit_on_error():  # store, option and exact-pass errors: one clear message
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


@click.command(context_settings=opts.CONTEXT)
@opts.store_argument
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
    from crossmodal.store import results

    with opts.exit_on_error():
        paths = results.open(store).report(
            out, family=family, pooling=pooling, scope=scope, figures=not no_figures
        )
    click.echo(f"wrote {len(paths)} files to {paths[0].parent if paths else out}")


if __name__ == "__main__":
    main()
