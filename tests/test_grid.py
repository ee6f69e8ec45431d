"""The steer config and its grid expansion.

Edge cases: every violation reported at once; defaults filled from the schema (every field
has a description and a default); baselines and random controls always present; top and
bottom sets of the same k share random controls; ids stable and sensitive to the context.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from crossmodal.schemas import ConfigError, load_schema
from crossmodal.steer.grid import Cell, expand, load_grid, tasks, validate

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"selectivity": {"path": "results/organism.zarr"}}


def _walk(schema, path="") -> list[tuple[str, dict]]:
    out = []
    for key, prop in schema.get("properties", {}).items():
        out.append((f"{path}{key}", prop))
        if prop.get("type") == "object":
            out.extend(_walk(prop, f"{path}{key}."))
    return out


def test_every_field_has_description_and_default():
    schema = load_schema("steer")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for name, prop in _walk(schema):
        assert prop.get("description"), name
        assert "default" in prop, name


def test_shipped_configs_validate():
    shipped = sorted((ROOT / "configs").glob("steer*.yaml"))
    assert shipped
    for path in shipped:
        config = load_grid(path)
        assert config.roles and config.n_inputs >= 1


def test_defaults():
    c = load_grid(MINIMAL)
    assert c.roles == ("representation", "control")
    assert c.steps == (1, 6, 11) and c.set_sizes == (1000,) and c.forcing == ("on_p50",)
    assert c.max_new_tokens == 128 and c.n_inputs == 100 and c.random_seeds == (0, 1, 2)
    assert c.selectivity.group == "selectivity/decoder" and c.data.source == "organism"
    assert c.measured_languages == ("deu", "spa", "fra", "jpn", "cmn", "eng")
    assert load_grid(c.to_dict()) == c


def test_all_violations_at_once():
    raw = {
        "roles": ["control", "steer"],
        "steps": [0],
        "languages": ["de_de"],
        "set_sizez": [10],
        "forcing": ["median"],
        "data": {"source": "fleurs_raw"},
        "lid": {"backends": ["fasttext"]},
    }
    errors = validate(raw)
    text = "\n".join(errors)
    assert "roles[1]: must be one of ['representation', 'control'], got 'steer'" in text
    assert "steps[0]: must be >= 1, got 0" in text
    assert "unknown field(s) ['set_sizez']; did you mean 'set_sizes'?" in text
    assert (
        "forcing[0]: must be one of ['on_p50', 'on_p90', 'zero', 'off_mean'], got 'median'" in text
    )
    assert len(errors) == 8, errors  # schema and cross-field errors together
    assert (
        errors[4]
        == "selectivity.path: must be a path, got None; point it at the reduce job's store"
    )
    assert errors[5].startswith("languages[0]: must be one of [") and "got 'de_de'" in errors[5]
    assert errors[6] == (
        "data.path: required for source 'fleurs_raw', got None; point it at the FLEURS root directory"
    )
    assert errors[7].startswith("lid.model_path: required by backend 'fasttext', got None")
    assert "did you mean 'deu'?" in validate({**raw, "languages": ["eng", "de"]})[5]
    raw = {k: v for k, v in raw.items() if k not in ("roles", "steps", "set_sizez", "forcing")}
    errors = validate(raw)
    assert errors == [
        "selectivity.path: must be a path, got None; point it at the reduce job's store",
        errors[1],
        "data.path: required for source 'fleurs_raw', got None; point it at the FLEURS root directory",
        errors[3],
    ]
    assert errors[1].startswith("languages[0]: must be one of [") and "got 'de_de'" in errors[1]
    assert errors[3].startswith("lid.model_path: required by backend 'fasttext', got None")
    with pytest.raises(ConfigError, match="4 config error"):
        load_grid(raw)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_grid(tmp_path / "nope.yaml")


def _config(**kw):
    base = dict(
        MINIMAL, steps=[1, 6], languages=["deu", "jpn"], set_sizes=[10, 20], random_seeds=[0, 1]
    )
    base.update(kw)
    return load_grid(base)


def test_expansion_counts_and_controls():
    c = _config(set_kinds=["top", "bottom", "both"])
    cells = expand(c)
    ids = [cell.id for cell in cells]
    assert len(ids) == len(set(ids))
    selected = [x for x in cells if x.kind == "selected"]
    randoms = [x for x in cells if x.kind == "random"]
    baselines = [x for x in cells if x.kind == "baseline"]
    axes = (
        2,
        2,
        2,
        2,
        2,
        1,
        2,
        1,
    )  # inputs, roles, unit mods, steps, langs, scopes, sizes, forcing
    n_conditions = 1
    for a in axes:
        n_conditions *= a
    assert len(selected) == n_conditions * 3
    assert {b.input_modality for b in baselines} == {"text", "speech"} and len(baselines) == 2
    # sizes 10, 20 (top/bottom) and 20, 40 (both): distinct random sizes 10, 20, 40, two seeds
    assert len(randoms) == n_conditions // 2 * 3 * 2
    for sel in selected:
        match = [
            r
            for r in randoms
            if (
                r.role,
                r.unit_modality,
                r.input_modality,
                r.step,
                r.language,
                r.scope,
                r.forcing,
                r.n_units,
            )
            == (
                sel.role,
                sel.unit_modality,
                sel.input_modality,
                sel.step,
                sel.language,
                sel.scope,
                sel.forcing,
                sel.n_units,
            )
        ]
        assert sorted(r.seed for r in match) == [0, 1]
    assert {(s.set_kind, s.k, s.n_units) for s in selected} >= {("both", 10, 20), ("top", 20, 20)}


def test_cell_ids_stable_and_context_sensitive():
    a = expand(_config())
    assert [x.id for x in a] == [x.id for x in expand(_config())]
    b = expand(_config(max_new_tokens=64))
    assert not {x.id for x in a} & {x.id for x in b}
    cell = a[5]
    assert Cell.from_dict(cell.to_dict()) == cell and Cell.from_dict(cell.to_dict()).id == cell.id
    assert replace(cell, seed=99).id != cell.id
    assert cell.task in (None, "x2en", "en2x")


def test_tasks_group_one_modality_and_cover_every_cell():
    cells = expand(_config())
    grouped = tasks(cells, 7)
    assert all(len(t) <= 7 and len({c.input_modality for c in t}) == 1 for t in grouped)
    assert [c.id for c in itertools.chain.from_iterable(grouped)] == [
        c.id for c in cells
    ] or sorted(c.id for t in grouped for c in t) == sorted(c.id for c in cells)
