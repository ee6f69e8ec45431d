"""The steering grid: a validated, frozen config and its expansion into cells.

``crossmodal/schemas/steer.schema.json`` holds every field's description and default.
:func:`load_grid` reports every violation at once (one line each), then returns a frozen
:class:`SteerConfig`; :func:`expand` turns it into :class:`Cell` objects.

A cell is one intervention run over the config's inputs. The expansion ALWAYS adds:
- one unforced ``baseline`` cell per input modality, and
- for every ``selected`` cell, ``random`` cells of the same size, scope, role, modality,
  step, language and forcing kind, one per seed in ``random_seeds`` (deduplicated: top and
  bottom sets of the same k share their random controls).
Cell ids hash the cell's fields plus the run context (model, the selectivity's content
digest, inputs, decoding and LID settings), so a re-run skips exactly the cells whose
results would be the same.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from crossmodal.collect.config import ActorsConfig
from crossmodal.data.languages import TEXT_OUTPUT_CODES, language_error
from crossmodal.schemas import load_validated, validate_against
from crossmodal.steer.lid import PATH_BACKENDS
from crossmodal.store.location import StorageOptions

ROLE_TASK = {"representation": "x2en", "control": "en2x"}
"""Role -> the selectivity task its sets come from (docs/method.md, "Roles")."""
NOMINAL_SIZE = {"top": 1, "bottom": 1, "both": 2}
"""Units per set, in multiples of k (top-k and bottom-k are disjoint when the scope has 2k)."""


@dataclass(frozen=True)
class SelectivitySource:
    path: str | None
    group: str | None


@dataclass(frozen=True)
class DataSpec:
    source: str
    path: str | None
    split: str
    audio_root: str | None
    seed: int


@dataclass(frozen=True)
class LidSpec:
    backends: tuple[str, ...]
    model_path: str | None


@dataclass(frozen=True)
class SteerConfig:
    """A validated steer config (see the schema for each field)."""

    model: str
    revision: str | None
    dtype: str
    selectivity: SelectivitySource
    roles: tuple[str, ...]
    unit_modalities: tuple[str, ...]
    input_modalities: tuple[str, ...]
    steps: tuple[int, ...]
    languages: tuple[str, ...]
    set_kinds: tuple[str, ...]
    scopes: tuple[str, ...]
    set_sizes: tuple[int, ...]
    forcing: tuple[str, ...]
    random_seeds: tuple[int, ...]
    n_inputs: int
    max_new_tokens: int
    input_language: str
    output_language: str
    data: DataSpec
    lid: LidSpec
    batch_size: int
    cells_per_task: int
    output: str
    actors: ActorsConfig  # the collect config's: the same actor resources and retries
    output_root: str | None = None  # relative output and selectivity.path resolve here
    storage_options: StorageOptions = field(default_factory=StorageOptions)
    allow_empty_sets: bool = False
    speech_last_frame: str = "drop"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data; :func:`load_grid` accepts it back. Default
        ``storage_options`` are left out (grid.json stays as before)."""
        out = json.loads(json.dumps(asdict(self)))
        if self.storage_options == StorageOptions():
            del out["storage_options"]
        return out

    def context(self, selectivity: str = "") -> str:
        """Digest of what every cell's outputs depend on besides the cell's own fields.

        ``selectivity``: the content digest of the selectivity Dataset
        (:func:`crossmodal.steer.source.selectivity_digest`), NOT its path: a re-reduced store
        gives new ids, a moved one the same ids.
        """
        d = {**self.to_dict(), "selectivity": selectivity}
        keep = (
            "model",
            "revision",
            "dtype",
            "selectivity",
            "n_inputs",
            "max_new_tokens",
            "input_language",
            "output_language",
            "data",
            "lid",
        )
        if self.speech_last_frame != "drop":  # the default: ids made before it stay
            keep += ("speech_last_frame",)
        text = json.dumps({k: d[k] for k in keep}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def measured_languages(self) -> tuple[str, ...]:
        """Languages whose LID probability is stored per output: cells' and the run's."""
        return tuple(dict.fromkeys((*self.languages, self.input_language, self.output_language)))


@dataclass(frozen=True)
class Cell:
    """One intervention run over the grid's inputs.

    ``kind`` is ``selected`` (a selected set), ``random`` (a random control: ``set_kind`` is
    ``random`` and ``seed`` set) or ``baseline`` (unforced: only ``input_modality``).
    ``n_units`` is the nominal set size (k, or 2k for ``both``).
    """

    kind: str
    input_modality: str
    role: str | None = None
    unit_modality: str | None = None
    step: int | None = None
    language: str | None = None
    set_kind: str | None = None
    scope: str | None = None
    k: int | None = None
    n_units: int = 0
    forcing: str | None = None
    seed: int | None = None
    context: str = field(default="", repr=False)

    @property
    def id(self) -> str:
        """Stable 16-hex id: sha256 of every field (context included)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def task(self) -> str | None:
        """The selectivity task the units come from (x2en or en2x)."""
        return ROLE_TASK.get(self.role or "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Its name in a failure line."""
        return f"cell {self.id} ({self.kind}, {self.input_modality} input)"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Cell:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def validate(raw: Any) -> list[str]:
    """Every violation of ``raw``, schema first then cross-field checks, one line each."""
    return validate_against(raw, "steer", _semantic_errors)


def load_grid(source: str | Path | Mapping[str, Any]) -> SteerConfig:
    """Validate a YAML/JSON config (or a parsed mapping) and freeze it.

    Raises:
        ConfigError: with every violation, one per line.
    """
    v = load_validated(source, "steer", _semantic_errors, label="steer config")
    tuples = (
        "roles",
        "unit_modalities",
        "input_modalities",
        "steps",
        "languages",
        "set_kinds",
        "scopes",
        "set_sizes",
        "forcing",
        "random_seeds",
    )
    return SteerConfig(
        **{k: v[k] for k in ("model", "revision", "dtype", "n_inputs", "max_new_tokens")},
        **{k: tuple(v[k]) for k in tuples},
        input_language=v["input_language"],
        output_language=v["output_language"],
        selectivity=SelectivitySource(**v["selectivity"]),
        data=DataSpec(**v["data"]),
        lid=LidSpec(backends=tuple(v["lid"]["backends"]), model_path=v["lid"]["model_path"]),
        batch_size=v["batch_size"],
        cells_per_task=v["cells_per_task"],
        output=v["output"],
        actors=ActorsConfig(**v["actors"]),
        output_root=v["output_root"],
        storage_options=StorageOptions.of(v.get("storage_options")),
        allow_empty_sets=v["allow_empty_sets"],
        speech_last_frame=v["speech_last_frame"],
    )


def _semantic_errors(v: Mapping[str, Any]) -> list[str]:
    """Cross-field checks the schema cannot express."""
    errors: list[str] = []
    if not v["selectivity"]["path"]:
        errors.append(
            "selectivity.path: must be a path, got None; point it at the reduce job's store"
        )
    for i, code in enumerate(v["languages"]):
        if code not in TEXT_OUTPUT_CODES:
            fix = "use Seamless codes the decoder can write"
            errors.append(language_error(f"languages[{i}]", code, TEXT_OUTPUT_CODES, fix))
    for key in ("input_language", "output_language"):
        if v[key] not in TEXT_OUTPUT_CODES:
            fix = "use a Seamless language code"
            errors.append(language_error(key, v[key], TEXT_OUTPUT_CODES, fix))
    if v["data"]["source"] != "organism" and not v["data"]["path"]:
        errors.append(
            f"data.path: required for source {v['data']['source']!r}, got None; "
            "point it at the FLEURS root directory"
        )
    needs_path = [b for b in v["lid"]["backends"] if b in PATH_BACKENDS]
    if needs_path and not v["lid"]["model_path"]:
        errors.append(
            f"lid.model_path: required by backend {needs_path[0]!r}, got None; pass the path of "
            "lid.176.bin or GlotLID's model.bin (never downloaded)"
        )
    if len(needs_path) > 1:
        errors.append(
            f"lid.backends: must hold at most one of {list(PATH_BACKENDS)}, got {needs_path}; "
            "they share lid.model_path"
        )
    return errors


def expand(config: SteerConfig, selectivity: str = "") -> list[Cell]:
    """All cells of the grid: selected sets, their random controls, and the baselines.

    ``selectivity``: the selectivity's content digest the ids hash (the driver passes
    :func:`crossmodal.steer.source.selectivity_digest`; "" only counts cells, as
    ``--dry-run`` does). Order: per input modality, the baseline first, then selected cells
    each followed by its random controls (those not already listed); ids are unique.
    """
    ctx = config.context(selectivity)
    cells: dict[str, Cell] = {}
    axes = ("role", "unit_modality", "step", "language", "scope", "k", "forcing", "set_kind")
    values = (
        config.roles,
        config.unit_modalities,
        config.steps,
        config.languages,
        config.scopes,
        config.set_sizes,
        config.forcing,
        config.set_kinds,
    )
    for input_modality in config.input_modalities:
        baseline = Cell("baseline", input_modality, context=ctx)
        cells.setdefault(baseline.id, baseline)
        for combo in itertools.product(*values):
            f = dict(zip(axes, combo, strict=True))
            n = NOMINAL_SIZE[f["set_kind"]] * f["k"]
            shared = {k: v for k, v in f.items() if k not in ("k", "set_kind")}
            group = [Cell("selected", input_modality, **f, n_units=n, context=ctx)]
            group += [
                Cell(
                    "random",
                    input_modality,
                    **shared,
                    set_kind="random",
                    k=n,
                    n_units=n,
                    seed=seed,
                    context=ctx,
                )
                for seed in config.random_seeds
            ]
            for cell in group:
                cells.setdefault(cell.id, cell)
    return list(cells.values())


def tasks(cells: list[Cell], cells_per_task: int) -> list[list[Cell]]:
    """Cells grouped into tasks of at most ``cells_per_task``, one input modality per task."""
    by_modality: dict[str, list[Cell]] = {}
    for cell in cells:
        by_modality.setdefault(cell.input_modality, []).append(cell)
    out = []
    for group in by_modality.values():
        out.extend(group[i : i + cells_per_task] for i in range(0, len(group), cells_per_task))
    return out


def describe(config: SteerConfig, cells: list[Cell]) -> str:
    """One paragraph: cells by kind, tasks, generations (what ``--dry-run`` prints)."""
    kinds = {k: sum(1 for c in cells if c.kind == k) for k in ("selected", "random", "baseline")}
    n_tasks = len(tasks(cells, config.cells_per_task))
    return (
        f"steering grid: {len(cells)} cells ({kinds['selected']} selected, {kinds['random']} "
        f"random controls, {kinds['baseline']} baselines) in {n_tasks} tasks; "
        f"{len(cells) * config.n_inputs} generations of up to {config.max_new_tokens} tokens; "
        f"results in {config.output}"
    )
