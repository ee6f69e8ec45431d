"""The JSON Schemas of configs and of the store layout, shipped as package data.

One home for reading a schema (:func:`load_schema`, through ``importlib.resources`` so an
installed wheel validates configs as a checkout does) and for validating a config against
one: every violation at once, one line each (``<path>: <problem>; <fix>``), schema first,
then the config's cross-field checks; the schema's defaults filled in afterwards.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CONFIG_SCHEMAS = ("pipeline", "collect", "steer")
"""The config schemas, in the order docs/config-reference.md lists them."""


class ConfigError(ValueError):
    """A config with one or more violations; ``errors`` holds one line per violation."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} config error(s):\n{lines}")


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``name`` (``collect``, ``steer``, ``pipeline``, ``store``): a fresh copy,
    safe to mutate."""
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


def read_file(path: str | Path) -> Any:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file into plain data.

    Raises:
        ConfigError: the file is missing or does not parse (one line naming it).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), [f"{p}: file not found; pass the path of a YAML or JSON config"])
    try:
        if p.suffix.lower() == ".json":
            return json.loads(p.read_text())
        return yaml.safe_load(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(str(p), [f"{p}: does not parse ({first}); fix the syntax"]) from None


def validate_against(
    raw: Any, schema_name: str, semantic: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """Every violation of ``raw``: the schema's, one line each sorted by path; only when
    there are none, ``semantic`` (the cross-field checks) on ``raw`` with defaults filled."""
    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (list(e.absolute_path), e.message))
    lines = [_format_error(e, schema_name) for e in errors]
    if lines or not isinstance(raw, Mapping):
        return lines
    return semantic(_with_defaults(raw, schema))


def load_validated(
    source: str | Path | Mapping[str, Any],
    schema_name: str,
    semantic: Callable[[dict[str, Any]], list[str]],
    *,
    label: str,
) -> dict[str, Any]:
    """Read (a path) and validate a config, then fill the schema's defaults: the complete
    mapping a frozen config is built from. ``label`` names a mapping source in the error.

    Raises:
        ConfigError: with every violation (:func:`validate_against`), one per line.
    """
    raw = read_file(source) if isinstance(source, str | Path) else source
    errors = validate_against(raw, schema_name, semantic)
    if errors:
        raise ConfigError(str(source) if isinstance(source, str | Path) else label, errors)
    return _with_defaults(raw, load_schema(schema_name))


def _with_defaults(raw: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with every missing property filled from the schema's ``default`` (recursively)."""
    out = dict(raw)
    for key, prop in schema.get("properties", {}).items():
        if key not in out:
            out[key] = copy.deepcopy(prop["default"])
        if prop.get("type") == "object" and isinstance(out[key], Mapping):
            out[key] = _with_defaults(out[key], prop)
    return out


def _where(path: Any) -> str:
    parts = ""
    for p in path:
        parts += f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p))
    return parts or "(top level)"


def _format_error(err: jsonschema.ValidationError, schema_name: str) -> str:
    """One line: ``<path>: <problem>; <fix>``."""
    if err.validator == "anyOf" and err.context:
        # languages: report the branch that got furthest, not "is not valid under any".
        deepest = max(err.context, key=lambda e: (len(e.absolute_path), e.validator != "const"))
        return _format_error(deepest, schema_name)
    where = _where(err.absolute_path)
    value, rule = err.instance, err.validator_value
    if err.validator == "enum":
        return f"{where}: must be one of {rule}, got {value!r}; pick one of the allowed values"
    if err.validator == "const":
        return f"{where}: must be {rule!r} or a list, got {value!r}; fix the value"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        close = [m for k in extra for m in difflib.get_close_matches(k, allowed, n=1)]
        hint = f"did you mean {close[0]!r}?" if close else f"allowed: {allowed}"
        return f"{where}: unknown field(s) {extra}; {hint}"
    if err.validator == "type":
        return f"{where}: must be of type {rule}, got {value!r}; fix the value"
    if err.validator in ("minimum", "maximum", "exclusiveMinimum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">"}[err.validator]
        return f"{where}: must be {word} {rule}, got {value!r}; fix the value"
    if err.validator in ("minItems", "uniqueItems", "minLength"):
        need = {
            "minItems": f"at least {rule} item(s)",
            "uniqueItems": "no duplicates",
            "minLength": "a non-empty string",
        }[err.validator]
        return f"{where}: must have {need}, got {value!r}; fix the list"
    return f"{where}: {err.message}; see crossmodal/schemas/{schema_name}.schema.json"
