"""The JSON Schemas of configs and of the store layout, shipped as package data.

One home for reading a schema (:func:`load_schema`, through ``importlib.resources`` so an
installed wheel validates configs as a checkout does) and for validating a config against
one: every violation at once, one line each (``<path>: <problem>; <fix>``), schema first,
then the config's cross-field checks (run even when the schema found errors, on a copy whose
invalid fields fall back to their defaults, so a user fixes everything in one round); the
schema's defaults filled in afterwards.
"""

from __future__ import annotations

import copy
import difflib
import json
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CONFIG_SCHEMAS = ("pipeline", "collect", "steer")
"""The config schemas, in the order docs/config-reference.md lists them."""


class ConfigWarning(UserWarning):
    """A config that is valid but probably not what was meant (e.g. ``output`` left unset)."""


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
        raise ConfigError(str(p), [f"{_parse_error(p, err)}; fix the syntax there"]) from None


def _parse_error(path: Path, err: Exception) -> str:
    """``<path>:<line>:<column>: does not parse (<problem>)``: one line, 1-based position of
    the problem (YAML's ``problem_mark``, JSON's ``lineno``/``colno``) so an editor jumps to it."""
    if isinstance(err, json.JSONDecodeError):
        return f"{path}:{err.lineno}:{err.colno}: does not parse ({err.msg})"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and start is not mark:
        problem += f", {context} started at line {start.line + 1}, column {start.column + 1}"
    elif context:
        problem += f", {context}"
    if mark is None:
        return f"{path}: does not parse ({problem})"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: does not parse ({problem})"


def validate_against(
    raw: Any, schema_name: str, semantic: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """Every violation of ``raw``: the schema's, one line each sorted by path, then
    ``semantic`` (the cross-field checks), together.

    The cross-field checks run on ``raw`` with every schema-invalid field replaced by its
    default (:func:`_repaired`), so they never see a value of the wrong type; a check that
    still cannot run (a required field is missing) is left out, and a cross-field line about
    a field the schema already reported is not repeated.
    """
    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (list(e.absolute_path), e.message))
    lines = [_format_error(e, schema_name) for e in errors]
    if not isinstance(raw, Mapping):
        return lines
    repaired, replaced = _repaired(raw, schema, [list(e.absolute_path) for e in errors])
    try:
        more = semantic(_with_defaults(repaired, schema))
    except (KeyError, TypeError, ValueError, AttributeError):
        if not lines:  # a valid config must never crash its own checks
            raise
        more = []
    return lines + [m for m in more if _field_of(m) not in replaced]


def _repaired(
    raw: Mapping[str, Any], schema: Mapping[str, Any], paths: list[list[Any]]
) -> tuple[dict[str, Any], set[str]]:
    """``raw`` with the (nested) property holding each schema error set back to its default
    (dropped when it has none); and the dotted names of the properties replaced."""
    out = copy.deepcopy(dict(raw))
    replaced: set[str] = set()
    for path in paths:
        node, spec, names = out, schema, []
        for key in path:
            props = spec.get("properties", {})
            if not isinstance(key, str) or key not in props or not isinstance(node, dict):
                break
            names.append(key)
            if (
                props[key].get("type") == "object"
                and isinstance(node.get(key), dict)
                and (len(names) < len(path))
            ):
                node, spec = node[key], props[key]
                continue
            if "default" in props[key]:
                node[key] = copy.deepcopy(props[key]["default"])
            else:
                node.pop(key, None)
            replaced.add(".".join(names))
            break
    return out, replaced


def _field_of(line: str) -> str:
    """The dotted field a violation line is about (``languages[0]: ...`` -> ``languages``)."""
    return line.split(":", 1)[0].split("[", 1)[0]


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
    name = str(source) if isinstance(source, str | Path) else label
    errors = validate_against(raw, schema_name, semantic)
    if errors:
        raise ConfigError(name, errors)
    schema = load_schema(schema_name)
    _warn_default_output(raw, schema, name)
    return _with_defaults(raw, schema)


def _warn_default_output(raw: Mapping[str, Any], schema: Mapping[str, Any], name: str) -> None:
    """A :class:`ConfigWarning` when the config has an ``output`` field and leaves it unset:
    the default is relative to the output root (:mod:`crossmodal.store.output_root`), so two configs that both leave it out
    write to (and a resume refuses) the same path, and a Ray job's working directory is
    temporary."""
    spec = schema.get("properties", {}).get("output")
    if spec is None or "output" in raw or "default" not in spec:
        return
    from crossmodal.store.output_root import output_root

    root = output_root(raw.get("output_root"))
    where = "working directory" if root == Path.cwd().absolute() else "output root"
    message = (
        f"output: not set, using the default {spec['default']!r} (relative to the {where} "
        f"{str(root)!r}); set output: to a path of your own"
    )
    warnings.warn_explicit(message, ConfigWarning, filename=name, lineno=0)


def _with_defaults(raw: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with every missing property filled from the schema's ``default`` (recursively)."""
    out = dict(raw)
    for key, prop in schema.get("properties", {}).items():
        if key not in out and "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
        if prop.get("type") == "object" and isinstance(out.get(key), Mapping):
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
