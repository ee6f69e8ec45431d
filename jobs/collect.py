"""The collect job: validate a config, plan, and collect statistics with Ray actors.

Runs three ways (each tested in tests/test_collect.py):

    python -m jobs.collect configs/organism.yaml                   # in-process ray.init()
    python -m jobs.collect configs/organism.yaml --address auto    # a `ray start --head` cluster
    ray job submit --working-dir . -- python -m jobs.collect configs/organism.yaml

``--dry-run`` prints the plan (work units, examples, units, estimated store size) and stops.
"""

from __future__ import annotations

import click

from crossmodal import cli_options as opts

opts.set_ray_env()  # before Ray is imported anywhere


@click.command(context_settings=opts.CONTEXT)
@opts.config_argument
@opts.address_option
@click.option("--dry-run", is_flag=True, help="Print the plan and the store size, then stop.")
@click.option("--output", default=None, help="Store path, overriding the config's `output`.")
@opts.no_progress_option()
def main(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Collect per-step unit statistics for CONFIG into a Zarr store (resumable).

    \b
    Examples:
      crossmodal collect configs/reference.yaml --dry-run
      python -m jobs.collect configs/organism.yaml --address auto
    """
    from crossmodal.collect.driver import collect_file

    with opts.exit_on_error():  # config, store, data and model errors: one clear message
        collect_file(
            config,
            address=address,
            dry_run=dry_run,
            output=output,
            progress=not no_progress,
            echo=click.echo,
        )


if __name__ == "__main__":
    main()
