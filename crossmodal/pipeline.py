"""collect -> reduce -> steer -> report as one resumable run, and its headline numbers.

Each stage is resumable on its own (the collect manifest, the reduce attrs, the steer part
files), so re-running the pipeline redoes only what is missing. The pipeline config
(``crossmodal/schemas/pipeline.schema.json``) points at the stage configs; the steering grid always
reads the selectivity of the collect store of the same pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.collect.config import CollectConfig, load_config
from crossmodal.schemas import ConfigError, load_validated, read_file
from crossmodal.steer.grid import SteerConfig, load_grid
from crossmodal.store.location import StorageOptions, register, upath, zarr_store
from crossmodal.store.output_root import resolve_output


@dataclass(frozen=True)
class PipelineConfig:
    """A validated pipeline: the loaded stage configs, where they came from, stage options."""

    collect: CollectConfig
    collect_path: Path
    steer: SteerConfig | None
    steer_path: Path | None
    k: int
    scopes: tuple[str, ...]
    report_out: Path | None
    csv: bool = False
    report_format: str = "png"
    report_dpi: int = 150
    output_root: str | None = None
    storage_options: StorageOptions = field(default_factory=StorageOptions)


STAGE_COMMANDS = {"collect": "crossmodal collect", "steer": "crossmodal steer"}


def refuse_stage_config(path: str | Path) -> None:
    """A collect or steering config given where a pipeline config belongs: one line naming
    the command that runs it and the pipeline config that wraps it.

    Raises:
        ValueError: ``path`` holds a collect config (``model``, no ``collect``) or a
            steering grid (``selectivity``).
    """
    raw = read_file(path)
    if not isinstance(raw, Mapping) or "collect" in raw:
        return
    kind = "steer" if "selectivity" in raw else "collect" if "model" in raw else None
    if kind is None:
        return
    raise ValueError(
        f"{path}: config must be one of [a pipeline config (collect, reduce, steer, report)], "
        f"got a {kind} config; run it with `{STAGE_COMMANDS[kind]} {path}`, or run a pipeline "
        "config that names it (configs/pipeline-organism.yaml names configs/organism.yaml)"
    )


def _resolve(path: str, base: Path) -> Path:
    """Relative to the working directory first (``ray job submit --working-dir``), else to
    the pipeline file."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base / p


def _load_stage(path: Path, load: Callable[[Path], Any], name: str, errors: list[str]) -> Any:
    """``load(path)``, or None with its violations appended to ``errors`` (``name (path): ...``)."""
    try:
        return load(path)
    except ConfigError as err:
        errors += [f"{name} ({path}): {line}" for line in err.errors]
        return None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Validate a pipeline config, then load the stage configs it names, reporting every error.

    Raises:
        ConfigError: one line per violation, stage configs included.
    """
    refuse_stage_config(path)
    raw = load_validated(path, "pipeline", lambda _: [], label="pipeline")
    base = Path(path).resolve().parent
    collect_path = _resolve(raw["collect"], base)
    steer_path = _resolve(raw["steer"], base) if raw["steer"] else None
    errors: list[str] = []
    collect = _load_stage(collect_path, load_config, "collect", errors)
    steer = _load_stage(steer_path, load_grid, "steer", errors) if steer_path else None
    if errors:
        raise ConfigError(str(path), errors)
    root = raw["output_root"]
    if root is not None:  # the pipeline's root wins over the stage configs' own
        collect = replace(collect, output_root=root)
        steer = replace(steer, output_root=root) if steer is not None else None
    options = StorageOptions.of(raw["storage_options"])
    given = options != StorageOptions()  # (the schema's defaults fill every field)
    if given:  # the pipeline's options win over the stage configs' own
        collect = replace(collect, storage_options=options)
        steer = replace(steer, storage_options=options) if steer is not None else None
    elif steer is not None and StorageOptions.of(steer.storage_options) == StorageOptions():
        # a steer config without its own options reaches the store the way collect does
        steer = replace(steer, storage_options=collect.storage_options)
    out = raw["report"]["out"]
    return PipelineConfig(
        collect=collect,
        collect_path=collect_path,
        steer=steer,
        steer_path=steer_path,
        k=int(raw["reduce"]["k"]),
        scopes=tuple(raw["reduce"]["scopes"]),
        report_out=upath(out) if out else None,
        csv=bool(raw["reduce"]["csv"]),
        report_format=raw["report"]["format"],
        report_dpi=int(raw["report"]["dpi"]),
        output_root=root,
        storage_options=options if given else collect.storage_options,
    )


def run_pipeline(
    config: PipelineConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) every stage, then return paths and the headline numbers.

    Returns:
        ``{"store", "report", "steer", "headline": {...}}``.
    """
    from crossmodal.collect.driver import run_collect
    from crossmodal.reduce.driver import run_reduce
    from crossmodal.steer.driver import run_steer
    from crossmodal.store import results

    stage = {"address": address, "progress": progress, "echo": echo}
    _check_report_out(config)
    echo("== collect ==")
    collected = run_collect(config.collect, source=str(config.collect_path), **stage)
    store = upath(collected["store"])
    echo("== reduce ==")
    run_reduce(store, k=config.k, scopes=config.scopes, csv=config.csv, **stage)
    steer_out = None
    if config.steer is not None:
        echo("== steer ==")
        grid = replace(config.steer, selectivity=replace(config.steer.selectivity, path=str(store)))
        steer_out = upath(run_steer(grid, **stage)["output"])
    echo("== report ==")
    res = results.open(store)
    out = config.report_out and upath(resolve_output(str(config.report_out), config.output_root))
    paths = res.report(out, fmt=config.report_format, dpi=config.report_dpi)
    report_dir = paths[0].parent if paths else out
    return {
        "store": str(store),
        "report": str(report_dir),
        "steer": str(steer_out),
        "headline": headline_numbers(res, steer_out),
    }


