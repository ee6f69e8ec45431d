"""Config errors a user can act on in one round: parse errors with line and column, "did you
mean" for language codes, a warning for a defaulted output, the field-level difference behind
a config-hash refusal, and schema and cross-field errors reported together."""

from __future__ import annotations

import warnings

import pytest
import zarr

from crossmodal.collect.config import load_config, validate
from crossmodal.data.languages import (
    SEAMLESS_TO_FLEURS,
    TEXT_OUTPUT_CODES,
    language_error,
    language_hint,
    to_seamless,
    validate_language,
)
from crossmodal.schemas import ConfigError, ConfigWarning, read_file
from crossmodal.schemas.diff import config_diff
from crossmodal.steer.grid import validate as validate_grid
from crossmodal.store.collect_store import _refuse_other_config
from crossmodal.store.layout import LAYOUT_VERSION, StoreError

ORGANISM = {"data": {"source": "organism", "examples_per_language": 4}}


# ---------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "flow.yaml",
            "model: organism\ntasks: [x2en\nsteps: [1]\n",
            r"flow\.yaml:3:6: does not parse \(expected ',' or '\]', but got ':', while parsing "
            r"a flow sequence started at line 2, column 8\); fix the syntax there$",
        ),
        (
            "indent.yaml",
            "model: organism\nsteps: [1]\n  n_bins: 8\n",
            r"indent\.yaml:3:3: does not parse \(expected <block end>, but found '<block "
            r"mapping start>', while parsing a block mapping started at line 1, column 1\)",
        ),
        (
            "comma.json",
            '{"steps": [1],\n "n_bins": 8,}\n',
            r"comma\.json:2:14: does not parse \(Expecting property name enclosed in double "
            r"quotes\); fix the syntax there$",
        ),
    ],
)
def test_parse_error_names_line_and_column(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=r"1 config error\(s\)") as info:
        read_file(tmp_path / name)
    [line] = info.value.errors
    assert "\n" not in line
    assert line.startswith(str(tmp_path / name) + ":")
    with pytest.raises(ConfigError, match=message):
        read_file(tmp_path / name)


# ---------------------------------------------------------------- language codes


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("de", r"'de' is the ISO 639-1 code of German: did you mean 'deu'\?$"),
        ("ger", r"'ger' is an ISO 639 code of Seamless code 'deu': did you mean 'deu'\?$"),
        ("zho", r"'zho' is an ISO 639 code of Seamless code 'cmn': did you mean 'cmn'\?$"),
        ("German", r"'German' is the English name of Seamless code 'deu': did you mean 'deu'\?$"),
        ("farsi", r"'farsi' is an English name of Seamless code 'pes': did you mean 'pes'\?$"),
        ("de-DE", r"'de-DE' is the FLEURS config of Seamless code 'deu': did you mean 'deu'\?$"),
        ("ms", r"'ms' is the ISO 639-1 code of Malay: did you mean 'zlm'\?$"),
        ("ha", r"Hausa is not among SeamlessM4T v2's languages .*cannot be used here$"),
    ],
)
def test_language_aliases_suggest_the_seamless_code(code, hint):
    with pytest.raises(ValueError, match=r"^language must be one of \[.*\(98 in all\), got "):
        validate_language(code, TEXT_OUTPUT_CODES)
    with pytest.raises(ValueError, match=hint):
        validate_language(code, TEXT_OUTPUT_CODES)


def test_language_hint_and_to_seamless():
    assert to_seamless("de") == to_seamless("GERMAN") == to_seamless("de_de") == "deu"
    assert to_seamless("deu") == "deu" and to_seamless("xx") is None
    assert language_hint("de", {"deu", "eng"}) == (
        "'de' is the ISO 639-1 code of German: did you mean 'deu'?"
    )
    assert language_hint("qqqq", {"deu"}, fallback="organism data has no such language") == (
        "organism data has no such language"
    )
    # the reverse direction (a Seamless code where FLEURS configs are expected) is kept
    assert language_hint("deu", SEAMLESS_TO_FLEURS.values()).endswith("use 'de_de'")


def test_language_error_is_the_config_line():
    assert language_error("languages[1]", "de", {"deu", "eng"}) == (
        "languages[1]: must be one of ['deu', 'eng'], got 'de'; 'de' is the ISO 639-1 code of "
        "German: did you mean 'deu'?"
    )
    assert language_error(
        "pivot", "xx", {"eng"}, fallback="organism data has no such language"
    ) == ("pivot: must be one of ['eng'], got 'xx'; organism data has no such language")


# ---------------------------------------------------------------- defaulted output


