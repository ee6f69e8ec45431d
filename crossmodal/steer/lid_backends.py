"""Output-language identification behind one interface, for the steering outcome measures.

Every backend implements :class:`crossmodal.steer.lid.LanguageIdentifier` (``languages`` and
``identify(texts)`` -> one ``{Seamless code: probability}`` per text), so the steering tables
read the same whatever identified them:

- ``organism``: the model organism's exact identifier (:class:`crossmodal.steer.lid.OrganismLID`;
  with ``model_path``, the lexicon of that organism directory).
- ``py3langid`` and ``lingua``: bundled models, offline (platform.md).
- ``fasttext`` (lid.176) and ``glotlid``: a ``.bin`` model at a path the user gives. Nothing
  is ever downloaded; a missing path or a missing ``fasttext`` package is a one-line error.

Backend labels (ISO 639-1, ISO 639-3, GlotLID's ``eng_Latn``) are mapped to Seamless codes;
labels with no Seamless code are kept as they are, so each distribution still sums to one.
An empty or whitespace-only text has no language: an empty distribution, top ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from crossmodal.steer.lid import LanguageIdentifier, OrganismLID, top_language

_ISO1 = dict(
    pair.split(":")
    for pair in [
        "af:afr",
        "am:amh",
        "ar:arb",
        "as:asm",
        "az:azj",
        "be:bel",
        "bg:bul",
        "bn:ben",
        "bs:bos",
        "ca:cat",
        "cs:ces",
        "cy:cym",
        "da:dan",
        "de:deu",
        "el:ell",
        "en:eng",
        "es:spa",
        "et:est",
        "eu:eus",
        "fa:pes",
        "fi:fin",
        "fr:fra",
        "ga:gle",
        "gl:glg",
        "gu:guj",
        "he:heb",
        "iw:heb",
        "hi:hin",
        "hr:hrv",
        "hu:hun",
        "hy:hye",
        "id:ind",
        "ig:ibo",
        "is:isl",
        "it:ita",
        "ja:jpn",
        "jv:jav",
        "jw:jav",
        "ka:kat",
        "kk:kaz",
        "km:khm",
        "kn:kan",
        "ko:kor",
        "ky:kir",
        "lb:ltz",
        "lg:lug",
        "lo:lao",
        "lt:lit",
        "lv:lvs",
        "mk:mkd",
        "ml:mal",
        "mn:khk",
        "mr:mar",
        "ms:zlm",
        "mt:mlt",
        "my:mya",
        "nb:nob",
        "ne:npi",
        "nl:nld",
        "nn:nno",
        "no:nob",
        "ny:nya",
        "oc:oci",
        "om:gaz",
        "or:ory",
        "pa:pan",
        "pl:pol",
        "ps:pbt",
        "pt:por",
        "ro:ron",
        "ru:rus",
        "sd:snd",
        "sk:slk",
        "sl:slv",
        "sn:sna",
        "so:som",
        "sr:srp",
        "sv:swe",
        "sw:swh",
        "ta:tam",
        "te:tel",
        "tg:tgk",
        "th:tha",
        "tl:tgl",
        "tr:tur",
        "uk:ukr",
        "ur:urd",
        "uz:uzn",
        "vi:vie",
        "xh:xho",
        "yo:yor",
        "zh:cmn",
        "zu:zul",
    ]
)
"""ISO 639-1 (and legacy iw/jw/no) -> Seamless code."""
_MACRO = {
    "zho": "cmn", "ara": "arb", "fas": "pes", "per": "pes", "msa": "zlm", "zsm": "zlm",
    "lav": "lvs", "aze": "azj", "mon": "khk", "nep": "npi", "uzb": "uzn", "swa": "swh",
    "nor": "nob", "orm": "gaz", "pus": "pbt", "ekk": "est", "tgl": "tgl", "fil": "tgl",
}  # fmt: skip
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
