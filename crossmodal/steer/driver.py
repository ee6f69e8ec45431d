"""The steer stage's driver: run every pending task of the grid on a fleet, then consolidate.

:func:`run_steer` expands the grid, skips the cells a part file already holds
(:mod:`crossmodal.steer.parts`), hands the remaining tasks to :class:`SteerWorker` actors
(:mod:`crossmodal.fleet`) and writes ``results.parquet`` and ``summary.parquet``.

Before anything is written the grid is checked against its selectivity store
(:mod:`crossmodal.steer.source`): a store whose reduce is unfinished, a task, modality, step
or language the store lacks, and (unless ``allow_empty_sets``) a cell that would force no
unit are each refused with one line. Cell ids hash the selectivity's content digest.

Resume and exactly-once: a cell is done when a part file holds it. A worker killed mid-task
leaves no part and its task is run again; a task retried after its part landed rewrites the
same file with the same rows. :func:`consolidate` keeps one row per (cell, input) from the
parts of the current grid. Every file the driver writes (``grid.json``, the two tables) is
written to a temporary name and renamed, and the driver reaches a named write boundary
(:data:`BOUNDARIES`) between every two writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from crossmodal.fleet import FaultPoint, RaySession, progress
from crossmodal.steer.grid import Cell, SteerConfig, expand, tasks
from crossmodal.steer.parts import CELL_FIELDS, PARTS, done_cells, read_parts
from crossmodal.steer.source import check_grid_values, check_sets, selectivity_digest
from crossmodal.steer.worker import SteerWorker, open_selectivity
from crossmodal.store.lock import OutputLock
from crossmodal.store.output_root import resolve_output

__all__ = ["BOUNDARIES", "consolidate", "done_cells", "run_steer"]

BOUNDARIES = (
    "steer.grid.written",
    "steer.task.landed",
    "steer.results.written",
    "steer.summary.written",
)
"""The steer driver's write boundaries (``CROSSMODAL_FAULT="driver:at=<boundary>"``); the
workers' part files are atomic (:mod:`crossmodal.steer.parts`)."""


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary name beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def consolidate(
    config: SteerConfig, cells: Sequence[Cell], fault: FaultPoint | None = None
) -> tuple[Path, Path]:
    """``results.parquet`` (one row per cell and input, this grid only) and ``summary.parquet``
    (each written whole, then renamed)."""
    from crossmodal.steer.metrics import summarize

    out = Path(config.output)
    wanted = {c.id for c in cells}
    tables = read_parts(out)
    frame = pa.concat_tables(tables, promote_options="default").to_pandas() if tables else None
    if frame is None or frame.empty:
        raise ValueError(
            f"output must hold finished parts, got none under {str(out / PARTS)!r}; run the grid"
        )
    frame = frame[frame["cell_id"].isin(wanted)].drop_duplicates(
        ["cell_id", "input_id"], keep="first"
    )
    frame = frame.reset_index(drop=True)
    results, summary = out / "results.parquet", out / "summary.parquet"
    _replace(results, lambda p: frame.to_parquet(p, index=False))
    if fault is not None:
        fault.reached("steer.results.written")
    table = summarize(
        frame,
        keys=(*CELL_FIELDS, "n_forced", "mean_ap"),
        lid_prefixes=[f"lid_{b}" for b in config.lid.backends],
        languages=config.measured_languages,
        output_language=config.output_language,
    )
    _replace(summary, lambda p: table.to_parquet(p, index=False))
    if fault is not None:
        fault.reached("steer.summary.written")
    return results, summary


def resolve_outputs(config: SteerConfig) -> SteerConfig:
    """``output`` and ``selectivity.path`` (a collect store, an earlier stage's output) made
    absolute against the output root (:mod:`crossmodal.store.output_root`)."""
    root = config.output_root
    store = config.selectivity.path
    if store is not None:  # None is refused, with its fix, where the selectivity is opened
        store = resolve_output(store, root, field="selectivity.path")
    return replace(
        config,
        output=resolve_output(config.output, root),
        selectivity=replace(config.selectivity, path=store),
    )


def run_steer(
    config: SteerConfig,
    *,
    address: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending cell of the grid on Ray actors, then consolidate the results.

    Returns:
        ``{"output", "cells", "ran", "resumed", "results", "summary", "seconds"}``.
    """
    config = resolve_outputs(config)
    out = Path(config.output)
    with OutputLock(out, "steer", echo=echo):  # one writer per output (lock.py)
        return _steer(config, out, address=address, show_progress=progress, echo=echo)


def _steer(
    config: SteerConfig,
    out: Path,
    *,
    address: str | None,
    show_progress: bool,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """The locked part of :func:`run_steer`."""
    start = time.time()
    digest = selectivity_digest(config.selectivity)  # refuses an unfinished reduce
    ds = open_selectivity(config.selectivity)
    check_grid_values(config, ds)
    cells = expand(config, digest)
    check_sets(config, cells, ds)
    fault = FaultPoint("driver", config.output)  # CROSSMODAL_FAULT (fleet/faults.py)
    grid = _grid_json(config, cells)
    _replace(out / "grid.json", lambda p: p.write_text(grid))
    fault.reached("steer.grid.written")
    done = done_cells(out) & {c.id for c in cells}
    pending = tasks([c for c in cells if c.id not in done], config.cells_per_task)
    summary: dict[str, Any] = {
        "output": str(out.resolve()),
        "cells": len(cells),
        "ran": 0,
        "resumed": len(done),
    }
    if pending:
        summary["ran"] = _run_tasks(
            config, pending, len(cells), len(done), address, show_progress, fault
        )
    results, cell_summary = consolidate(config, cells, fault)
    summary.update(results=str(results), summary=str(cell_summary), seconds=time.time() - start)
    echo(
        f"steered {summary['ran']} cells ({summary['resumed']} already done) into {out} "
        f"in {summary['seconds']:.1f} s"
    )
    return summary


def _run_tasks(
    config: SteerConfig,
    pending: Sequence[Sequence[Cell]],
    total: int,
    done: int,
    address: str | None,
    show_progress: bool,
    fault: FaultPoint,
) -> int:
    """Run ``pending`` tasks on the fleet (the driver fault point ticks after each); the
    number of cells run."""
    ran = 0
    bar = progress(total, desc="steer", unit="cell", enabled=show_progress, initial=done)
    with (
        RaySession(address) as session,
        bar,
        session.actors(SteerWorker, config, spec=config.actors) as fleet,
    ):
        for result in fleet.map(pending, fault=fault):
            fault.reached("steer.task.landed")
            ran += len(result["cells"])
            bar.update(len(result["cells"]))
    return ran


def _grid_json(config: SteerConfig, cells: Sequence[Cell]) -> str:
    """``grid.json``: the config and every cell with its id (what the report reads back)."""
    return json.dumps(
        {"config": config.to_dict(), "cells": [dict(c.to_dict(), id=c.id) for c in cells]}, indent=1
    )
