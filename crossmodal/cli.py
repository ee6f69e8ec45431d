"""The ``crossmodal`` command line: one click group, thin wrappers over the library.

Each subcommand parses its options and calls one library function; none holds logic of its
own, and each imports the library only when it runs, so ``--help`` answers at once. Every
``--help`` ends with an example that runs as written. ``jobs/*.py`` are the same commands
as Ray job entry points (``python -m jobs.collect CONFIG``).

Failures are mapped in one place, :class:`Command` (every command's class): an expected
failure (bad config, store, data or steering grid, a lock, a full disk, a read-only output,
a work unit whose actor died for good) is ONE ``error: ...`` line on stderr and exit status
2; anything else is one ``error: unexpected ...`` line and exit status 1. ``--debug`` (before
the command, ``crossmodal --debug collect ...``, or after it, as the ``jobs/*.py`` shims
take it) or ``CROSSMODAL_DEBUG=1`` prints the traceback above that line
(:mod:`crossmodal.errors`).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"]}

config_argument = click.argument("config", type=click.Path(exists=True, dir_okay=False))


class StorePath(click.Path):
    """A store: an existing local directory, or an ``s3://`` / ``gs://`` URL (checked by the command)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from crossmodal.store.location import is_url

        return str(value) if is_url(value) else super().convert(value, param, ctx)


store_argument = click.argument("store", type=StorePath(exists=True, file_okay=False))
address_option = click.option(
    "--address",
    default=None,
    help="Ray address: 'auto' joins a running head; default: the submitting cluster under "
    "`ray job submit`, else an in-process Ray.",
)


DEBUG_KEY = "crossmodal.debug"


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


debug_option = click.Option(
    ["--debug"],
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="On failure, print the traceback too (also: CROSSMODAL_DEBUG=1).",
)


def report_failure(err: Exception, *, debug: bool) -> int:
    """Print ``err`` as its one line (after the traceback when ``debug``); the exit status."""
    from crossmodal.errors import explain

    failure = explain(err)
    if debug:
        traceback.print_exception(err)
    click.echo(f"error: {failure.line}", err=True)
    return failure.code


class Command(click.Command):
    """A command whose failures end as one line (:func:`report_failure`), with ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(debug_option)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            from crossmodal.errors import DEBUG_ENV

            debug = ctx.meta.get(DEBUG_KEY, False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
            raise click.exceptions.Exit(report_failure(err, debug=debug)) from err


def no_progress_option(what: str = "bar") -> Callable[[F], F]:
    """``--no-progress``; ``what`` names the progress display (``bar`` or ``bars``)."""
    return click.option(
        "--no-progress",
        is_flag=True,
        expose_value=True,
        callback=_quiet,
        help=f"No progress {what} (logs, CI); no progress bars in the actors either.",
    )


def _quiet(_ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """``--no-progress`` also silences the Hugging Face and tqdm bars here and in every actor."""
    if value:
        from crossmodal.fleet.session import quiet_progress

        quiet_progress()
    return value


class Group(click.Group):
    command_class = Command


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="crossmodal")
@click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="On failure, print the traceback too (also: CROSSMODAL_DEBUG=1).",
)
def main() -> None:
    """Language-selective units in SeamlessM4T v2, step by step through generation.

    \b
    Example:
      crossmodal run configs/pipeline-organism.yaml
    """
    from crossmodal.fleet import set_ray_env

    set_ray_env()  # before Ray is imported anywhere


@main.command("run", context_settings=CONTEXT)
@config_argument
@address_option
@no_progress_option("bars")
def run(config: str, address: str | None, no_progress: bool) -> None:
    """Run collect, reduce, steer and report for a pipeline CONFIG (resumable).

    \b
    Example:
      crossmodal run configs/pipeline-organism.yaml
    """
    from crossmodal.pipeline import format_headline, load_pipeline, run_pipeline

    pipeline = load_pipeline(config)
    result = run_pipeline(pipeline, address=address, progress=not no_progress, echo=click.echo)
    click.echo("== done ==")
    click.echo(format_headline(result))


@main.command("collect", context_settings=CONTEXT)
@config_argument
@address_option
@click.option("--dry-run", is_flag=True, help="Print the plan and the store size, then stop.")
@click.option("--output", default=None, help="Store path, overriding the config's `output`.")
@no_progress_option()
def collect(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Collect per-step unit statistics for CONFIG into a Zarr store (resumable).

    \b
    Examples:
      crossmodal collect configs/reference.yaml --dry-run
      python -m jobs.collect configs/organism.yaml --dry-run
    """
    from crossmodal.collect.driver import collect_file

    collect_file(
        config,
        address=address,
        dry_run=dry_run,
        output=output,
        progress=not no_progress,
        echo=click.echo,
    )


