"""The steer job: validate a grid config, then run its cells on Ray actors (resumable).

Runs three ways:

    python -m jobs.steer configs/steer-organism.yaml                  # in-process ray.init()
    python -m jobs.steer configs/steer-organism.yaml --address auto   # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.steer configs/steer-organism.yaml

``--dry-run`` prints the grid (cells, tasks, generations) and stops. Re-running the same
config skips the cells whose results are already in the output directory.
"""

from __future__ import annotations

import click

from crossmodal import cli_options as opts

opts.set_ray_env()  # before Ray is imported anywhere


@click.command(context_settings=opts.CONTEXT)
@opts.config_argument
@opts.address_option
@click.option("--dry-run", is_flag=True, help="Print the grid size, then stop.")
@click.option("--output", default=None, help="Results directory, overriding the config's `output`.")
@opts.no_progress_option()
def main(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Force selected unit sets (and random controls) while generating; measure the outputs.

    \b
    Example:
      python -m jobs.steer configs/steer-organism.yaml --dry-run
    """
    from dataclasses import replace

    from crossmodal.schemas import ConfigError
    from crossmodal.steer.grid import describe, expand, load_grid
    from crossmodal.steer.driver import run_steer

    with opts.exit_on_error(ConfigError):
        grid = load_grid(config)
    if output is not None:
        grid = replace(grid, output=output)
    click.echo(describe(grid, expand(grid)))
    if dry_run:
        return
    with opts.exit_on_error():
        run_steer(grid, address=address, progress=not no_progress, echo=click.echo)


if __name__ == "__main__":
    main()
