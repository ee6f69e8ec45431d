"""The whole method as one resumable Ray job: collect -> reduce -> steer -> report.

Runs three ways:

    python -m jobs.pipeline configs/pipeline-organism.yaml                  # in-process ray.init()
    python -m jobs.pipeline configs/pipeline-organism.yaml --address auto   # a `ray start --head`
    ray job submit --working-dir . -- python -m jobs.pipeline configs/pipeline-organism.yaml

Re-running the same config resumes every stage where it stopped.
"""

from __future__ import annotations

import click

from crossmodal import cli_options as opts

opts.set_ray_env()  # before Ray is imported anywhere


@click.command(context_settings=opts.CONTEXT)
@opts.config_argument
@opts.address_option
@opts.no_progress_option("bars")
def main(config: str, address: str | None, no_progress: bool) -> None:
    """Run collect, reduce, steer and report for a pipeline CONFIG (resumable).

    \b
    Example:
      crossmodal run configs/pipeline-organism.yaml
    """
    from crossmodal.pipeline import format_headline, load_pipeline, run_pipeline

    with opts.exit_on_error():  # ConfigError is a ValueError
        pipeline = load_pipeline(config)
        result = run_pipeline(pipeline, address=address, progress=not no_progress, echo=click.echo)
    click.echo("== done ==")
    click.echo(format_headline(result))


if __name__ == "__main__":
    main()
