"""The collect job: validate a config, plan, and collect statistics with Ray actors.

Runs three ways (each tested in tests/test_collect.py):

    python -m jobs.collect configs/organism.yaml                   # in-process ray.init()
    python -m jobs.collect configs/organism.yaml --address auto    # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.collect configs/organism.yaml

``--dry-run`` prints the plan (work units, examples, units, estimated store size) and stops.
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
    help="Ray address: 'auto' joins a running head; default: the submitting "
    "cluster under `ray job submit`, else an in-process Ray.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and the store size, then stop.")
@click.option("--output", default=None, help="Store path, overriding the config's `output`.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
def main(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Collect per-step unit statistics for CONFIG into a Zarr store (resumable).

    \b
    Examples:
      crossmodal collect configs/reference.yaml --dry-run
      python -m jobs.collect configs/organism.yaml --address auto
    """
    from crossmodal.collect import collect_file

    try:
        collect_file(
            config,
            address=address,
            dry_run=dry_run,
            output=output,
            progress=not no_progress,
            echo=click.echo,
        )
    except ValueError as err:  # config, store, data and model errors: one clear message
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
