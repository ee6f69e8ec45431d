"""Six synthetic languages over one concept vocabulary, and parallel sentences in them.

A sentence is drawn once at the concept level (who does what to whom, where, when) and
rendered in every language by that language's own words and word-order rules, so the six
renderings are exact translations of each other. Words are disjoint across languages (the
jpn analogue writes in Hiragana, the cmn analogue in Han characters), which makes the
output language of the organism exactly identifiable, word by word.

The lexicon is part of the language definition: it is drawn once from ``LEXICON_SEED`` and
does not change with the corpus seed, so every corpus seed speaks the same six languages.
Splits are disjoint by construction: a concept sentence belongs to the split its content
hash falls in, whatever its seed or index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

ORGANISM_LANGUAGES = ("eng", "deu", "spa", "fra", "jpn", "cmn")
SPLITS = ("train", "dev", "test")
LEXICON_SEED = 2601_17387
MIN_WORDS, MAX_WORDS = 12, 22
"""Every rendering of every sentence has this many words (= tokens): decoding steps
1, 6 and 11 of the method exist for every output."""

# Hash buckets (of 100) per split; a sentence's content hash decides its split.
_SPLIT_BUCKETS = {"train": range(0, 80), "dev": range(80, 90), "test": range(90, 100)}
_SPLIT_ID_BASE = {"train": 0, "dev": 1_000_000, "test": 2_000_000}

CONCEPTS: dict[str, tuple[str, ...]] = {
    "agent": (
        "man", "woman", "child", "dog", "cat", "bird", "horse", "teacher",
        "doctor", "farmer", "king", "friend", "girl", "boy", "wolf", "baker",
    ),
    "thing": (
        "house", "tree", "river", "book", "car", "apple", "bread", "stone",
        "boat", "letter", "garden", "city", "mountain", "table", "door", "window",
        "road", "flower", "fish", "song", "ball", "hat", "cup", "key",
    ),
    "adj": (
        "big", "small", "red", "green", "old", "young", "happy", "quiet",
        "fast", "dark", "bright", "cold", "warm", "tall", "heavy", "strange",
    ),
    "verb": (
        "sees", "takes", "finds", "holds", "carries", "builds", "eats", "reads",
        "opens", "watches", "buys", "follows", "draws", "paints", "pushes", "loves",
    ),
    "det": ("the", "a", "this", "that"),
    "prep": ("in", "on", "near", "under", "behind", "with", "from", "to"),
    "adv": ("today", "yesterday", "slowly", "quickly", "often", "again", "now", "quietly"),
    "conj": ("and", "but", "while"),
}  # fmt: skip
NOUNS = CONCEPTS["agent"] + CONCEPTS["thing"]


@dataclass(frozen=True)
class LanguageSpec:
    """Word-order rules of one language.

    Attributes:
        code: Seamless language code.
        clause: order of the clause constituents S (subject), V, O, P (place phrase), A (adverb).
        adj_before_noun: ``True`` for "big dog", ``False`` for "dog big".
        postpositions: ``True`` for "garden in", ``False`` for "in garden".
        particles: extra function words that mark roles: ``subj``/``obj`` after the subject
            and object noun phrases, ``adj`` after a pre-nominal adjective.
        script: ``latin``, ``kana`` or ``han``; decides how word forms are spelled.
    """

    code: str
    clause: str
    adj_before_noun: bool
    postpositions: bool
    particles: tuple[str, ...]
    script: str


LANGUAGE_SPECS: dict[str, LanguageSpec] = {
    "eng": LanguageSpec("eng", "SVOPA", True, False, (), "latin"),
    "deu": LanguageSpec("deu", "SVAPO", True, False, (), "latin"),
    "spa": LanguageSpec("spa", "ASVOP", False, False, (), "latin"),
    "fra": LanguageSpec("fra", "SVAOP", False, False, (), "latin"),
    "jpn": LanguageSpec("jpn", "ASPOV", True, True, ("subj", "obj"), "kana"),
    "cmn": LanguageSpec("cmn", "SAPVO", True, False, ("adj",), "han"),
}

# Spelling material for the Latin-script languages: (onsets, nuclei, codas).
_LATIN_PHONOTACTICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "eng": (
        (
            "b",
            "d",
            "f",
            "g",
            "h",
            "k",
            "l",
            "m",
            "n",
            "p",
            "r",
            "s",
            "t",
            "w",
            "sh",
            "th",
            "st",
            "br",
            "tr",
        ),
        ("a", "e", "i", "o", "u", "ee", "oo", "ea", "y"),
        ("", "", "n", "t", "d", "k", "ng", "ll", "m", "x"),
    ),
    "deu": (
        (
            "b",
            "d",
            "f",
            "g",
            "h",
            "k",
            "l",
            "m",
            "n",
            "r",
            "t",
            "w",
            "z",
            "sch",
            "kr",
            "schw",
            "pf",
            "gr",
        ),
        ("a", "e", "i", "o", "u", "ei", "au", "ä", "ö", "ü", "ie"),
        ("", "n", "t", "ch", "rt", "ng", "lz", "ft", "nd"),
    ),
    "spa": (
        ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ll", "ch", "ñ"),
        ("a", "e", "i", "o", "u", "ia", "ue", "á", "é", "ó"),
        ("", "", "", "n", "s", "r", "l"),
    ),
    "fra": (
        ("b", "ch", "d", "f", "g", "j", "l", "m", "n", "p", "r", "s", "t", "v", "qu"),
        ("a", "e", "i", "o", "ou", "au", "eau", "é", "è", "ai", "eu", "oi"),
        ("", "", "n", "x", "t", "s", "r", "lle"),
    ),
}
_HIRAGANA = tuple(
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわ"
    "がぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽ"
)
_HAN_POOL = tuple(chr(c) for c in range(0x4E00, 0x4E00 + 4 * 192, 4))
"""A fixed pool of Han characters: words reuse characters, as real Chinese words do."""


@dataclass(frozen=True)
class NounPhrase:
    det: str
    adj: str | None
    noun: str


@dataclass(frozen=True)
class Clause:
    subj: NounPhrase
    verb: str
    obj: NounPhrase
    place: tuple[str, NounPhrase] | None
    adv: str | None


@dataclass(frozen=True)
class Sentence:
    """A language-independent sentence: two clauses joined by a conjunction."""

    first: Clause
    conj: str
    second: Clause

    def key(self) -> str:
        """A stable text form of the content (for hashing into splits)."""
        return repr(self)


def _latin_word(rng: np.random.Generator, lang: str, syllables: int) -> str:
    onsets, nuclei, codas = _LATIN_PHONOTACTICS[lang]
    parts = []
    for i in range(syllables):
        parts.append(onsets[rng.integers(len(onsets))] + nuclei[rng.integers(len(nuclei))])
        if i == syllables - 1 or rng.random() < 0.2:
            parts.append(codas[rng.integers(len(codas))])
    return "".join(parts)


def _word_form(rng: np.random.Generator, spec: LanguageSpec, function_word: bool) -> str:
    if spec.script == "kana":
        n = 2 if function_word else int(rng.integers(2, 4))
        return "".join(_HIRAGANA[i] for i in rng.integers(len(_HIRAGANA), size=n))
    if spec.script == "han":
        n = 1 if function_word else 2
        return "".join(_HAN_POOL[i] for i in rng.integers(len(_HAN_POOL), size=n))
    syllables = 1 if function_word else int(rng.integers(1, 3))
    return _latin_word(rng, spec.code, syllables)


_FUNCTION_CLASSES = ("det", "prep", "conj")


@cache
def lexicon() -> dict[str, dict[str, str]]:
    """``{language: {concept: word}}`` for every concept and particle, disjoint across languages.

    Deterministic (drawn from :data:`LEXICON_SEED`); cached because it never changes.
    """
    rng = np.random.default_rng(LEXICON_SEED)
    taken: set[str] = set()
    result: dict[str, dict[str, str]] = {}
    for lang in ORGANISM_LANGUAGES:
        spec = LANGUAGE_SPECS[lang]
        entries: dict[str, str] = {}
        items = [(c, cls in _FUNCTION_CLASSES) for cls, cs in CONCEPTS.items() for c in cs]
        items += [(f"<{p}>", True) for p in spec.particles]
        for concept, function_word in items:
            word = _word_form(rng, spec, function_word)
            while word in taken:
                word = _word_form(rng, spec, function_word)
            taken.add(word)
            entries[concept] = word
        result[lang] = entries
    return result


@cache
def word_languages() -> dict[str, str]:
    """``{word: language}`` over every word of every language (words are disjoint)."""
    return {word: lang for lang, entries in lexicon().items() for word in entries.values()}


def _check_language(lang: str) -> None:
    if lang not in LANGUAGE_SPECS:
        raise ValueError(
            f"language must be one of {list(ORGANISM_LANGUAGES)}, got {lang!r}; "
            "the organism speaks only its six synthetic languages"
        )


def _render_np(np_: NounPhrase, spec: LanguageSpec, words: dict[str, str]) -> list[str]:
    if np_.adj is None:
        return [words[np_.det], words[np_.noun]]
    if not spec.adj_before_noun:
        return [words[np_.det], words[np_.noun], words[np_.adj]]
    linker = [words["<adj>"]] if "adj" in spec.particles else []
    return [words[np_.det], words[np_.adj], *linker, words[np_.noun]]


def _render_clause(clause: Clause, spec: LanguageSpec, words: dict[str, str]) -> list[str]:
    subj = _render_np(clause.subj, spec, words)
    obj = _render_np(clause.obj, spec, words)
    if "subj" in spec.particles:
        subj.append(words["<subj>"])
    if "obj" in spec.particles:
        obj.append(words["<obj>"])
    place: list[str] = []
    if clause.place is not None:
        prep, np_ = clause.place
        inner = _render_np(np_, spec, words)
        place = [*inner, words[prep]] if spec.postpositions else [words[prep], *inner]
    adv = [words[clause.adv]] if clause.adv is not None else []
    parts = {"S": subj, "V": [words[clause.verb]], "O": obj, "P": place, "A": adv}
    return [w for slot in spec.clause for w in parts[slot]]


def render(sentence: Sentence, lang: str) -> list[str]:
    """The words of ``sentence`` in ``lang``, in that language's order."""
    _check_language(lang)
    spec, words = LANGUAGE_SPECS[lang], lexicon()[lang]
    first = _render_clause(sentence.first, spec, words)
    second = _render_clause(sentence.second, spec, words)
    return [*first, words[sentence.conj], *second]


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _noun_phrase(rng: np.random.Generator, nouns: Sequence[str]) -> NounPhrase:
    adj = _pick(rng, CONCEPTS["adj"]) if rng.random() < 0.5 else None
    return NounPhrase(_pick(rng, CONCEPTS["det"]), adj, _pick(rng, nouns))


