"""Output-language identification: one Protocol, its backends, and the registry that builds them.

The steering outcome measures ask "which language is this output in?". Every backend
implements :class:`LanguageIdentifier` (``languages`` and ``identify(texts)`` -> one
``{Seamless code: probability}`` per text), so the steering tables read the same whatever
identified them (docs/platform.md, "language identification"):

- ``organism``: :class:`OrganismLID`, exact for the model organism, whose words are disjoint
  across its six languages: each token belongs to one language or to none, and a text's
  "probabilities" are the shares of its tokens per language (with ``model_path``, the
  lexicon of that organism directory).
- ``py3langid`` and ``lingua``: models bundled with their packages, so they run offline.
- ``fasttext`` (lid.176) and ``glotlid``: a ``.bin`` model at a path the user gives. Nothing
  is ever downloaded; a missing path or a missing ``fasttext`` package is a one-line error.

:func:`get_identifier` builds a backend by name (:data:`BACKENDS`). Backend labels (ISO 639-1,
ISO 639-3, GlotLID's ``eng_Latn``) are mapped to Seamless codes; labels with no Seamless code
are kept as they are, so each distribution still sums to one. An empty or whitespace-only
text has no language: an empty distribution, top ``None``.
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


def _code_table(pairs: str) -> dict[str, str]:
    """``"de:deu en:eng"`` -> ``{"de": "deu", "en": "eng"}``."""
    return dict(pair.split(":") for pair in pairs.split())


_ISO1 = _code_table(
    "af:afr am:amh ar:arb as:asm az:azj be:bel bg:bul bn:ben bs:bos ca:cat cs:ces cy:cym "
    "da:dan de:deu el:ell en:eng es:spa et:est eu:eus fa:pes fi:fin fr:fra ga:gle gl:glg "
    "gu:guj he:heb iw:heb hi:hin hr:hrv hu:hun hy:hye id:ind ig:ibo is:isl it:ita ja:jpn "
    "jv:jav jw:jav ka:kat kk:kaz km:khm kn:kan ko:kor ky:kir lb:ltz lg:lug lo:lao lt:lit "
    "lv:lvs mk:mkd ml:mal mn:khk mr:mar ms:zlm mt:mlt my:mya nb:nob ne:npi nl:nld nn:nno "
    "no:nob ny:nya oc:oci om:gaz or:ory pa:pan pl:pol ps:pbt pt:por ro:ron ru:rus sd:snd "
    "sk:slk sl:slv sn:sna so:som sr:srp sv:swe sw:swh ta:tam te:tel tg:tgk th:tha tl:tgl "
    "tr:tur uk:ukr ur:urd uz:uzn vi:vie xh:xho yo:yor zh:cmn zu:zul"
)
"""ISO 639-1 (and legacy iw/jw/no) -> Seamless code."""
_MACRO = _code_table(
    "zho:cmn ara:arb fas:pes per:pes msa:zlm zsm:zlm lav:lvs aze:azj mon:khk nep:npi "
    "uzb:uzn swa:swh nor:nob orm:gaz pus:pbt ekk:est tgl:tgl fil:tgl"
)
"""ISO 639-3 macrolanguages and variants -> the Seamless code of the same language."""

Distribution = dict[str, float]


class LidError(ValueError):
    """A backend that cannot be built (one line: value, allowed, fix)."""


def to_seamless(label: str) -> str:
    """A backend label (``de``, ``deu``, ``zho``, ``__label__eng_Latn``) as a Seamless code."""
    code = label.removeprefix("__label__").split("_")[0].lower()
    if len(code) == 2:
        return _ISO1.get(code, code)
    return _MACRO.get(code, code)


def _merge(pairs: Sequence[tuple[str, float]]) -> Distribution:
    """Sum probabilities of labels that map to one code (``no`` and ``nb`` -> ``nob``)."""
    out: Distribution = {}
    for label, p in pairs:
        code = to_seamless(label)
        out[code] = out.get(code, 0.0) + float(p)
    return out


class Py3LangidIdentifier:
    """py3langid's bundled naive-Bayes model (97 languages), normalised probabilities."""

    def __init__(self, languages: Sequence[str] | None = None) -> None:
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as _Model

        self._model = _Model.from_model_file(MODEL_FILE, norm_probs=True)
        if languages is not None:
            inverse = {v: k for k, v in _ISO1.items()}
            self._model.set_languages([inverse.get(c, c) for c in languages])
        self.languages = tuple(dict.fromkeys(to_seamless(x) for x in self._model.labels))

    def identify(self, texts: Sequence[str]) -> list[Distribution]:
        return [_merge(self._model.rank(t)) if t.strip() else {} for t in texts]


