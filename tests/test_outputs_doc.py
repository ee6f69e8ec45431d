"""docs/outputs.md is current, and the declared output tables are what the code writes.

The steering tables are built through the real code path: ``SteerWorker.measure`` (the part
rows; its model-free half, on a few fake outputs) -> ``write_part`` -> ``consolidate`` (the
driver's results.parquet and summary.parquet); their Parquet columns must be exactly the
columns ``crossmodal/schemas/outputs.schema.json`` declares for that config.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossmodal.reduce.selection import CSV_COLUMNS
from crossmodal.schemas import load_schema
from crossmodal.schemas.outputs import declared_columns, dimension_names, render
from crossmodal.steer.driver import consolidate
from crossmodal.steer.grid import Cell, load_grid
from crossmodal.steer.metrics import SCRIPTS
from crossmodal.steer.parts import write_part
from crossmodal.steer.units import CellForcing
from crossmodal.steer.worker import SteerWorker

DOC = Path(__file__).resolve().parent.parent / "docs" / "outputs.md"
BACKENDS = ("organism", "lingua")


def test_outputs_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "run `make docs` to regenerate docs/outputs.md"


def _all_groups() -> dict[str, dict]:
    return {**load_schema("store")["x-groups"], **load_schema("outputs")["x-groups"]}


def test_every_dimension_is_declared_and_used() -> None:
    used = {d for g in _all_groups().values() for a in g["arrays"].values() for d in a["dims"]}
    declared = set(dimension_names())
    assert used - declared == set(), "declare these dimensions in outputs.schema.json"
    assert declared - used == set(), "these declared dimensions are used by no array"


def test_every_array_and_column_has_a_meaning() -> None:
    dims = set(dimension_names())
    for group, spec in _all_groups().items():
        for name, a in spec["arrays"].items():
            label = list(a["dims"]) == [name] and name in dims
            assert a.get("description") or label, (group, name)
    for table, spec in load_schema("outputs")["x-tables"].items():
        for column in spec["columns"]:
            assert column["description"] and column["type"], (table, column["name"])
    text = render()
    for needle in ("`selectivity/<family>`", "`lid_<backend>_p_<lang>`", "`stats/<family>`"):
        assert needle in text


def test_csv_columns_match_the_declaration() -> None:
    assert declared_columns("reduce/sets CSV") == list(CSV_COLUMNS)


class _FixedLID:
    """A LID backend that calls every text German with p 0.75 (English 0.25)."""

    def identify(self, texts):
        return [{"deu": 0.75, "eng": 0.25} for _ in texts]


def _cells() -> list[Cell]:
    selected = Cell(
        kind="selected",
        input_modality="text",
        role="control",
        unit_modality="speech",
        step=1,
        language="deu",
        set_kind="top",
        scope="all",
        k=2,
        n_units=2,
        forcing="on_p50",
    )
    return [selected, Cell(kind="baseline", input_modality="text")]


def _worker(config) -> SimpleNamespace:
    """The state ``SteerWorker.measure`` reads, without a model: inputs, references, LID."""
    fake = SimpleNamespace(
        config=config,
        inputs=[SimpleNamespace(id="a"), SimpleNamespace(id="b")],
        references={"eng": {"a": "the cat", "b": "a dog"}, "deu": {"a": "die Katze"}},
        identifiers={b: _FixedLID() for b in config.lid.backends},
    )
    fake._lid_columns = functools.partial(SteerWorker._lid_columns, fake)
    return fake


@pytest.fixture
def tables(tmp_path):
    config = load_grid(
        {
            "selectivity": {"path": str(tmp_path / "sel.zarr")},
            "languages": ["deu", "jpn"],
            "lid": {"backends": list(BACKENDS)},
            "output": str(tmp_path / "steer"),
        }
    )
    cells = _cells()
    forcings = [CellForcing({}, n_forced=2, mean_ap=0.9), CellForcing({}, 0, float("nan"))]
    texts = [["die Katze", "ein Hund"], ["the cat", "a dog"]]
    tokens = [[["▁die", "▁Katze"], ["▁ein", "▁Hund"]], [["▁the", "▁cat"], ["▁a", "▁dog"]]]
    part = pa.table(SteerWorker.measure(_worker(config), cells, forcings, texts, tokens))
    write_part(Path(config.output) / "parts", cells, part)
    results, summary = consolidate(config, cells)
    return config, part, pq.read_schema(results), pq.read_schema(summary)


def _declared(table: str, config) -> list[str]:
    return declared_columns(
        table,
        backends=config.lid.backends,
        languages=config.measured_languages,
        scripts=SCRIPTS,
    )


def test_steering_tables_match_the_declaration(tables) -> None:
    config, part, results, summary = tables
    want = _declared("steer/results.parquet", config)
    assert len(want) == len(set(want))
    assert sorted(part.column_names) == sorted(want)  # a part file's columns
    assert sorted(results.names) == sorted(want)  # results.parquet
    assert sorted(summary.names) == sorted(_declared("steer/summary.parquet", config))
    assert "lid_lingua_p_jpn" in want and "tok_katakana" in want


def test_declared_placeholders_are_the_only_ones() -> None:
    outputs = load_schema("outputs")
    used = {
        p
        for spec in outputs["x-tables"].values()
        for c in spec["columns"]
        for p in re.findall(r"<\w+>", c["name"])
    }
    assert used == set(outputs["x-placeholders"])


def test_steering_tables_are_typed_and_carry_provenance(tables, tmp_path) -> None:
    """Integers stay integers (nullable where a baseline has none), booleans booleans, and
    the file metadata says which config, code and store made the table."""
    import json

    import pandas as pd

    from crossmodal.steer.driver import PROVENANCE_KEY, read_provenance

    config, _, results, summary = tables
    for schema in (results, summary):
        for name in ("step", "k", "seed", "n_units", "n_forced"):
            assert schema.field(name).type == pa.int64(), name
        prov = json.loads(schema.metadata[PROVENANCE_KEY])
        assert prov["config"] == config.to_dict()
        assert prov["store"] == str(Path(config.selectivity.path).resolve())
        assert prov["code_version"] and "store_digest" in prov and prov["written"]
        assert prov["code_commit"] is None or len(prov["code_commit"]) == 40
    assert results.field("target_hit").type == pa.bool_()
    out = Path(config.output)
    assert read_provenance(out / "summary.parquet") == json.loads(summary.metadata[PROVENANCE_KEY])
    frame = pd.read_parquet(out / "results.parquet")
    assert str(frame["step"].dtype) == "Int64" and str(frame["target_hit"].dtype) == "boolean"
    baseline = frame[frame["kind"] == "baseline"]
    assert baseline["step"].isna().all() and baseline["target_hit"].isna().all()
    assert frame.loc[frame["kind"] == "selected", "step"].tolist() == [1, 1]
