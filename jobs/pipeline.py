"""The whole method as one resumable Ray job: collect -> reduce -> steer -> report.

Runs three ways:

    python -m jobs.pipeline configs/pipeline-organism.yaml                  # in-process ray.init()
    python -m jobs.pipeline configs/pipeline-organism.yaml --address auto   # a `ray start --head`
    ray job submit --working-dir . -- python -m jobs.pipeline configs/pipeline-organism.yaml

Re-running the same config resumes every stage where it stopped.
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
@click.option("--no-progress", is_flag=True, help="No progress bars (logs, CI).")
def main(config: str, address: str | None, no_progress: bool) -> None:
    """Run collect, reduce, steer and report for a pipeline CONFIG (resumable).

    \b
    Example:
      crossmodal run configs/pipeline-organism.yaml
    """
    from crossmodal.config import ConfigError
    from crossmodal.pipeline import format_headline, load_pipeline, run_pipeline

    try:
        pipeline = load_pipeline(config)
        result = run_pipeline(pipeline, address=address, progress=not no_progress, echo=click.echo)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except ValueError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo("== done ==")
    click.echo(format_headline(result))


if __name__ == "__main__":
    main()