class LinguaIdentifier:
    """lingua-language-detector's bundled models (75 languages); ``languages`` narrows it."""

    def __init__(self, languages: Sequence[str] | None = None) -> None:
        from lingua import Language, LanguageDetectorBuilder

        if languages is None:
            chosen = list(Language.all())
            builder = LanguageDetectorBuilder.from_all_languages()
        else:
            wanted = set(languages)
            chosen = [x for x in Language.all() if to_seamless(x.iso_code_639_3.name) in wanted]
            if len(chosen) < 2:
                raise LidError(
                    f"languages must name at least two lingua languages, got {list(languages)!r}; "
                    "lingua covers 75 languages (e.g. eng, deu, fra, spa, jpn, cmn)"
                )
            builder = LanguageDetectorBuilder.from_languages(*chosen)
        self._detector = builder.build()
        self.languages = tuple(sorted({to_seamless(x.iso_code_639_3.name) for x in chosen}))

    def identify(self, texts: Sequence[str]) -> list[Distribution]:
        out = []
        for t in texts:
            values = self._detector.compute_language_confidence_values(t) if t.strip() else []
            out.append(_merge([(v.language.iso_code_639_3.name, v.value) for v in values]))
        return out


class FastTextIdentifier:
    """A fastText classifier (lid.176, GlotLID) from a user-given ``.bin`` path."""

    def __init__(self, model_path: str | Path | None, name: str = "fasttext") -> None:
        self.name = name
        if model_path is None or not Path(model_path).is_file():
            raise LidError(
                f"model_path must be an existing fastText model file for backend {name!r}, got "
                f"{None if model_path is None else str(model_path)!r}; download lid.176.bin or "
                "GlotLID's model.bin yourself and pass its path (crossmodal never downloads)"
            )
        try:
            import fasttext
        except ImportError:
            raise LidError(
                f"fasttext must be importable for backend {name!r}, got ImportError; "
                "pip install fasttext-wheel (or fasttext)"
            ) from None
        self._model = fasttext.load_model(str(model_path))
        self.languages = tuple(dict.fromkeys(to_seamless(x) for x in self._model.labels))

    def identify(self, texts: Sequence[str]) -> list[Distribution]:
        out = []
        for t in texts:
            if not t.strip():
                out.append({})
                continue
            # the low-level predict: fasttext's Python wrapper breaks on numpy 2 (copy=False)
            pairs = self._model.f.predict(" ".join(t.split()) + "\n", -1, 0.0, "strict")
            out.append(_merge([(label, p) for p, label in pairs]))
        return out


def _organism(model_path: str | Path | None) -> LanguageIdentifier:
    return OrganismLID() if model_path is None else OrganismLID.from_model_dir(model_path)


_BACKENDS: Mapping[str, Callable[[str | Path | None, Sequence[str] | None], LanguageIdentifier]] = {
    "organism": lambda path, langs: _organism(path),
    "py3langid": lambda path, langs: Py3LangidIdentifier(langs),
    "lingua": lambda path, langs: LinguaIdentifier(langs),
    "fasttext": lambda path, langs: FastTextIdentifier(path, "fasttext"),
    "glotlid": lambda path, langs: FastTextIdentifier(path, "glotlid"),
}
BACKENDS = tuple(_BACKENDS)
"""The backend names :func:`get_identifier` builds."""
PATH_BACKENDS = ("fasttext", "glotlid")
"""Backends that need ``model_path`` (a fastText ``.bin`` file); a run holds at most one."""


def get_identifier(
    name: str, model_path: str | Path | None = None, *, languages: Sequence[str] | None = None
) -> LanguageIdentifier:
    """Build the identifier ``name``.

    Args:
        name: one of :data:`BACKENDS`.
        model_path: the ``.bin`` model of ``fasttext``/``glotlid``; for ``organism``, an
            organism directory whose lexicon to use (default: the organism's own lexicon).
        languages: restrict py3langid/lingua to these Seamless codes (faster, renormalised).

    Raises:
        LidError: unknown name, missing model file, or ``fasttext`` not installed.
    """
    if name not in _BACKENDS:
        raise LidError(f"lid backend must be one of {list(BACKENDS)}, got {name!r}; pick one")
    return _BACKENDS[name](model_path, languages)


def lid_columns(
    identifier: LanguageIdentifier, texts: Sequence[str], languages: Sequence[str]
) -> dict[str, list]:
    """Per-text columns: ``top`` (code or None) and ``p_<code>`` for each of ``languages``."""
    dists = identifier.identify(texts)
    columns: dict[str, list] = {"top": [top_language(d) for d in dists]}
    for code in languages:
        columns[f"p_{code}"] = [float(d.get(code, 0.0)) for d in dists]
    return columns
