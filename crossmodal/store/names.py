"""The names of the store: its groups and arrays, and the keys of its conditions.

Every group path and condition key is spelled here once; writers and readers call these
functions instead of formatting ``"stats/" + family`` themselves. ``<family>`` is one of the
unit families (decoder, ffn_act, speech_encoder, text_encoder); the layout of each group is
described in :mod:`crossmodal.store.layout` (collect) and :mod:`crossmodal.store.results`
(reduce).
"""

from __future__ import annotations

from collections.abc import Sequence

PLAN = "plan"
"""Group whose attrs hold the collect plan (written once)."""
MANIFEST = "manifest"
"""Group whose attrs record done edges and parts, and merged conditions."""
CONCENTRATION = "concentration"
"""Parent group of the one concentration family."""

DEFAULT_POOLING = "prefix_mean"
"""The reference study's per-example value (docs/method.md, "Generation steps and the
per-example value"): what downstream code gets by default."""

OVERLAP_KINDS = ("sets", "sets_by_layer", "spearman")
"""The datasets under ``overlap/<family>``."""


def default_pooling(poolings: Sequence[str]) -> str:
    """``prefix_mean`` when collected, else the first pooling of the store."""
    return DEFAULT_POOLING if DEFAULT_POOLING in poolings else str(poolings[0])


# ---------------------------------------------------------------- collect groups


def units_group(family: str) -> str:
    """The unit index table of ``family`` (sites and units)."""
    return f"units/{family}"


def edges_group(family: str) -> str:
    """The histogram edges of ``family`` with their labels."""
    return f"edges/{family}"


def edges_array(family: str) -> str:
    """``edges[task, modality, step, pooling, unit, edge]`` of ``family``."""
    return f"{edges_group(family)}/edges"


def parts_group(family: str) -> str:
    """The per-work-unit statistics of ``family`` (deleted once merged unless kept)."""
    return f"parts/{family}"


def part_chunks(family: str, name: str, part: int) -> str:
    """The directory of one part's shard of array ``name`` in :func:`parts_group`."""
    return f"{parts_group(family)}/{name}/c/{part}"


def stats_group(family: str) -> str:
    """The statistics of ``family`` merged per condition."""
    return f"stats/{family}"


def concentration_group(family: str) -> str:
    """The per-layer Gini sums of the concentration family, merged per condition."""
    return f"{CONCENTRATION}/{family}"


def concentration_parts(family: str) -> str:
    """The per-work-unit Gini sums of the concentration family (kept: they are tiny)."""
    return f"{concentration_group(family)}/parts"


# ---------------------------------------------------------------- reduce groups


def pooled_group(kind: str, family: str, pooling: str, poolings: Sequence[str]) -> str:
    """``<kind>/<family>`` for the default pooling, ``<kind>/<family>/<pooling>`` otherwise."""
    base = f"{kind}/{family}"
    return base if pooling == default_pooling(poolings) else f"{base}/{pooling}"


def selectivity_group(family: str, pooling: str, poolings: Sequence[str]) -> str:
    """AP, AUROC and their bounds of ``family`` for one pooling."""
    return pooled_group("selectivity", family, pooling, poolings)


def modality_group(family: str, pooling: str, poolings: Sequence[str]) -> str:
    """The modality-selective units of ``family`` for one pooling."""
    return pooled_group("modality", family, pooling, poolings)


def exact_group(family: str) -> str:
    """Exact AP/AUROC of the units whose set membership the histograms left open."""
    return f"exact/{family}"


def sets_group(family: str) -> str:
    """Exact top/bottom/both unit sets of ``family``."""
    return f"sets/{family}"


def roles_group(family: str) -> str:
    """The sets of ``family`` relabelled by role."""
    return f"roles/{family}"


def exemplars_group(family: str) -> str:
    """The examples with the highest and lowest values of each final-set unit of ``family``."""
    return f"exemplars/{family}"


def stability_group(family: str) -> str:
    """Overlap of the top/bottom-k sets selected on two disjoint halves of the examples."""
    return f"stability/{family}"


def overlap_group(family: str, kind: str) -> str:
    """Cross-modal overlap dataset ``kind`` (one of :data:`OVERLAP_KINDS`) of ``family``."""
    return f"overlap/{family}/{kind}"


# ---------------------------------------------------------------- condition keys


def condition_key(task: str, modality: str, language: str | None = None) -> str:
    """``task/modality`` (a pilot's key in the manifest) or ``task/modality/language``."""
    return f"{task}/{modality}" if language is None else f"{task}/{modality}/{language}"


def parse_condition_key(key: str) -> tuple[str, ...]:
    """The labels of a :func:`condition_key`: ``(task, modality)`` or ``(task, modality,
    language)``."""
    labels = tuple(key.split("/"))
    if len(labels) not in (2, 3) or not all(labels):
        raise ValueError(
            f"condition key must be one of ['task/modality', 'task/modality/language'], got {key!r}"
        )
    return labels
