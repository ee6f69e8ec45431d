"""The steer stage's driver: run every pending task of the grid on a fleet, then consolidate.

:func:`run_steer` expands the grid, skips the cells a part file already holds
(:mod:`crossmodal.steer.parts`), hands the remaining tasks to :class:`SteerWorker` actors
(:mod:`crossmodal.fleet`) and writes ``results.parquet`` and ``summary.parquet``.

Before anything is written the grid is checked against its selectivity store
(:mod:`crossmodal.steer.source`): a store whose reduce is unfinished, a task, modality, step
or language the store lacks, and (unless ``allow_empty_sets``) a cell that would force no
unit are each refused with one line. Cell ids hash the selectivity's content digest.

The two tables carry the declared column types (``crossmodal/schemas/outputs.schema.json``:
integers as int64, nullable where a cell kind has no value, booleans as booleans) and the
run's provenance in the Parquet file metadata (:data:`PROVENANCE_KEY`: the config, the code
version, the source store and its content digest). When the source is a collect store, the
driver links the run from the store's root attribute ``steering`` (:func:`link_run`; the
driver is the only writer of the store's metadata, under the store's lock), which
:meth:`crossmodal.store.results.Results.steering_runs` reads.

Resume and exactly-once: a cell is done when a part file holds it. A worker killed mid-task
leaves no part and its task is run again; a task retried after its part landed rewrites the
same file with the same rows. :func:`consolidate` keeps one row per (cell, input) from the
parts of the current grid. Every file the driver writes (``grid.json``, the two tables) is
written whole (on disk to a temporary name, then renamed; at an ``s3://`` output one object
PUT, :func:`crossmodal.store.location.write_whole`; the workers' parts alike), and the driver reaches a named write boundary
(:data:`BOUNDARIES`) between every two writes.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from crossmodal.fleet import FaultPoint, RaySession, progress
from crossmodal.steer.grid import Cell, SteerConfig, expand, tasks
from crossmodal.steer.parts import CELL_FIELDS, PARTS, done_cells, read_parts
from crossmodal.steer.source import check_grid_values, check_sets, selectivity_digest
from crossmodal.steer.worker import SteerWorker, open_selectivity
from crossmodal.store.location import (
    check_reachable,
    is_url,
    register,
    register_inputs,
    resolve,
    upath,
    write_whole,
    zarr_store,
)
from crossmodal.store.lock import output_lock
from crossmodal.store.output_root import resolve_output

__all__ = ["BOUNDARIES", "consolidate", "done_cells", "run_steer"]

BOUNDARIES = (
    "steer.grid.written",
    "steer.task.landed",
    "steer.results.written",
    "steer.summary.written",
    "steer.store.linked",
)
"""The steer driver's write boundaries (``CROSSMODAL_FAULT="driver:at=<boundary>"``); the
workers' part files are atomic (:mod:`crossmodal.steer.parts`)."""


def _replace(path: Any, write: Callable[[Path], object]) -> None:
    """``write`` ``path`` whole: on disk to a temporary name beside it, then renamed; on
    ``s3://`` one object PUT (:func:`crossmodal.store.location.write_whole`)."""
    write_whole(path, write)


PROVENANCE_KEY = b"crossmodal"
"""The Parquet file-metadata key of a steering table's provenance (JSON: ``config``,
``code_version``, ``code_commit``, ``store``, ``store_digest``, ``written``)."""
_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_()}
_PANDAS = {"int64": "Int64", "bool": "boolean", "float64": "float64", "string": "object"}


def declared_types(table: str) -> list[tuple[re.Pattern, str]]:
    """(column-name pattern, base type) of each column ``table`` declares in
    ``outputs.schema.json`` (a placeholder matches any name part)."""
    from crossmodal.schemas import load_schema
    from crossmodal.schemas.outputs import PLACEHOLDERS

    out = []
    for c in load_schema("outputs")["x-tables"][table]["columns"]:
        pattern = re.escape(c["name"])
        for placeholder in PLACEHOLDERS:
            pattern = pattern.replace(re.escape(placeholder), ".+")
        out.append((re.compile(pattern), c["type"].split(",")[0].strip()))
    return out


def typed_table(frame: pd.DataFrame, table: str, provenance: Mapping[str, Any]) -> pa.Table:
    """``frame`` as Arrow with the declared types (integers nullable, booleans as booleans)
    and ``provenance`` in the file metadata.

    Raises:
        ValueError: a column ``table`` does not declare.
    """
    kinds = declared_types(table)
    fields, columns = [], {}
    for name in frame.columns:
        kind = next((k for pattern, k in kinds if pattern.fullmatch(name)), None)
        if kind is None:
            raise ValueError(
                f"column must be one of the columns outputs.schema.json declares for {table}, "
                f"got {name!r}; declare it in crossmodal/schemas/outputs.schema.json"
            )
        col = frame[name]
        if kind == "string":
            col = col.astype(object).where(col.notna(), None)
        columns[name] = col.astype(_PANDAS[kind])
        fields.append(pa.field(name, _ARROW[kind]))
    arrow = pa.Table.from_pandas(
        pd.DataFrame(columns), schema=pa.schema(fields), preserve_index=False
    )
    meta = {**(arrow.schema.metadata or {}), PROVENANCE_KEY: json.dumps(provenance).encode()}
    return arrow.replace_schema_metadata(meta)