def _clause(rng: np.random.Generator) -> Clause:
    subj = _noun_phrase(rng, CONCEPTS["agent"])
    verb = _pick(rng, CONCEPTS["verb"])
    obj = _noun_phrase(rng, NOUNS)
    place = (_pick(rng, CONCEPTS["prep"]), _noun_phrase(rng, NOUNS)) if rng.random() < 0.6 else None
    adv = _pick(rng, CONCEPTS["adv"]) if rng.random() < 0.5 else None
    return Clause(subj, verb, obj, place, adv)


def _bucket(sentence: Sentence) -> int:
    return int(hashlib.sha256(sentence.key().encode()).hexdigest()[:8], 16) % 100


def _fits(sentence: Sentence) -> bool:
    return all(MIN_WORDS <= len(render(sentence, lang)) <= MAX_WORDS for lang in ORGANISM_LANGUAGES)


def draw_sentence(split: str, index: int, seed: int = 0) -> Sentence:
    """The ``index``-th sentence of ``split`` for ``seed``: the same call, the same sentence."""
    check_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        sentence = Sentence(_clause(rng), _pick(rng, CONCEPTS["conj"]), _clause(rng))
        if _bucket(sentence) in _SPLIT_BUCKETS[split] and _fits(sentence):
            return sentence


def sentence_id(split: str, index: int) -> str:
    """FLEURS-like numeric id; ids of different splits never collide."""
    return str(_SPLIT_ID_BASE[split] + index)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def split_of(sentence: Sentence) -> str:
    """The split a concept sentence belongs to (by its content hash)."""
    bucket = _bucket(sentence)
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)
