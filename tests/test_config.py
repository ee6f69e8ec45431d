"""The collect config: schema, all-errors-at-once validation, defaults, freezing, hashing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from crossmodal.collect.config import from_dict, load_config, validate
from crossmodal.schemas import ConfigError, load_schema, read_file

CONFIGS = sorted(  # collect configs say so in their header (configs/ also holds other jobs')
    p
    for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
    if "crossmodal/schemas/collect.schema.json" in p.read_text()
)
FLEURS = {"data": {"source": "fleurs_raw", "path": "data/fleurs"}}


def validate_file(path: Path) -> list[str]:
    """What ``crossmodal validate CONFIG`` prints: every violation, or ``[]`` when valid."""
    try:
        return validate(read_file(path))
    except ConfigError as err:
        return err.errors


def _walk(schema: dict, where: str = ""):
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}{name}", prop
        yield from _walk(prop, f"{where}{name}.")


def test_every_field_has_description_and_default():
    schema = load_schema("collect")
    fields = list(_walk(schema))
    assert len(fields) > 20
    for name, prop in fields:
        assert prop.get("description"), name
        assert "default" in prop, name


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    assert validate_file(path) == []
    config = load_config(path)
    assert config.languages[0] == config.pivot
    first = path.read_text().splitlines()[:8]
    assert any("collect" in line and line.startswith("#") for line in first), "says how to run it"


def test_shipped_config_set():
    assert {p.name for p in CONFIGS} >= {"organism.yaml", "reference.yaml", "fleurs-all.yaml"}
    ref = load_config(CONFIGS[[p.name for p in CONFIGS].index("reference.yaml")])
    assert ref.model == "facebook/seamless-m4t-v2-large"
    assert ref.languages == ("eng", "cmn", "deu", "fra", "jpn", "spa")
    assert ref.steps == (1, 6, 11) and ref.families == ("decoder",)
    assert ref.max_new_tokens == 11  # null -> the largest step


def test_all_errors_at_once_one_line_each():
    raw = {
        "tasks": ["x2en", "x2fr"],
        "steps": [0, 6],
        "n_bins": "many",
        "modalities": [],
        "actors": {"num_cpus": 0, "num_gpu": 1},
        "colour": "red",
        "languages": ["eng", 5],
    }
    errors = validate(raw)
    assert all("\n" not in e for e in errors)
    expected = [
        r"^\(top level\): unknown field\(s\) \['colour'\]",
        r"^actors: unknown field\(s\) \['num_gpu'\]; did you mean 'num_gpus'\?",
        r"^actors\.num_cpus: must be > 0, got 0",
        r"^languages\[1\]: must be of type string, got 5",
        r"^modalities: must have at least 1 item\(s\), got \[\]",
        r"^n_bins: must be of type integer, got 'many'",
        r"^steps\[0\]: must be >= 1, got 0",
        r"^tasks\[1\]: must be one of \['x2en', 'en2x', 'asr'\], got 'x2fr'",
        # the cross-field checks run too (the default source 'organism' needs a count)
        r"^data\.examples_per_language: required for source 'organism', got None",
    ]
    assert len(errors) == len(expected), errors
    for pattern in expected:
        assert any(__import__("re").search(pattern, e) for e in errors), (pattern, errors)
    with pytest.raises(ConfigError, match=r"config: 9 config error\(s\)") as info:
        load_config(raw)
    assert info.value.errors == errors


def test_semantic_errors_all_at_once():
    raw = {
        "languages": ["deu", "xyz"],
        "max_new_tokens": 5,
        "data": {"source": "fleurs_raw"},
    }
    errors = validate(raw)
    assert errors == [
        errors[0],
        "languages: must include the pivot 'eng', got ['deu', 'xyz']; add it",
        "data.path: required for source 'fleurs_raw', got None; point it at the FLEURS root directory",
        "max_new_tokens: must be >= the largest step 11, got 5; raise it or set null",
    ]
    assert errors[0].startswith("languages[1]: must be one of [") and "got 'xyz'" in errors[0]


def test_defaults_and_freezing():
    config = load_config(FLEURS)
    assert config.model == "organism" or config.model  # schema default
    assert config.tasks == ("x2en", "en2x", "asr")
    assert config.poolings == ("prefix_mean", "last")
    assert config.n_bins == 256 and config.data.split == "test"
    assert config.actors.count == 1 and config.actors.num_cpus == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_bins = 3  # type: ignore[misc]
    assert from_dict({**config.to_dict(), "languages": list(config.languages)}) == config


def test_languages_all_and_families_alias():
    config = load_config({**FLEURS, "languages": "all", "families": ["encoder", "decoder"]})
    assert config.languages[0] == "eng" and len(config.languages) == 96
    assert list(config.languages[1:]) == sorted(config.languages[1:])
    assert config.families == ("decoder", "speech_encoder", "text_encoder")


def test_hash_ignores_output_and_actors_only():
    base = load_config(FLEURS)
    same = load_config({**FLEURS, "output": "elsewhere.zarr", "actors": {"count": 4}})
    assert base.hash() == same.hash()
    assert base.with_output("x").hash() == base.hash()
    assert load_config({**FLEURS, "steps": [1, 6]}).hash() != base.hash()
    assert load_config({**FLEURS, "batch_size": 8}).hash() != base.hash()


def test_files_yaml_json_and_bad_syntax(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(FLEURS))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(FLEURS))
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("tasks: [x2en\n")
    [line] = validate_file(tmp_path / "bad.yaml")
    assert "does not parse" in line and "\n" not in line
    assert validate_file(tmp_path / "missing.yaml")[0].endswith(
        "file not found; pass the path of a YAML or JSON config"
    )
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert validate_file(tmp_path / "list.yaml") == [
        "(top level): must be of type object, got [1]; fix the value"
    ]


def test_storage_options_validated_unhashed_and_never_credentials():
    opts = {"endpoint_url": "http://127.0.0.1:9000", "region": "us-east-1"}
    config = load_config({**FLEURS, "output": "s3://bucket/x.zarr", "storage_options": opts})
    assert config.storage_options.endpoint_url == "http://127.0.0.1:9000"
    assert config.storage_options.fsspec() == {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    assert config.hash() == load_config(FLEURS).hash()
    assert from_dict(config.to_dict()) == config
    assert "storage_options" not in load_config(FLEURS).to_dict()  # local attrs unchanged
    secret = {"storage_options": {"aws_secret_access_key": "x", "endpoint_url": "ftp://h"}}
    errors = validate({**FLEURS, **secret})
    assert len(errors) == 2 and all(e.startswith("storage_options") for e in errors), errors


def test_pipeline_storage_options_override_the_stage_configs(tmp_path):
    from crossmodal.pipeline import load_pipeline

    stage = {**FLEURS, "output": "s3://b/c.zarr", "storage_options": {"region": "eu-west-1"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(stage))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"collect": "c.yaml"}))
    assert load_pipeline(tmp_path / "p.yaml").collect.storage_options.region == "eu-west-1"
    assert load_pipeline(tmp_path / "p.yaml").storage_options.region == "eu-west-1"
    pipe = {"collect": "c.yaml", "storage_options": {"endpoint_url": "http://h:9000"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe))
    loaded = load_pipeline(tmp_path / "p.yaml")
    assert loaded.collect.storage_options.endpoint_url == "http://h:9000"
    assert loaded.collect.storage_options.region is None
