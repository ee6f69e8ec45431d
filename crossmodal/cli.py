"""The ``crossmodal`` command line: thin click wrappers over the library.

Each subcommand parses its options and calls one library function; none holds logic of its
own. Every ``--help`` ends with an example that runs as written.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crossmodal")
def main() -> None:
    """Language-selective units in SeamlessM4T v2, step by step through generation.

    \b
    Example:
      crossmodal organism --eval
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
@click.option(
    "--n-per-language", default=50, show_default=True, help="Held-out sentences per language."
)
def demo(n_per_language: int) -> None:
    """Run the main job on the model organism and print where the results are.

    \b
    Example:
      crossmodal demo
    """
    from crossmodal.organism import evaluate_organism, organism_path

    report = evaluate_organism(organism_path(), n_per_language=n_per_language)
    click.echo(report.format())


if __name__ == "__main__":
    main()
