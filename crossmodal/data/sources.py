"""Data sources: the source protocol, choosing one by name, splits, skip reports, the id join.

A data source yields :class:`~crossmodal.data.records.Record` objects for one (language, split)
and counts the examples it had to drop in a :class:`SkipReport`: a bad example (missing,
truncated or corrupt audio, empty text, a malformed metadata row) is skipped and counted,
never raised, so one bad file cannot end a run. Configuration mistakes (unknown language,
missing dataset directory) do raise, as one line.

Sources: :class:`crossmodal.data.fleurs.FleursSource` (raw FLEURS layout),
:class:`crossmodal.data.fleurs.FleursParquetSource` (a Parquet copy) and :class:`OrganismSource`
(the model organism's synthetic corpus); :func:`open_source` picks one by the name a config
gives (``data.source``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from crossmodal.data.languages import validate_language
from crossmodal.data.records import Record

SPLITS = ("train", "dev", "test")
REFERENCE_LANGUAGES = ("eng", "deu", "spa", "fra", "jpn", "cmn")
"""Seamless codes of the reference run (English pivot plus five)."""


class DataError(ValueError):
    """A data source that cannot be read as configured (one line: value, allowed, fix)."""


def validate_split(split: object) -> str:
    """Return ``split`` if it is train/dev/test, else raise a one-line :class:`DataError`."""
    if isinstance(split, str) and split in SPLITS:
        return split
    hint = "FLEURS calls its validation split 'dev'" if split == "validation" else "pick one"
    raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}; {hint}")


@dataclass(frozen=True)
class Bounds:
    """Inputs bounded by policy (config ``data.max_audio_seconds``, ``data.max_text_chars``):
    longer examples are skipped and counted, so one outlier cannot exhaust memory (the speech
    encoder's grows with the square of the duration; docs/reliability.md, "Bounded inputs")."""

    max_audio_seconds: float | None = None
    max_text_chars: int | None = None

    def text_problem(self, text: str) -> str | None:
        """``text_too_long`` or None."""
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            return "text_too_long"
        return None

    def audio_problem(self, n_samples: int, sampling_rate: int) -> str | None:
        """A one-line reason if the recording is longer than the bound, else None."""
        seconds = n_samples / sampling_rate
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            return f"{seconds:.1f} s, longer than max_audio_seconds {self.max_audio_seconds:g}"
        return None


@dataclass
class SkipReport:
    """Skipped examples by reason: counts, a few labels per reason, and every example id.

    Reasons used by the loaders: ``audio_missing``, ``audio_truncated``,
    ``audio_undecodable`` (not audio / corrupt), ``audio_empty``, ``audio_nonfinite``,
    ``audio_unreadable`` (unreadable file or archive), ``audio_too_long`` (over
    ``max_audio_seconds``), ``text_empty``, ``text_too_long`` (over ``max_text_chars``),
    ``text_not_utf8`` (a transcript that is not UTF-8: never decoded with replacement
    characters), ``row_malformed``.
    """

    max_examples: int = 5
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    """Every skipped example (``language/split/id``, or the file line) per reason."""

    def add(self, reason: str, example: str) -> None:
        """Count one skipped example ``language/split/id[ (why)]``; keep its label if fewer
        than ``max_examples`` are kept, and its id always."""
        self.counts[reason] += 1
        self.ids.setdefault(reason, []).append(example.split(" (", 1)[0])
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(example)

    def merge(self, other: SkipReport) -> None:
        """Add ``other``'s counts and examples into this report (e.g. across workers)."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.ids.setdefault(reason, []).extend(other.ids.get(reason, []))
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(kept))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, object]]:
        """JSON-ready ``{reason: {"count": n, "examples": [...]}}``."""
        return {
            r: {
                "count": n,
                "examples": list(self.examples.get(r, [])),
                "ids": list(self.ids.get(r, [])),
            }
            for r, n in sorted(self.counts.items())
        }

    def __str__(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = [
            f"{r}={n} (e.g. {', '.join(self.examples.get(r, [])[:2])})"
            for r, n in sorted(self.counts.items())
        ]
        return f"{self.total} skipped: " + "; ".join(parts)


@runtime_checkable
class DataSource(Protocol):
    """Anything that yields records for a (Seamless language code, split) and counts skips."""

    skipped: SkipReport

    def records(
        self, language: str, split: str, *, ids: Collection[str] | None = None
    ) -> Iterator[Record]: ...


SOURCE_KINDS = ("organism", "fleurs_raw", "fleurs_parquet")
"""The data sources a config can name (``data.source``)."""


def open_source(
    kind: str,
    *,
    path: str | Path | None = None,
    audio: bool = True,
    audio_root: str | Path | None = None,
    n_sentences: int | None = None,
    seed: int = 0,
    bounds: Bounds = Bounds(),  # noqa: B008 - frozen, so safe to share
) -> DataSource:
    """The data source a config names: the one place that maps ``data.source`` to a class.

    Args:
        kind: one of :data:`SOURCE_KINDS`.
        path: the FLEURS dataset root (raw layout or Parquet copy); unused by the organism.
        audio: load audio; ``False`` for text-only records.
        audio_root: FLEURS only: an alternative audio root replacing the recordings.
        n_sentences, seed: the organism's corpus size and seed; unused by FLEURS, whose
            splits have fixed sizes (plans choose their subset themselves).
        bounds: longest audio and text used; longer examples are skipped and counted.

    Raises:
        ValueError: an unknown ``kind`` (one line); the sources' own errors otherwise.
    """
    if kind == "organism":
        return OrganismSource(n_sentences, seed, audio=audio, bounds=bounds)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data source must be one of {list(SOURCE_KINDS)}, got {kind!r}")
    from crossmodal.data.fleurs import FleursParquetSource, FleursSource

    cls = FleursSource if kind == "fleurs_raw" else FleursParquetSource
    return cls(path, audio=audio, audio_root=audio_root, bounds=bounds)


def id_key(record_id: str) -> tuple[int, int, str]:
    """Sort FLEURS's numeric ids numerically, anything else after them as text."""
    return (0, int(record_id), "") if record_id.isdigit() else (1, 0, record_id)


def join_by_id(records_by_language: Mapping[str, Iterable[Record]]) -> dict[str, list[Record]]:
    """Keep the ids present in every language; return aligned lists sorted by id.

    ``result[lang][i]`` is the same sentence in every language. When a language yields
    an id more than once (FLEURS has several recordings per sentence), the FIRST record in
    iteration order is kept; the FLEURS loaders already yield one recording per id (the
    first by file name that decodes), so the choice is deterministic.

    This materialises every record, audio included: for large runs join text-only records
    first, then load audio with ``records(..., ids=...)`` for the joined ids.
    """
    firsts: dict[str, dict[str, Record]] = {}
    for language, records in records_by_language.items():
        kept: dict[str, Record] = {}
        for record in records:
            kept.setdefault(record.id, record)
        firsts[language] = kept
    if not firsts:
        return {}
    common = set.intersection(*(set(kept) for kept in firsts.values()))
    order = sorted(common, key=id_key)
    return {language: [kept[i] for i in order] for language, kept in firsts.items()}


def joined_records(
    source: DataSource, languages: Sequence[str], split: str
) -> dict[str, list[Record]]:
    """``join_by_id`` over ``source.records(language, split)`` for each language."""
    return join_by_id({language: source.records(language, split) for language in languages})


class OrganismSource:
    """The model organism's synthetic corpus served as a :class:`DataSource`.

    ``crossmodal.organism.corpus.organism_corpus`` is imported lazily, inside the iteration,
    so this module imports even where the organism package is absent or being rebuilt. A
    language's records of a split are built once per source object, and only for the
    languages asked for: the corpus is a pure function of (split, sentence, language, seed),
    so one language's records are the same whichever others are built.

    Args:
        n_sentences: sentences per split (``None``: the organism's default split sizes).
        seed: corpus seed (the shipped organism was trained on seed 0).
        languages: organism language codes it serves.
        audio: synthesise speech; ``False`` for text-only records.
        bounds: longest audio and text used; longer examples are skipped and counted.
    """

    def __init__(
        self,
        n_sentences: int | None = None,
        seed: int = 0,
        languages: Sequence[str] = REFERENCE_LANGUAGES,
        audio: bool = True,
        bounds: Bounds = Bounds(),  # noqa: B008 - frozen, so safe to share
    ) -> None:
        if n_sentences is not None and (not isinstance(n_sentences, int) or n_sentences <= 0):
            fix = "e.g. 64, or None for the organism's split sizes"
            raise DataError(f"n_sentences must be a positive integer, got {n_sentences!r}; {fix}")
        self.n_sentences = n_sentences
        self.seed = seed
        self.languages = tuple(languages)
        self.audio = audio
        self.bounds = bounds
        self.skipped = SkipReport()
        self._corpus: dict[tuple[str, str], list[Record]] = {}

    def records(
        self, language: str, split: str, *, ids: Collection[str] | None = None
    ) -> Iterator[Record]:
        """Records of ``language`` in ``split`` in corpus order (only ``ids`` if given);
        empty-text records are skipped and counted."""
        split = validate_split(split)
        validate_language(language, self.languages)
        return self._records(language, split, None if ids is None else {str(i) for i in ids})

    def _records(self, language: str, split: str, keep: set[str] | None) -> Iterator[Record]:
        if (split, language) not in self._corpus:
            from crossmodal.organism.corpus import organism_corpus

            corpus = organism_corpus(
                split, [language], self.n_sentences, self.seed, audio=self.audio
            )
            self._corpus[split, language] = list(corpus)
        for record in self._corpus[split, language]:
            if keep is not None and record.id not in keep:
                continue
            label = f"{language}/{split}/{record.id}"
            if not record.text.strip():
                self.skipped.add("text_empty", label)
                continue
            problem = self.bounds.text_problem(record.text)
            if problem is not None:
                self.skipped.add(problem, label)
                continue
            if record.audio is not None:
                why = self.bounds.audio_problem(len(record.audio), record.sampling_rate)
                if why is not None:
                    self.skipped.add("audio_too_long", f"{label} ({why})")
                    continue
            yield record