@main.command("reduce", context_settings=CONTEXT)
@store_argument
@click.option("--k", default=1000, show_default=True, help="Units per side of each set.")
@click.option(
    "--scopes",
    default="all,attention,ffn",
    show_default=True,
    help="Comma-separated unit groups each ranking runs over: all, attention, self_attn, "
    "cross_attn, ffn, dynamic (all but the step-invariant units); GROUP@LAYER ranks one "
    "layer's units, GROUP@* each layer's.",
)
@click.option(
    "--widen",
    default=1e-6,
    show_default=True,
    help="Margin added to every AP interval before planning the exact pass.",
)
@click.option("--csv", is_flag=True, help="Also write one CSV per set (reference columns).")
@click.option("--csv-dir", default=None, help="Where the CSVs go (default: STORE-csv next to it).")
@address_option
@click.option("--num-cpus", default=0.25, show_default=True, help="Ray CPUs per selectivity task.")
@click.option(
    "--every-unit-gib",
    type=click.FloatRange(min=0),
    default=4.0,
    show_default=True,
    help="Disk the exact pass may spill to measure EVERY unit's AP exactly (exact Spearman "
    "analyses, set stability); a larger plan measures the undecided units only; 0: never.",
)
@no_progress_option("bars")
def reduce(
    store: str, scopes: str, every_unit_gib: float, no_progress: bool, **options: Any
) -> None:
    """Reduce a collect STORE: selectivity, exact top/bottom-k sets, roles, overlap (resumable).

    The sets are also one Parquet table per family, STORE-sets/FAMILY.parquet next to the
    store (one row per member, exact AP included); --csv adds the reference's CSV files.

    \b
    Example:
      crossmodal reduce results/organism.zarr --k 100 --scopes 'all,attention,self_attn,cross_attn,ffn,all@*'
    """
    from crossmodal.reduce.driver import run_reduce

    run_reduce(  # options: k, widen, csv, csv_dir, address, num_cpus
        store,
        scopes=[s.strip() for s in scopes.split(",") if s.strip()],
        progress=not no_progress,
        echo=click.echo,
        every_unit_budget=int(every_unit_gib * (1 << 30)),
        **options,
    )


@main.command("steer", context_settings=CONTEXT)
@config_argument
@address_option
@click.option("--dry-run", is_flag=True, help="Print the grid size, then stop.")
@click.option("--output", default=None, help="Results directory, overriding the config's `output`.")
@no_progress_option()
def steer(
    config: str, address: str | None, dry_run: bool, output: str | None, no_progress: bool
) -> None:
    """Force selected unit sets (and random controls) while generating; measure the outputs.

    \b
    Example:
      python -m jobs.steer configs/steer-organism.yaml --dry-run
    """
    from dataclasses import replace

    from crossmodal.steer.driver import run_steer
    from crossmodal.steer.grid import describe, expand, load_grid

    grid = load_grid(config)
    if output is not None:
        grid = replace(grid, output=output)
    click.echo(describe(grid, expand(grid)))
    if dry_run:
        return
    run_steer(grid, address=address, progress=not no_progress, echo=click.echo)


@main.command("report", context_settings=CONTEXT)
@store_argument
@click.option("--out", default=None, help="Output directory (default: STORE-report next to it).")
@click.option("--family", default="decoder", show_default=True, help="Unit family to report.")
@click.option("--pooling", default=None, help="Pooling (default: prefix_mean if collected).")
@click.option(
    "--scope", default="all", show_default=True, help="Set scope: all/attention/ffn/dynamic."
)
@click.option("--no-figures", is_flag=True, help="Write summary.md only (no figures).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["png", "pdf", "svg"]),
    default="png",
    show_default=True,
    help="Figure file format (pdf and svg are vector graphics).",
)
@click.option(
    "--dpi",
    type=click.IntRange(min=1),
    default=150,
    show_default=True,
    help="Resolution of raster figures (PNG) and of images inside PDF/SVG.",
)
def report(
    store: str,
    out: str | None,
    family: str,
    pooling: str | None,
    scope: str,
    no_figures: bool,
    fmt: str,
    dpi: int,
) -> None:
    """Figures and a Markdown summary of a reduced STORE, plus its steering runs' figures.

    summary.md links every figure and each steering run's summary.

    \b
    Example:
      crossmodal report results/organism.zarr --out results/organism-report
      crossmodal report results/organism.zarr --format pdf --out results/organism-report-pdf
    """
    from crossmodal.store import results

    paths = results.open(store).report(
        out,
        family=family,
        pooling=pooling,
        scope=scope,
        figures=not no_figures,
        fmt=fmt,
        dpi=dpi,
    )
    click.echo(f"wrote {len(paths)} files to {paths[0].parent if paths else out}")


