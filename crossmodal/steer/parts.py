"""Part files: one Parquet file of rows per finished steering task, the unit of resume.

A worker writes ``<output>/parts/<name>.parquet`` for each task it finishes, whole
(:func:`crossmodal.store.location.write_whole`: on disk to a temporary name, then renamed; on
``s3://`` one object PUT), so a part either holds a whole task or does not exist. The name
hashes the task's cell ids: a task retried after its part landed rewrites the same file with
the same rows. A cell is done when a part holds it (:func:`done_cells`); the driver keeps one
row per (cell, input) when it consolidates (docs/design.md, "Crash safety and resume").
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from crossmodal.steer.grid import Cell
from crossmodal.store.location import is_url, upath, write_whole

PARTS = "parts"
"""The folder of part files under a steer output directory."""
CELL_FIELDS = (
    "kind",
    "input_modality",
    "role",
    "unit_modality",
    "step",
    "language",
    "set_kind",
    "scope",
    "k",
    "n_units",
    "forcing",
    "seed",
)
"""The :class:`~crossmodal.steer.grid.Cell` fields every row carries (the summary's keys)."""


def part_name(cells: Sequence[Cell]) -> str:
    """The part file of a task: a hash of its sorted cell ids."""
    text = ",".join(sorted(c.id for c in cells))
    return hashlib.sha256(text.encode()).hexdigest()[:16] + ".parquet"


def write_part(folder: Any, cells: Sequence[Cell], table: pa.Table) -> str:
    """Write ``table`` as the part of ``cells`` under ``folder`` (a local path or a URL), whole;
    its file name."""
    name = part_name(cells)
    folder = upath(folder)
    if not is_url(folder):
        folder.mkdir(parents=True, exist_ok=True)
    write_whole(folder / name, lambda p: pq.write_table(table, p))
    return name


def _part_files(output: str | Path) -> list[Any]:
    """The finished part files under ``output`` (temporary files skipped), by name."""
    parts = upath(output) / PARTS
    if not parts.is_dir():
        return []
    return sorted((p for p in parts.iterdir() if p.name.endswith(".parquet")), key=lambda p: p.name)


def read_table(path: Any, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file at a local path, or at a URL (read whole: a part is one small table)."""
    if not is_url(path):
        return pq.read_table(path, columns=columns)
    return pq.read_table(io.BytesIO(path.read_bytes()), columns=columns)


def read_parts(output: str | Path) -> list[pa.Table]:
    """Every finished part under ``output``, in file-name order."""
    return [read_table(p) for p in _part_files(output)]


def done_cells(output: str | Path) -> set[str]:
    """Cell ids held by the finished part files under ``output``."""
    done: set[str] = set()
    for path in _part_files(output):
        done.update(read_table(path, ["cell_id"]).column("cell_id").to_pylist())
    return done
