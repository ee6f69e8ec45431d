"""The steer job: validate a grid config, then run its cells on Ray actors (resumable).

Runs three ways:

    python -m jobs.steer configs/steer-organism.yaml                  # in-process ray.init()
    python -m jobs.steer configs/steer-organism.yaml --address auto   # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.steer configs/steer-organism.yaml

``--dry-run`` prints the grid (cells, tasks, generations) and stops. Re-running the same
config skips the cells whose results are already in the output directory.
"""

from __future__ import annotations

import os
import sys

import click

for _key, _value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)  # platform.md: before Ray is imported anywhere


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--address",
    default=None,
    help="Ray address: 'auto' joins a running head; default: the submitting cluster under "
    "`ray job submit`, else an in-process Ray.",
)
@click.option("--dry-run", is_flag=True, help="Print the grid size, then stop.")
@click.option("--output", default=None, help="Results directory, overriding the config's `output`.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
def main(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Force selected unit sets (and random controls) while generating; measure the outputs.

    \b
    Example:
      python -m jobs.steer configs/steer-organism.yaml --dry-run
    """
    from dataclasses import replace

    from crossmodal.config import ConfigError
    from crossmodal.grid import describe, expand, load_grid
    from crossmodal.steer import run_steer

    try:
        grid = load_grid(config)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if output is not None:
        grid = replace(grid, output=output)
    click.echo(describe(grid, expand(grid)))
    if dry_run:
        return
    try:
        run_steer(grid, address=address, progress=not no_progress, echo=click.echo)
    except ValueError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