@main.command("verify", context_settings=CONTEXT)
@click.argument("store", type=click.Path(file_okay=False))
def verify(store: str) -> None:
    """Check a collect STORE's integrity; print each problem (exit 1) or "ok".

    Checks the layout version and root attributes, the manifest against the plan and the
    arrays, counts across steps and families, histogram sums and finite moments.

    \b
    Example:
      crossmodal verify results/organism.zarr
    """
    from crossmodal.store.verify import verify_store

    found = verify_store(store)
    click.echo(found.format())
    if not found.ok:
        raise SystemExit(1)


@main.command(context_settings=CONTEXT)
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
      crossmodal organism --eval --n-per-language 5
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


@main.command(context_settings=CONTEXT)
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
    from crossmodal.pipeline import load_pipeline
    from crossmodal.schemas import ConfigError, read_file
    from crossmodal.steer import grid

    failed = False
    for path in configs:
        try:
            raw = read_file(path)
        except ConfigError as err:
            errors = err.errors
        else:
            kind = next((k for k in ("collect", "selectivity") if k in (raw or {})), None)
            if kind == "collect":
                try:
                    load_pipeline(path)
                    errors = []
                except ConfigError as err:
                    errors = err.errors
            else:
                errors = (grid.validate if kind else collect_config.validate)(raw)
        for line in errors:
            click.echo(line, err=True)
        failed |= bool(errors)
        click.echo(f"{path}: {'INVALID' if errors else 'ok'}")
    if failed:
        raise SystemExit(1)


class _Parsed(click.ParamType):
    """A :class:`~crossmodal.bench_config.BenchConfig` field's value from its flag's text."""

    def __init__(self, kind: str) -> None:
        from crossmodal.bench_config import _PARSE

        self.name, self._parse = kind, _PARSE.get(kind, str)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError:
            self.fail(
                f"must be one of [{_METAVARS.get(self.name, self.name)}], got {value!r}", param, ctx
            )


_METAVARS = {
    "int": "INT",
    "int | None": "INT",
    "float": "FLOAT",
    "float | None": "FLOAT",
    "bool": "true|false",
    "tuple[int, ...]": "INT,...",
    "tuple[str, ...]": "NAME,...",
}
"""How each kind of :class:`~crossmodal.bench_config.BenchConfig` field reads in --help."""


def bench_options(fn: F) -> F:
    """One ``--flag`` per :class:`~crossmodal.bench_config.BenchConfig` field (unset: the
    field's default, or the CUDA default on a GPU), plus ``--out``."""
    from dataclasses import fields

    from crossmodal.bench_config import BenchConfig, _flag_help

    for f in reversed(fields(BenchConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        meta = _METAVARS.get(kind, "TEXT")
        fn = click.option(
            flag, f.name, type=_Parsed(kind), metavar=meta, help=_flag_help(f.name, f.default)
        )(fn)
    return click.option("--out", default=None, help="Write the JSON result here.")(fn)


@main.command(context_settings=CONTEXT)
@bench_options
def bench(out: str | None, **options: Any) -> None:
    """Throughput benchmark: bare generate vs capture+statistics vs the reference procedure.

    For each (modality, batch size), on the same synthetic inputs: bare HF generate, the
    fast greedy loop (with an identity check), capture plus statistics updates, the batch-1
    reference procedure, and steering (a different forcing per row); once, the reducer over
    synthetic statistics of the real size. Lists take commas (--batch-sizes 8,32), booleans
    true/false. Needs only torch, transformers and numpy (also: python -m crossmodal.bench).
    docs/benchmarks.md explains every column. On CUDA the defaults are the GPU check's.

    \b
    Example:
      crossmodal bench --model organism --modalities text --batch-sizes 8 --n-batches 1 --repeats 1 --reference-examples 1 --reducer false --out bench.json
    """
    from crossmodal.bench import bench as run_bench
    from crossmodal.bench import exit_status

    if status := exit_status(run_bench(out, **options)):
        raise SystemExit(status)


if __name__ == "__main__":
    main()
