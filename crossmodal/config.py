"""The collect config: validated once at the edge, then a frozen, typed dataclass.

``schemas/collect.schema.json`` is the single source of field names, defaults and
descriptions. :func:`load_config` reads YAML or JSON, reports EVERY violation at once (schema
and semantic checks alike, one line each, ``<path>: <problem>; <fix>``), fills the schema's
defaults and returns a :class:`CollectConfig`. Nothing past this module sees a raw dict.

The config hash (:meth:`CollectConfig.hash`) covers every field that changes the numbers in
the store; ``output`` and ``actors`` are left out, so a run can be resumed from another path
copy or with more (or fewer) actors.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from crossmodal.languages import (
    SEAMLESS_TO_FLEURS,
    SPEECH_INPUT_CODES,
    TEXT_OUTPUT_CODES,
    format_allowed,
)
from crossmodal.units import resolve_families

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "collect.schema.json"
ORGANISM_SOURCE = "organism"
FLEURS_SOURCES = ("fleurs_raw", "fleurs_parquet")
_UNHASHED = ("output", "actors")


class ConfigError(ValueError):
    """A config with one or more violations; ``errors`` holds one line per violation."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} config error(s):\n{lines}")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from (see the schema's ``data`` descriptions)."""

    source: str
    path: str | None
    split: str
    audio_root: str | None
    examples_per_language: int | None


@dataclass(frozen=True)
class ActorsConfig:
    """Ray resources and fault tolerance of the collector actors."""

    count: int
    num_gpus: float
    num_cpus: float
    max_restarts: int
    max_task_retries: int


@dataclass(frozen=True)
class CollectConfig:
    """A validated collect config: ``languages`` resolved (never ``all``, pivot first),
    ``families`` expanded (``encoder`` -> speech_encoder, text_encoder) in canonical order."""

    model: str
    revision: str | None
    dtype: str
    languages: tuple[str, ...]
    pivot: str
    tasks: tuple[str, ...]
    modalities: tuple[str, ...]
    steps: tuple[int, ...]
    families: tuple[str, ...]
    poolings: tuple[str, ...]
    n_bins: int
    pilot_size: int
    batch_size: int
    max_new_tokens: int
    generator: str
    seed: int
    data: DataConfig
    output: str
    shard_size: int
    keep_parts: bool
    actors: ActorsConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data (tuples become lists); round-trips through :func:`from_dict`."""
        return json.loads(json.dumps(asdict(self)))

    def hash(self) -> str:
        """sha256 of the fields that determine the store's numbers (not output, not actors)."""
        content = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_output(self, output: str | Path) -> CollectConfig:
        return replace(self, output=str(output))


def read_schema(path: Path) -> dict[str, Any]:
    """A JSON Schema of ``schemas/`` (a fresh copy, safe to mutate)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"schema {str(path)!r} not found; run from a checkout of crossmodal"
        )
    return json.loads(path.read_text())


def load_schema() -> dict[str, Any]:
    """The collect schema (a fresh copy, safe to mutate)."""
    return read_schema(SCHEMA_PATH)


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


def validate(raw: Any) -> list[str]:
    """All violations of ``raw`` (schema first, then cross-field checks), one line each."""
    return validate_against(raw, SCHEMA_PATH, _semantic_errors)


def validate_against(
    raw: Any, schema_path: Path, semantic: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """Every violation of ``raw``: the schema's, one line each sorted by path; only when
    there are none, ``semantic`` (the cross-field checks) on ``raw`` with defaults filled."""
    schema = read_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (list(e.absolute_path), e.message))
    lines = [_format_error(e, schema_path.name) for e in errors]
    if lines or not isinstance(raw, Mapping):
        return lines
    return semantic(_with_defaults(raw, schema))


def validate_file(path: str | Path) -> list[str]:
    """What ``crossmodal validate CONFIG`` prints: every violation, or ``[]`` when valid."""
    try:
        return validate(read_file(path))
    except ConfigError as err:
        return err.errors


def load_config(source: str | Path | Mapping[str, Any]) -> CollectConfig:
    """Validate a config file (or an already parsed mapping) and freeze it.

    Raises:
        ConfigError: with every violation, one per line.
    """
    return from_dict(load_validated(source, SCHEMA_PATH, _semantic_errors, label="config"))


def load_validated(
    source: str | Path | Mapping[str, Any],
    schema_path: Path,
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
    errors = validate_against(raw, schema_path, semantic)
    if errors:
        raise ConfigError(str(source) if isinstance(source, str | Path) else label, errors)
    return _with_defaults(raw, read_schema(schema_path))


def from_dict(values: Mapping[str, Any]) -> CollectConfig:
    """Freeze a complete, valid mapping (defaults filled); resolves ``languages: all``."""
    v = dict(values)
    languages = _resolve_languages(v["languages"], v["pivot"], v["data"]["source"])
    steps = tuple(int(s) for s in v["steps"])
    return CollectConfig(
        model=v["model"],
        revision=v["revision"],
        dtype=v["dtype"],
        languages=languages,
        pivot=v["pivot"],
        tasks=tuple(v["tasks"]),
        modalities=tuple(v["modalities"]),
        steps=steps,
        families=resolve_families(v["families"]),
        poolings=tuple(v["poolings"]),
        n_bins=int(v["n_bins"]),
        pilot_size=int(v["pilot_size"]),
        batch_size=int(v["batch_size"]),
        max_new_tokens=int(v["max_new_tokens"] or max(steps)),
        generator=v["generator"],
        seed=int(v["seed"]),
        data=DataConfig(**v["data"]),
        output=str(v["output"]),
        shard_size=int(v["shard_size"]),
        keep_parts=bool(v["keep_parts"]),
        actors=ActorsConfig(**v["actors"]),
    )


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
    return f"{where}: {err.message}; see schemas/{schema_name}"


def _known_languages(source: str) -> frozenset[str]:
    if source == ORGANISM_SOURCE:
        from crossmodal.organism import ORGANISM_LANGUAGES

        return frozenset(ORGANISM_LANGUAGES)
    return frozenset(SEAMLESS_TO_FLEURS)


def _resolve_languages(languages: Any, pivot: str, source: str) -> tuple[str, ...]:
    """``all`` -> every language of the source; the pivot always first, the rest sorted."""
    chosen = set(_known_languages(source)) if languages == "all" else set(languages)
    return (pivot, *sorted(chosen - {pivot}))


def _semantic_errors(v: Mapping[str, Any]) -> list[str]:
    """Cross-field checks the schema cannot express."""
    errors: list[str] = []
    data = v["data"]
    known = _known_languages(data["source"])
    listed = v["languages"] if v["languages"] != "all" else sorted(known)
    for i, code in enumerate(listed):
        if code not in known:
            errors.append(
                f"languages[{i}]: must be one of {format_allowed(known)}, got {code!r}; "
                f"{data['source']} data has no such language"
            )
    if v["pivot"] not in known:
        errors.append(
            f"pivot: must be one of {format_allowed(known)}, got {v['pivot']!r}; "
            "use a language of the data source (eng)"
        )
    elif v["languages"] != "all" and v["pivot"] not in listed:
        errors.append(f"languages: must include the pivot {v['pivot']!r}, got {listed!r}; add it")
    if data["source"] in FLEURS_SOURCES and not data["path"]:
        errors.append(
            f"data.path: required for source {data['source']!r}, got None; "
            "point it at the FLEURS root directory"
        )
    if data["source"] == ORGANISM_SOURCE and data["examples_per_language"] is None:
        errors.append(
            "data.examples_per_language: required for source 'organism', got None; "
            "set a number of sentences per language, e.g. 64"
        )
    if data["source"] == ORGANISM_SOURCE and data["audio_root"] is not None:
        errors.append(
            f"data.audio_root: unused by source 'organism', got {data['audio_root']!r}; "
            "remove it or use a FLEURS source"
        )
    mnt = v["max_new_tokens"]
    if mnt is not None and mnt < max(v["steps"]):
        errors.append(
            f"max_new_tokens: must be >= the largest step {max(v['steps'])}, got {mnt!r}; "
            "raise it or set null"
        )
    if v["tasks"] == ["asr"] and "speech" not in v["modalities"]:
        errors.append(f"modalities: asr runs on speech only, got {v['modalities']!r}; add 'speech'")
    if v["pivot"] not in TEXT_OUTPUT_CODES and {"x2en"} & set(v["tasks"]):
        errors.append(
            f"pivot: x2en must write the pivot as text, got {v['pivot']!r}; "
            f"use one of {format_allowed(TEXT_OUTPUT_CODES)}"
        )
    if (
        v["pivot"] not in SPEECH_INPUT_CODES
        and "en2x" in v["tasks"]
        and "speech" in v["modalities"]
        and data["source"] != ORGANISM_SOURCE
    ):
        errors.append(
            f"pivot: en2x speech needs pivot speech input, got {v['pivot']!r}; "
            "pick a speech-input language"
        )
    return errors
