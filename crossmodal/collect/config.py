"""The collect config: validated once at the edge, then a frozen, typed dataclass.

``crossmodal/schemas/collect.schema.json`` is the single source of field names, defaults and
descriptions. :func:`load_config` reads YAML or JSON, reports EVERY violation at once (schema
and semantic checks alike, one line each, ``<path>: <problem>; <fix>``), fills the schema's
defaults and returns a :class:`CollectConfig`. Nothing past this module sees a raw dict.

The config hash (:meth:`CollectConfig.hash`) covers every field that changes the numbers in
the store; ``output``, ``output_root``, ``storage_options`` and ``actors`` are left out, so a run can be resumed from another path
copy or with more (or fewer) actors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from crossmodal.data.languages import (
    SEAMLESS_TO_FLEURS,
    SPEECH_INPUT_CODES,
    TEXT_OUTPUT_CODES,
    format_allowed,
    language_error,
)
from crossmodal.model.units import resolve_families
from crossmodal.schemas import load_validated, validate_against
from crossmodal.store.location import StorageOptions

ORGANISM_SOURCE = "organism"
FLEURS_SOURCES = ("fleurs_raw", "fleurs_parquet")
_UNHASHED = ("output", "output_root", "storage_options", "actors")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from (see the schema's ``data`` descriptions)."""

    source: str
    path: str | None
    split: str
    audio_root: str | None
    examples_per_language: int | None
    max_audio_seconds: float = 60.0
    max_text_chars: int = 1000

    @property
    def bounds(self) -> Any:
        """The :class:`~crossmodal.data.sources.Bounds` the data source applies."""
        from crossmodal.data.sources import Bounds

        return Bounds(self.max_audio_seconds, self.max_text_chars)


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
    speech_last_frame: str = "drop"
    output_root: str | None = None
    storage_options: StorageOptions = field(default_factory=StorageOptions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data (tuples become lists); round-trips through :func:`from_dict`.
        Default ``storage_options`` are left out (a local store's attrs stay as before)."""
        out = json.loads(json.dumps(asdict(self)))
        if self.storage_options == StorageOptions():
            del out["storage_options"]
        return out

    def hash(self) -> str:
        """sha256 of the fields that determine the store's numbers (not output, not actors)."""
        content = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        if content["speech_last_frame"] == "drop":  # the default: hashes made before it stay
            del content["speech_last_frame"]
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_output(self, output: str | Path) -> CollectConfig:
        return replace(self, output=str(output))


def validate(raw: Any) -> list[str]:
    """All violations of ``raw`` (schema first, then cross-field checks), one line each."""
    return validate_against(raw, "collect", _semantic_errors)


def load_config(source: str | Path | Mapping[str, Any]) -> CollectConfig:
    """Validate a config file (or an already parsed mapping) and freeze it.

    Raises:
        ConfigError: with every violation, one per line.
    """
    return from_dict(load_validated(source, "collect", _semantic_errors, label="config"))


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
        speech_last_frame=v.get("speech_last_frame", "drop"),
        output_root=v.get("output_root"),
        storage_options=StorageOptions.of(v.get("storage_options")),
    )


def _known_languages(source: str) -> frozenset[str]:
    if source == ORGANISM_SOURCE:
        from crossmodal.organism import ORGANISM_LANGUAGES

        return frozenset(ORGANISM_LANGUAGES)
    return frozenset(SEAMLESS_TO_FLEURS)


def _resolve_languages(languages: Any, pivot: str, source: str) -> tuple[str, ...]:
    """``all`` -> every language of the source; the pivot always first, the rest sorted."""
    chosen = set(_known_languages(source)) if languages == "all" else set(languages)
    return (pivot, *sorted(chosen - {pivot}))


def _model_errors(model: str) -> list[str]:
    """``random:<size>`` must name a size :mod:`crossmodal.model.load` builds."""
    if not model.startswith("random:"):
        return []
    from crossmodal.model.load import RANDOM_PREFIX, RANDOM_SIZES

    allowed = [RANDOM_PREFIX + k for k in sorted(RANDOM_SIZES)]
    if model in allowed:
        return []
    return [
        f"model: must be one of {allowed} for random weights, got {model!r}; "
        "use one of them or a directory of python -m crossmodal.model.make_random"
    ]


def _semantic_errors(v: Mapping[str, Any]) -> list[str]:
    """Cross-field checks the schema cannot express."""
    return [
        *_model_errors(v["model"]),
        *_language_errors(v),
        *_data_errors(v["data"]),
        *_task_errors(v),
    ]


def _language_errors(v: Mapping[str, Any]) -> list[str]:
    """Languages and the pivot against what the data source has."""
    source = v["data"]["source"]
    known = _known_languages(source)
    listed = v["languages"] if v["languages"] != "all" else sorted(known)
    errors = [
        language_error(f"languages[{i}]", code, known, f"{source} data has no such language")
        for i, code in enumerate(listed)
        if code not in known
    ]
    if v["pivot"] not in known:
        fix = "use a language of the data source (eng)"
        errors.append(language_error("pivot", v["pivot"], known, fix))
    elif v["languages"] != "all" and v["pivot"] not in listed:
        errors.append(f"languages: must include the pivot {v['pivot']!r}, got {listed!r}; add it")
    return errors


def _data_errors(data: Mapping[str, Any]) -> list[str]:
    """The fields each data source needs, or does not use."""
    errors = []
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
    return errors


def _task_errors(v: Mapping[str, Any]) -> list[str]:
    """Steps, tasks and modalities that cannot run together."""
    errors = []
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
    speech_pivot = "en2x" in v["tasks"] and "speech" in v["modalities"]
    if (
        speech_pivot
        and v["pivot"] not in SPEECH_INPUT_CODES
        and v["data"]["source"] != ORGANISM_SOURCE
    ):
        errors.append(
            f"pivot: en2x speech needs pivot speech input, got {v['pivot']!r}; "
            "pick a speech-input language"
        )
    return errors