def _check_report_out(config: PipelineConfig) -> None:
    """A URL ``report.out``: registered with the pipeline's storage options and checked
    (endpoint, bucket, credentials) before any stage starts."""
    from crossmodal.store.location import check_reachable

    if config.report_out is not None:
        out = resolve_output(str(config.report_out), config.output_root)
        register(out, config.storage_options)
        check_reachable(out)


def headline_numbers(res: Any, steer_out: Any) -> dict[str, Any]:
    """Step-1 same-language overlap vs random, control steering vs random units, throughput."""
    out: dict[str, Any] = {}
    ov = res.overlap()
    if "step" in ov.dims and 1 in ov["step"].values:
        s1 = ov.sel(step=1)
        if "kind" in s1.dims:
            s1 = s1.sel(kind="top")
        for task in s1["task"].values if "task" in s1.dims else []:
            cell = s1.sel(task=task)
            out[f"overlap_step1_{task}"] = {
                "diagonal_mean": float(np.nanmean(cell["diagonal"].values)),
                "random_expected": float(np.nanmean(cell["diagonal_expected"].values)),
                "max_p_value": float(np.nanmax(cell["diagonal_p"].values)),
                "offdiag_mean": float(np.nanmean(cell["offdiag_mean"].values)),
            }
    parts = res.attrs.get("manifest_parts") or _manifest_parts(res.path)
    seconds = sum(float(p.get("seconds", 0.0)) for p in parts)
    examples = sum(int(p.get("n_examples", 0)) for p in parts)
    if seconds > 0:
        out["capture_examples_per_s"] = examples / seconds
    if steer_out is not None and (steer_out / "summary.parquet").is_file():
        from crossmodal.store.location import read_parquet

        summary = read_parquet(steer_out / "summary.parquet")
        out["control_steering"] = steering_headline(summary)
    return out


def _manifest_parts(store: Path) -> list[Mapping[str, Any]]:
    import zarr

    from crossmodal.store.layout import manifest

    return list(manifest(zarr.open_group(zarr_store(store), mode="r"))["parts"].values())


def steering_headline(summary: Any) -> dict[str, float]:
    """Mean target-language share: en2x control units found on speech, forced on text input,
    against random units of the same size (the paper's cross-modal steering result)."""
    cross = summary[(summary["input_modality"] == "text")]
    selected = cross[(cross["kind"] == "selected") & (cross["role"] == "control")]
    selected = selected[selected["unit_modality"] == "speech"]
    random = cross[cross["kind"] == "random"]
    if "role" in random:
        random = random[(random["role"] == "control") | random["role"].isna()]
    return {
        "selected_target_share": float(selected["target_share"].mean()),
        "random_target_share": float(random["target_share"].mean()),
        "n_selected_cells": int(len(selected)),
        "n_random_cells": int(len(random)),
    }


def _steering_line(c: Mapping[str, Any]) -> str:
    """The headline's steering line; a grid without that comparison says so (no ``nan%``)."""
    if c.get("n_selected_cells", 1) == 0 or c.get("n_random_cells", 1) == 0:
        return (
            "steering: this grid has no control units found on speech forced on text, or no "
            "random units to compare with (roles, unit_modalities, random_seeds); every cell "
            "is in summary.parquet"
        )
    return (
        "control units found on speech, forced on text: output in the target language "
        f"{c['selected_target_share']:.0%} vs random units {c['random_target_share']:.0%}"
    )


def format_headline(result: Mapping[str, Any]) -> str:
    """The lines ``make demo`` ends with."""
    h = result["headline"]
    lines = [f"store:   {result['store']}", f"report:  {result['report']}"]
    if result.get("steer") not in (None, "None"):
        lines.append(f"steer:   {result['steer']} (results.parquet, summary.parquet)")
    for key, v in h.items():
        if key.startswith("overlap_step1_"):
            lines.append(
                f"step-1 speech/text overlap ({key.removeprefix('overlap_step1_')}, top-k): "
                f"same language {v['diagonal_mean']:.1f} units vs random {v['random_expected']:.2f} "
                f"(other languages {v['offdiag_mean']:.1f})"
            )
    if "control_steering" in h:
        lines.append(_steering_line(h["control_steering"]))
    if "capture_examples_per_s" in h:
        lines.append(f"capture throughput: {h['capture_examples_per_s']:.1f} examples/s per actor")
    return "\n".join(lines)
