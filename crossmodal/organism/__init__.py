"""The model organism: a small SeamlessM4T v2 that speaks six synthetic languages.

It is the embedded default model of the demo and the tests: the same transformers classes
as ``facebook/seamless-m4t-v2-large`` (a real sentencepiece tokenizer, feature extractor
and processor, saved as an ordinary model directory), trained on CPU to translate text and
speech into and out of English and to transcribe speech, in languages named like the
reference set (eng, deu, spa, fra, jpn, cmn). The built model ships in
``crossmodal/organism_model``; :func:`build_organism` rebuilds it from a seed.

Public API::

    organism_path() -> Path
    organism_corpus(split, languages=None, n_sentences=None, seed=0) -> list[Record]
    build_organism(out_dir, seed=0, config=None) -> Path
    evaluate_organism(path=None, n_per_language=100, split="test", batch_size=64) -> OrganismReport
"""

from __future__ import annotations

from pathlib import Path

from crossmodal.organism.build import BuildConfig, ModelShape, build_organism
from crossmodal.organism.corpus import organism_corpus
from crossmodal.organism.evaluate import OrganismReport, evaluate_model, evaluate_organism
from crossmodal.organism.grammar import ORGANISM_LANGUAGES
from crossmodal.organism.training import TrainConfig

ORGANISM_DIR = Path(__file__).resolve().parent.parent / "organism_model"
"""Where the shipped organism lives (git-tracked)."""
REBUILD_COMMAND = "crossmodal organism --build"
_REQUIRED = (
    ("config.json",),
    ("generation_config.json",),
    ("model.safetensors",),
    ("processor_config.json", "preprocessor_config.json"),  # transformers 5 / 4.x name
    ("tokenizer.json", "sentencepiece.bpe.model"),
)


class OrganismMissingError(ValueError):
    """The shipped organism directory is missing or incomplete."""


def check_organism_dir(path: Path) -> Path:
    """``path`` if it holds a complete organism, else a one-line error with the fix.

    Raises:
        OrganismMissingError: naming the path, what is missing and the rebuild command.
    """
    missing = [
        " or ".join(names)
        for names in _REQUIRED
        if not any((path / name).is_file() for name in names)
    ]
    if missing:
        raise OrganismMissingError(
            f"organism directory {str(path)!r} must hold {', '.join(missing)}; "
            f"rebuild it with `{REBUILD_COMMAND}`"
        )
    return path


def organism_path() -> Path:
    """The shipped organism directory (``crossmodal/organism_model``).

    Raises:
        OrganismMissingError: if it is missing or incomplete.
    """
    return check_organism_dir(ORGANISM_DIR)


__all__ = [
    "ORGANISM_DIR",
    "ORGANISM_LANGUAGES",
    "REBUILD_COMMAND",
    "BuildConfig",
    "ModelShape",
    "OrganismMissingError",
    "OrganismReport",
    "TrainConfig",
    "build_organism",
    "check_organism_dir",
    "evaluate_model",
    "evaluate_organism",
    "organism_corpus",
    "organism_path",
]
