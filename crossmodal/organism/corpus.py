"""The organism's parallel corpus, served as :class:`~crossmodal.data.records.Record` objects.

One concept sentence per id, rendered in every requested language (text) and spoken in
that language's voice (audio), like FLEURS: records of different languages join on ``id``.
Everything is a pure function of (split, index, language, seed), so any subset can be
rebuilt without the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from crossmodal.data.records import TARGET_SAMPLING_RATE, Record
from crossmodal.organism.grammar import (
    ORGANISM_LANGUAGES,
    SPLITS,
    check_split,
    draw_sentence,
    render,
    sentence_id,
)
from crossmodal.organism.speech import synthesize

DEFAULT_SIZES = {"train": 4000, "dev": 300, "test": 300}
"""Sentences per split when ``n_sentences`` is not given (the build trains on ``train``)."""


def check_languages(languages: Sequence[str] | None) -> tuple[str, ...]:
    """``None`` means all six; anything else must be organism languages."""
    if languages is None:
        return ORGANISM_LANGUAGES
    if isinstance(languages, str):
        languages = (languages,)
    for lang in languages:
        if lang not in ORGANISM_LANGUAGES:
            raise ValueError(
                f"language must be one of {list(ORGANISM_LANGUAGES)}, got {lang!r}; "
                "the organism speaks only its six synthetic languages"
            )
    return tuple(languages)


def audio_seed(seed: int, split: str, index: int, lang: str) -> list[int]:
    """The seed of one utterance's speaker variation and noise."""
    return [seed, SPLITS.index(split), index, ORGANISM_LANGUAGES.index(lang)]


def organism_corpus(
    split: str,
    languages: Sequence[str] | None = None,
    n_sentences: int | None = None,
    seed: int = 0,
    *,
    audio: bool = True,
) -> list[Record]:
    """Parallel records of the organism's languages: text and 16 kHz speech per (id, language).

    Args:
        split: ``train``, ``dev`` or ``test``; splits never share a sentence.
        languages: organism language codes (default: all six).
        n_sentences: sentences (ids) to return; default :data:`DEFAULT_SIZES` of the split.
        seed: corpus seed; the shipped organism was trained on seed 0's ``train`` split.
        audio: synthesise the waveforms (about 15 ms per record); ``False`` for text only.

    Returns:
        Records ordered by sentence, then by language; ids are shared across languages.

    Raises:
        ValueError: for an unknown split or language, or a negative ``n_sentences``.
    """
    check_split(split)
    langs = check_languages(languages)
    n = DEFAULT_SIZES[split] if n_sentences is None else n_sentences
    if n < 0:
        raise ValueError(f"n_sentences must be >= 0 or None, got {n_sentences!r}")
    records = []
    for index in range(n):
        sentence = draw_sentence(split, index, seed)
        for lang in langs:
            words = render(sentence, lang)
            wave = synthesize(words, lang, audio_seed(seed, split, index, lang)) if audio else None
            records.append(
                Record(
                    id=sentence_id(split, index),
                    language=lang,
                    text=" ".join(words),
                    audio=wave,
                    sampling_rate=TARGET_SAMPLING_RATE if audio else None,
                    split=split,
                )
            )
    return records