def provenance(config: SteerConfig, digest: str) -> dict[str, Any]:
    """What made a steering table: the config, the code version (and git commit when the
    code runs from a checkout), the source and its digest."""
    from crossmodal import __version__

    return {
        "config": config.to_dict(),
        "code_version": __version__,
        "code_commit": _git_commit(),
        "store": resolve(str(config.selectivity.path)),
        "store_digest": digest,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    """The commit of the checkout the package runs from; None outside one (a Ray job's copy
    of the working directory, an installed wheel)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance a steering table carries in its Parquet file metadata."""
    meta = _read_schema(path).metadata or {}
    if PROVENANCE_KEY not in meta:
        raise ValueError(
            f"path must be one of [a steering table written by this version], got {str(path)!r} "
            "without provenance; run `crossmodal steer CONFIG` again"
        )
    return json.loads(meta[PROVENANCE_KEY])


def _read_schema(path: str | Path) -> pa.Schema:
    """The Parquet schema (with file metadata) of a local path or a URL."""
    if not is_url(path):
        return pq.read_schema(path)
    return pq.read_schema(io.BytesIO(upath(path).read_bytes()))


def consolidate(
    config: SteerConfig,
    cells: Sequence[Cell],
    fault: FaultPoint | None = None,
    digest: str = "",
) -> tuple[Any, Any]:
    """``results.parquet`` (one row per cell and input, this grid only) and ``summary.parquet``
    (each written whole, then renamed), typed and with provenance (``digest``: the source's
    content digest)."""
    from crossmodal.steer.metrics import summarize

    out = upath(config.output)
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
    prov = provenance(config, digest)
    typed = typed_table(frame, "steer/results.parquet", prov)
    _replace(results, lambda p: pq.write_table(typed, p))
    if fault is not None:
        fault.reached("steer.results.written")
    table = summarize(
        frame,
        keys=(*CELL_FIELDS, "n_forced", "mean_ap"),
        lid_prefixes=[f"lid_{b}" for b in config.lid.backends],
        languages=config.measured_languages,
        output_language=config.output_language,
    )
    cell_table = typed_table(table, "steer/summary.parquet", prov)
    _replace(summary, lambda p: pq.write_table(cell_table, p))
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
    register(config.output, config.storage_options)  # an s3:// output: its endpoint, region
    register(config.selectivity.path, config.storage_options)
    register_inputs(config)  # s3:// model and data: the same options, checked up front
    check_reachable(config.output)  # a URL: endpoint, bucket, credentials, one line each
    out = upath(config.output)
    if not is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, "steer", echo=echo):  # one writer per output (lock.py)
        return _steer(config, out, address=address, show_progress=progress, echo=echo)


def _steer(
    config: SteerConfig,
    out: Any,
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
        "output": resolve(config.output),
        "cells": len(cells),
        "ran": 0,
        "resumed": len(done),
    }
    if pending:
        summary["ran"] = _run_tasks(
            config, pending, len(cells), len(done), address, show_progress, fault
        )
    results, cell_summary = consolidate(config, cells, fault, digest)
    link_run(config, out, echo)
    fault.reached("steer.store.linked")
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
        session.actors(SteerWorker, config, spec=config.actors, output=config.output) as fleet,
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


STEERING_ATTR = "steering"
"""The store's root attribute listing its steering runs: ``{"runs": {output: {"summary",
"results", "finished"}}}`` (paths relative to the folder that holds the store; a run in
another bucket, or on the other side of local vs ``s3://``: its absolute path or URL)."""


def link_run(config: SteerConfig, out: Any, echo: Callable[[str], None] = print) -> bool:
    """Record the finished run in its source store's root attrs (a collect store only;
    others have no attrs to link from); whether it did. Re-running rewrites the same entry."""
    import zarr

    source = upath(str(config.selectivity.path))
    if not (source / "zarr.json").is_file():
        return False
    root = zarr.open_group(zarr_store(source), mode="r+")
    if "layout_version" not in root.attrs:
        return False
    run = run_link(str(out), str(source))
    with output_lock(source, "steer", echo=echo):  # the store's one writer while linking
        links = dict(root.attrs.get(STEERING_ATTR) or {})
        runs = dict(links.get("runs") or {})
        runs[run] = {
            "summary": posixpath.join(run, "summary.parquet"),
            "results": posixpath.join(run, "results.parquet"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        root.attrs[STEERING_ATTR] = {**links, "runs": runs}
    return True


def run_link(out: str, source: str) -> str:
    """How the store at ``source`` names the run at ``out``: relative to the folder that
    holds the store when both are local or in one bucket (a store moved together with its
    runs keeps its links), else the run's absolute path or URL."""
    from crossmodal.store.location import split

    if not is_url(out) and not is_url(source):
        local = Path(os.path.relpath(Path(out).resolve(), Path(source).resolve().parent))
        return local.as_posix()
    if is_url(out) and is_url(source) and split(out)[0] == split(source)[0]:
        parent = posixpath.dirname(split(source)[1].rstrip("/"))
        return posixpath.relpath(split(out)[1], parent or ".")
    return resolve(out)
