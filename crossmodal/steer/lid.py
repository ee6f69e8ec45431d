"""Output-language identification behind one small Protocol.

The steering outcome measures ask "which language is this output in?". Every backend
answers through :class:`LanguageIdentifier`: per text, a probability (or share) per
language. :class:`OrganismLID` is exact for the model organism, whose words are disjoint
across its six languages: each token belongs to one language or to none, and a text's
"probabilities" are the shares of its tokens per language. Statistical backends for real
models (py3langid, lingua, fastText; issue 7) plug in behind the same Protocol and are
listed in :data:`BACKENDS`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class LanguageIdentifier(Protocol):
    """Anything that maps texts to language probabilities.

    ``identify`` returns one dict per text, ``{language code: probability}``, over the
    codes in ``languages``; the values sum to at most 1 (the rest is "none of these").
    """

    @property
    def languages(self) -> tuple[str, ...]: ...

    def identify(self, texts: Sequence[str]) -> list[dict[str, float]]: ...


def top_language(probs: Mapping[str, float]) -> str | None:
    """The most probable language, or ``None`` when every probability is 0 (ties: first code)."""
    best = max(probs, key=probs.__getitem__, default=None)
    return best if best is not None and probs[best] > 0 else None


def top_languages(identifier: LanguageIdentifier, texts: Sequence[str]) -> list[str | None]:
    """The top language of each text under ``identifier``."""
    return [top_language(p) for p in identifier.identify(texts)]


class OrganismLID:
    """Exact language identification for the model organism's outputs.

    Args:
        word_languages: ``{word: language}``; words must be whitespace-free. Default: the
            organism's lexicon (:func:`crossmodal.organism.grammar.word_languages`).

    Example:
        >>> lid = OrganismLID()
        >>> lid.token_languages("not-a-word")
        [None]
    """

    def __init__(self, word_languages: Mapping[str, str] | None = None):
        if word_languages is None:
            from crossmodal.organism.grammar import word_languages as organism_words

            word_languages = organism_words()
        bad = next((w for w in word_languages if not w or w.split() != [w]), None)
        if bad is not None:
            raise ValueError(f"words must be non-empty and without whitespace, got {bad!r}")
        self._word_languages = dict(word_languages)
        self._languages = tuple(dict.fromkeys(self._word_languages.values()))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> OrganismLID:
        """The identifier of an organism directory (its ``organism_lexicon.json``).

        Raises:
            ValueError: if the directory has no lexicon file.
        """
        file = Path(path) / "organism_lexicon.json"
        if not file.is_file():
            raise ValueError(
                f"model directory must hold organism_lexicon.json, got {str(path)!r}; "
                "rebuild it with `crossmodal organism --build`"
            )
        lexicon: dict[str, dict[str, str]] = json.loads(file.read_text(encoding="utf-8"))
        return cls({word: lang for lang, words in lexicon.items() for word in words.values()})

    @property
    def languages(self) -> tuple[str, ...]:
        return self._languages

    def token_languages(self, text: str) -> list[str | None]:
        """The language of each whitespace token of ``text`` (``None``: no organism word)."""
        return [self._word_languages.get(token) for token in text.split()]

    def shares(self, text: str) -> dict[str, float]:
        """Share of the tokens of ``text`` in each language (0 for an empty text)."""
        tokens = self.token_languages(text)
        counts = Counter(lang for lang in tokens if lang is not None)
        return {lang: counts[lang] / len(tokens) if tokens else 0.0 for lang in self._languages}

    def identify(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Per-text token shares per language; they sum to 1 minus the share of non-words."""
        return [self.shares(text) for text in texts]

    def top_language(self, text: str) -> str | None:
        """The language most tokens belong to, or ``None`` for a text without organism words."""
        return top_language(self.shares(text))

    def is_pure(self, text: str, language: str) -> bool:
        """Whether ``text`` is non-empty and every token is a word of ``language``."""
        tokens = self.token_languages(text)
        return bool(tokens) and all(lang == language for lang in tokens)


BACKENDS: dict[str, Callable[[], LanguageIdentifier]] = {"organism": OrganismLID}
"""Identifier factories by name; statistical backends for real models are added here."""


def get_identifier(name: str) -> LanguageIdentifier:
    """Build the identifier called ``name``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in BACKENDS:
        raise ValueError(f"lid backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()
