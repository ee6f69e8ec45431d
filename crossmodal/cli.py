"""The ``crossmodal`` command line: thin click wrappers over the library.

Each subcommand parses its options and calls one library function; none holds logic of its
own. Every ``--help`` ends with an example that runs as written.
"""

from __future__ import annotations

from pathlib import Path

import click

from crossmodal.cli_options import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="crossmodal")
def main() -> None:
    """Language-selective units in SeamlessM4T v2, step by step through generation.

    \b
    Example:
      crossmodal run configs/pipeline-organism.yaml
    """


@main.command()
@click.option("--eval", "do_eval", is_flag=True, help="Evaluate exact match on held-out sentences.")
@click.option(
    "--build",
    "build_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Rebuild the organism deterministically into this directory.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the rebuild.")
@click.option(
    "--n-per-language",
    default=100,
    show_default=True,
    help="Held-out sentences per language for --eval.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Organism directory to evaluate (default: the shipped one).",
)
def organism(
    do_eval: bool, build_dir: Path | None, seed: int, n_per_language: int, model_dir: Path | None
) -> None:
    """Build or evaluate the model organism (the embedded default model).

    Without options it prints where the shipped organism lives.

    \b
    Example:
      crossmodal organism --eval --n-per-language 50
    """
    from crossmodal.organism import build_organism, evaluate_organism, organism_path

    path = model_dir
    if build_dir is not None:
        path = build_organism(build_dir, seed=seed)
        click.echo(f"organism written to {path}")
    path = path or organism_path()
    if do_eval:
        report = evaluate_organism(path, n_per_language=n_per_language)
        click.echo(report.format())
    elif build_dir is None:
        click.echo(str(path))


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(configs: tuple[str, ...]) -> None:
    """Validate collect or steer CONFIGS against their JSON Schemas; list every violation.

    A config with a ``collect`` entry is a pipeline (crossmodal/schemas/pipeline.schema.json, its stage
    configs checked too), one with a ``selectivity`` section a steering grid
    (crossmodal/schemas/steer.schema.json), any other a collect config (crossmodal/schemas/collect.schema.json).
    Exits 1 on any error.

    \b
    Example:
      crossmodal validate configs/organism.yaml configs/steer-organism.yaml
    """
    from crossmodal.collect import config as collect_config
    from crossmodal.steer import grid
    from crossmodal.pipeline import load_pipeline

    failed = False
    for path in configs:
        try:
            raw = collect_config.read_file(path)
        except collect_config.ConfigError as err:
            errors = err.errors
        else:
            kind = next((k for k in ("collect", "selectivity") if k in (raw or {})), None)
            if kind == "collect":
                try:
                    load_pipeline(path)
                    errors = []
                except collect_config.ConfigError as err:
                    errors = err.errors
            else:
                errors = (grid.validate if kind else collect_config.validate)(raw)
        for line in errors:
            click.echo(line, err=True)
        failed |= bool(errors)
        click.echo(f"{path}: {'INVALID' if errors else 'ok'}")
    if failed:
        raise SystemExit(1)


@main.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Throughput benchmark: bare generate vs capture+statistics vs the reference procedure.

    Needs only torch, transformers and numpy; flags as ``python -m crossmodal.bench --help``.

    \b
    Example:
      crossmodal bench --model organism --batch-sizes 8,32 --reducer false --out bench.json
    """
    from crossmodal.bench import main as bench_main

    raise SystemExit(bench_main(list(args)))


def _register_jobs() -> None:
    """The Ray job entry points double as subcommands: one definition, two ways to call."""
    from crossmodal.store.verify import verify_command
    from jobs.collect import main as collect_main
    from jobs.pipeline import main as pipeline_main
    from jobs.reduce import main as reduce_main
    from jobs.reduce import report_command
    from jobs.steer import main as steer_main

    main.add_command(pipeline_main, name="run")
    main.add_command(collect_main, name="collect")
    main.add_command(reduce_main, name="reduce")
    main.add_command(steer_main, name="steer")
    main.add_command(report_command, name="report")
    main.add_command(verify_command, name="verify")


_register_jobs()


if __name__ == "__main__":
    main()
