"""Part files: one Parquet file of rows per finished steering task, the unit of resume.

A worker writes ``<output>/parts/<name>.parquet`` for each task it finishes, to a temporary
name first and then renamed, so a part either holds a whole task or does not exist. The name
hashes the task's cell ids: a task retried after its part landed rewrites the same file with
the same rows. A cell is done when a part holds it (:func:`done_cells`); the driver keeps one
row per (cell, input) when it consolidates (docs/design.md, "Crash safety and resume").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from crossmodal.steer.grid import Cell

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


def write_part(folder: Path, cells: Sequence[Cell], table: pa.Table) -> str:
    """Write ``table`` as the part of ``cells`` under ``folder`` (atomically); its file name."""
    name = part_name(cells)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / name)
    return name


def read_parts(output: str | Path) -> list[pa.Table]:
    """Every finished part under ``output``, in file-name order (temporary files skipped)."""
    parts = Path(output) / PARTS
    return [pq.read_table(p) for p in sorted(parts.glob("*.parquet"))] if parts.is_dir() else []


def done_cells(output: str | Path) -> set[str]:
    """Cell ids held by the finished part files under ``output``."""
    parts = Path(output) / PARTS
    done: set[str] = set()
    for path in sorted(parts.glob("*.parquet")) if parts.is_dir() else []:
        done.update(pq.read_table(path, columns=["cell_id"]).column("cell_id").to_pylist())
    return done