def test_defaulted_output_warns_once_with_the_path():
    with pytest.warns(
        ConfigWarning,
        match=r"^output: not set, using the default 'results/collect\.zarr' \(relative to the "
        r"working directory '.*'\); set output: to a path of your own$",
    ):
        load_config(ORGANISM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config({**ORGANISM, "output": "elsewhere.zarr"})  # set: no warning


def test_defaulted_output_warns_for_steer_configs_too(tmp_path):
    from crossmodal.steer.grid import load_grid

    raw = {"selectivity": {"path": str(tmp_path / "s.zarr")}}
    with pytest.warns(ConfigWarning, match=r"^output: not set, using the default 'results/steer'"):
        load_grid(raw)


# ---------------------------------------------------------------- config-hash refusal


def _store_of(path, config) -> None:
    attrs = {
        "layout_version": LAYOUT_VERSION,
        "config": config.to_dict(),
        "config_hash": config.hash(),
    }
    zarr.open_group(str(path), mode="w").attrs.update(attrs)


def test_hash_refusal_names_the_changed_fields(tmp_path):
    path = tmp_path / "s.zarr"
    old = load_config({**ORGANISM, "output": str(path)})
    _store_of(path, old)
    _refuse_other_config(path, old)  # same config: resumes
    _refuse_other_config(path, old.with_output("moved.zarr"))  # output is not hashed
    new = load_config({**ORGANISM, "output": str(path), "steps": [1, 6], "n_bins": 64})
    with pytest.raises(
        StoreError,
        match=r"written by a different config \(hash '\w+', this config '\w+'\): "
        r"config\.max_new_tokens: 11 -> 6; config\.n_bins: 256 -> 64; config\.steps: \[1, 6, 11\] -> \[1, 6\]; resume it with "
        r"its own config \(in its attrs\) or choose a new output path$",
    ):
        _refuse_other_config(path, new)


def test_config_diff_nested_and_absent_fields():
    old = {"steps": [1, 6, 11], "data": {"source": "organism", "split": "test"}, "x": 1}
    new = {"steps": [1, 6], "data": {"source": "fleurs_raw", "split": "test"}}
    assert config_diff(old, new) == [
        "config.data.source: 'organism' -> 'fleurs_raw'",
        "config.steps: [1, 6, 11] -> [1, 6]",
        "config.x: 1 -> (absent)",
    ]


# ---------------------------------------------------------------- schema + semantic together


def test_schema_and_cross_field_errors_reported_together():
    raw = {
        "n_bins": "many",  # schema
        "languages": ["deu", "xyz"],  # cross-field: unknown language, pivot missing
        "max_new_tokens": 5,  # cross-field: below the largest step
        "data": {"source": "fleurs_raw"},  # cross-field: needs data.path
    }
    errors = validate(raw)
    assert errors[0] == "n_bins: must be of type integer, got 'many'; fix the value"
    assert errors[1].startswith("languages[1]: must be one of [") and "got 'xyz'" in errors[1]
    assert errors[2:] == [
        "languages: must include the pivot 'eng', got ['deu', 'xyz']; add it",
        "data.path: required for source 'fleurs_raw', got None; point it at the FLEURS root "
        "directory",
        "max_new_tokens: must be >= the largest step 11, got 5; raise it or set null",
    ]
    with pytest.raises(ConfigError, match=r"config: 5 config error\(s\)"):
        load_config(raw)


def test_cross_field_checks_survive_schema_invalid_values():
    # data is not a mapping: the cross-field checks would index into a string; they run on
    # its default instead, and a field the schema reported is not reported twice.
    errors = validate({"data": "fleurs", "max_new_tokens": 5, "languages": "some"})
    assert errors[0] == "data: must be of type object, got 'fleurs'; fix the value"
    assert errors[1] == "languages: must be of type array, got 'some'; fix the value"
    assert errors[2:] == [
        "data.examples_per_language: required for source 'organism', got None; set a number of "
        "sentences per language, e.g. 64",
        "max_new_tokens: must be >= the largest step 11, got 5; raise it or set null",
    ]
    assert not [e for e in errors if e.startswith("languages[")]


def test_steer_schema_and_cross_field_errors_together():
    errors = validate_grid({"steps": [0], "languages": ["de"], "data": {"source": "fleurs_raw"}})
    assert errors[0] == "steps[0]: must be >= 1, got 0; fix the value"
    assert "selectivity.path: must be a path, got None; point it at the reduce job's store" in (
        errors
    )
    assert any(e.startswith("languages[0]: must be one of [") for e in errors)
    assert any(e.startswith("data.path: required for source 'fleurs_raw'") for e in errors)
