"""FLEURS configs <-> SeamlessM4T v2 language codes, and what the model can read and write.

Everything downstream names languages by Seamless code (``eng``, ``deu``, ``cmn``); FLEURS
names its 102 per-language configs ``<lang>_<region>`` (``en_us``, ``cmn_hans_cn``). This
module is the one place that converts between them.

Sources (checked, not recalled):
- FLEURS configs: the ``google/fleurs`` loading script (``_FLEURS_LANG``, 102 configs).
- Seamless codes and modalities: the "Supported Languages" table published with
  SeamlessM4T (its columns: speech source, text source, text target).
- Text codes the HF model accepts: ``LARGE_SUPPORTED_LANGUAGES`` of transformers'
  SeamlessM4T v2 conversion script, from which ``generation_config.text_decoder_lang_to_code_id``
  and the tokenizer's ``__xxx__`` tokens are built (98 keys: the table's 96 text languages
  plus ``cmn_Hant``, and ``sat``; Malay is ``zlm`` there while the table writes ``zsm``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

# (FLEURS config, Seamless code or None, English name). Order: the FLEURS config list.
_TABLE: tuple[tuple[str, str | None, str], ...] = (
    ("af_za", "afr", "Afrikaans"),
    ("am_et", "amh", "Amharic"),
    # FLEURS ar_eg reads FLORES Modern Standard Arabic text aloud (Egyptian speakers); the
    # text is MSA, so arb, not arz (Egyptian Arabic).
    ("ar_eg", "arb", "Arabic"),
    ("as_in", "asm", "Assamese"),
    ("ast_es", "ast", "Asturian"),  # speech input only
    ("az_az", "azj", "North Azerbaijani"),
    ("be_by", "bel", "Belarusian"),
    ("bg_bg", "bul", "Bulgarian"),
    ("bn_in", "ben", "Bengali"),
    ("bs_ba", "bos", "Bosnian"),
    ("ca_es", "cat", "Catalan"),
    ("ceb_ph", "ceb", "Cebuano"),
    ("ckb_iq", "ckb", "Central Kurdish"),
    ("cmn_hans_cn", "cmn", "Mandarin Chinese"),
    ("cs_cz", "ces", "Czech"),
    ("cy_gb", "cym", "Welsh"),
    ("da_dk", "dan", "Danish"),
    ("de_de", "deu", "German"),
    ("el_gr", "ell", "Greek"),
    ("en_us", "eng", "English"),
    ("es_419", "spa", "Spanish"),
    ("et_ee", "est", "Estonian"),
    ("fa_ir", "pes", "Western Persian"),
    # FLEURS Fula is recorded in Senegal; Seamless's only Fula is Nigerian Fulfulde.
    ("ff_sn", "fuv", "Fula"),
    ("fi_fi", "fin", "Finnish"),
    ("fil_ph", "tgl", "Filipino"),
    ("fr_fr", "fra", "French"),
    ("ga_ie", "gle", "Irish"),
    ("gl_es", "glg", "Galician"),
    ("gu_in", "guj", "Gujarati"),
    ("ha_ng", None, "Hausa"),
    ("he_il", "heb", "Hebrew"),
    ("hi_in", "hin", "Hindi"),
    ("hr_hr", "hrv", "Croatian"),
    ("hu_hu", "hun", "Hungarian"),
    ("hy_am", "hye", "Armenian"),
    ("id_id", "ind", "Indonesian"),
    ("ig_ng", "ibo", "Igbo"),
    ("is_is", "isl", "Icelandic"),
    ("it_it", "ita", "Italian"),
    ("ja_jp", "jpn", "Japanese"),
    ("jv_id", "jav", "Javanese"),
    ("ka_ge", "kat", "Georgian"),
    ("kam_ke", "kam", "Kamba"),  # speech input only
    ("kea_cv", "kea", "Kabuverdianu"),  # speech input only
    ("kk_kz", "kaz", "Kazakh"),
    ("km_kh", "khm", "Khmer"),
    ("kn_in", "kan", "Kannada"),
    ("ko_kr", "kor", "Korean"),
    ("ky_kg", "kir", "Kyrgyz"),
    ("lb_lu", "ltz", "Luxembourgish"),  # speech input only
    ("lg_ug", "lug", "Ganda"),
    ("ln_cd", None, "Lingala"),
    ("lo_la", "lao", "Lao"),
    ("lt_lt", "lit", "Lithuanian"),
    ("luo_ke", "luo", "Luo"),
    ("lv_lv", "lvs", "Standard Latvian"),
    ("mi_nz", None, "Maori"),
    ("mk_mk", "mkd", "Macedonian"),
    ("ml_in", "mal", "Malayalam"),
    ("mn_mn", "khk", "Halh Mongolian"),
    ("mr_in", "mar", "Marathi"),
    # Malay: speech input zlm; the HF decoder/tokenizer key is zlm too (the table's zsm).
    ("ms_my", "zlm", "Malay"),
    ("mt_mt", "mlt", "Maltese"),
    ("my_mm", "mya", "Burmese"),
    ("nb_no", "nob", "Norwegian Bokmal"),
    ("ne_np", "npi", "Nepali"),
    ("nl_nl", "nld", "Dutch"),
    ("nso_za", None, "Northern Sotho"),
    ("ny_mw", "nya", "Nyanja"),
    ("oc_fr", "oci", "Occitan"),  # speech input only
    ("om_et", "gaz", "West Central Oromo"),
    ("or_in", "ory", "Odia"),
    ("pa_in", "pan", "Punjabi"),
    ("pl_pl", "pol", "Polish"),
    ("ps_af", "pbt", "Southern Pashto"),
    ("pt_br", "por", "Portuguese"),
    ("ro_ro", "ron", "Romanian"),
    ("ru_ru", "rus", "Russian"),
    ("sd_in", "snd", "Sindhi"),
    ("sk_sk", "slk", "Slovak"),
    ("sl_si", "slv", "Slovenian"),
    ("sn_zw", "sna", "Shona"),
    ("so_so", "som", "Somali"),
    ("sr_rs", "srp", "Serbian"),
    ("sv_se", "swe", "Swedish"),
    ("sw_ke", "swh", "Swahili"),
    ("ta_in", "tam", "Tamil"),
    ("te_in", "tel", "Telugu"),
    ("tg_tj", "tgk", "Tajik"),
    ("th_th", "tha", "Thai"),
    ("tr_tr", "tur", "Turkish"),
    ("uk_ua", "ukr", "Ukrainian"),
    ("umb_ao", None, "Umbundu"),
    ("ur_pk", "urd", "Urdu"),
    ("uz_uz", "uzn", "Northern Uzbek"),
    ("vi_vn", "vie", "Vietnamese"),
    ("wo_sn", None, "Wolof"),
    ("xh_za", "xho", "Xhosa"),  # speech input only
    ("yo_ng", "yor", "Yoruba"),
    ("yue_hant_hk", "yue", "Cantonese"),
    ("zu_za", "zul", "Zulu"),
)

_NO_SEAMLESS = "not among SeamlessM4T v2's languages (no speech or text code in its README table)"

FLEURS_TO_SEAMLESS: Mapping[str, str | None] = MappingProxyType({c: s for c, s, _ in _TABLE})
"""All 102 FLEURS configs -> Seamless code, or ``None`` where Seamless has no such language."""

UNSUPPORTED_FLEURS: Mapping[str, str] = MappingProxyType(
    {c: f"{name} is {_NO_SEAMLESS}" for c, s, name in _TABLE if s is None}
)
"""FLEURS configs mapped to ``None`` -> why (ha_ng, ln_cd, mi_nz, nso_za, umb_ao, wo_sn)."""

SEAMLESS_TO_FLEURS: Mapping[str, str] = MappingProxyType(
    {s: c for c, s, _ in _TABLE if s is not None}
)
"""The inverse (the mapping is one-to-one on the 96 configs Seamless covers)."""

LANGUAGE_NAMES: Mapping[str, str] = MappingProxyType({c: n for c, _, n in _TABLE})
"""FLEURS config -> English name."""

TEXT_OUTPUT_CODES: frozenset[str] = frozenset(
    str.split(
        "afr amh arb ary arz asm azj bel ben bos bul cat ceb ces ckb cmn cmn_Hant cym dan deu "
        "ell eng est eus fin fra fuv gaz gle glg guj heb hin hrv hun hye ibo ind isl ita jav jpn "
        "kan kat kaz khk khm kir kor lao lit lug luo lvs mai mal mar mkd mlt mni mya nld nno nob "
        "npi nya ory pan pbt pes pol por ron rus sat slk slv sna snd som spa srp swe swh tam tel "
        "tgk tgl tha tur ukr urd uzn vie yor yue zlm zul"
    )
)
"""Codes SeamlessM4T v2 can write as text: the keys of ``text_decoder_lang_to_code_id`` (98)."""

TEXT_INPUT_CODES: frozenset[str] = TEXT_OUTPUT_CODES
"""``src_lang`` codes the HF tokenizer has a ``__xxx__`` token for: the same 98 codes."""

SPEECH_INPUT_CODES: frozenset[str] = frozenset(
    (TEXT_OUTPUT_CODES - {"sat"}) | {"ast", "kam", "kea", "ltz", "oci", "xho"}
)
"""Languages the table lists as speech source (103 rows incl. ``cmn_Hant``; the speech
encoder takes no language tag, so this is training coverage, not an input check)."""


def fleurs_configs() -> tuple[str, ...]:
    """All 102 FLEURS config names, sorted."""
    return tuple(sorted(FLEURS_TO_SEAMLESS))


def fleurs_to_seamless(config: str) -> str | None:
    """The Seamless code of a FLEURS config (``None`` for the 6 Seamless does not cover).

    Raises:
        ValueError: ``config`` is not one of the 102 FLEURS configs.
    """
    validate_language(config, FLEURS_TO_SEAMLESS, what="FLEURS config")
    return FLEURS_TO_SEAMLESS[config]


def seamless_to_fleurs(code: str) -> str:
    """The FLEURS config holding Seamless language ``code`` (``deu`` -> ``de_de``).

    Raises:
        ValueError: no FLEURS config has this language (e.g. ``eus``, or a typo).
    """
    validate_language(code, SEAMLESS_TO_FLEURS, what="language")
    return SEAMLESS_TO_FLEURS[code]


def format_allowed(allowed: Iterable[str], limit: int = 12) -> str:
    """Sorted ``allowed`` for an error message, abbreviated when longer than ``limit``."""
    items = sorted(allowed)
    if len(items) <= limit:
        return "[" + ", ".join(repr(x) for x in items) + "]"
    head = ", ".join(repr(x) for x in items[: limit - 2])
    tail = ", ".join(repr(x) for x in items[-2:])
    return f"[{head}, ..., {tail}] ({len(items)} in all)"


_ISO_639_3: Mapping[str, str] = MappingProxyType(
    {
        # ISO 639-3 macrolanguage and ISO 639-2/B codes whose Seamless code is an individual
        # language (the table's choice; see the FLEURS rows above).
        "ara": "arb", "aze": "azj", "chi": "cmn", "zho": "cmn", "fas": "pes", "per": "pes",
        "ful": "fuv", "lav": "lvs", "mon": "khk", "msa": "zlm", "may": "zlm", "zsm": "zlm",
        "nep": "npi", "orm": "gaz", "ori": "ory", "pus": "pbt", "swa": "swh", "uzb": "uzn",
        "fil": "tgl", "nor": "nob", "ger": "deu", "fre": "fra", "dut": "nld", "gre": "ell",
        "cze": "ces", "arm": "hye", "baq": "eus", "bur": "mya", "geo": "kat", "ice": "isl",
        "mac": "mkd", "rum": "ron", "slo": "slk", "wel": "cym", "kur": "ckb",
    }
)  # fmt: skip
"""ISO 639-3 macrolanguage / ISO 639-2/B codes -> the Seamless code of that language."""

_NAME_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "chinese": "cmn", "mandarin": "cmn", "persian": "pes", "farsi": "pes",
        "latvian": "lvs", "mongolian": "khk", "azerbaijani": "azj", "uzbek": "uzn",
        "pashto": "pbt", "oromo": "gaz", "norwegian": "nob", "tagalog": "tgl",
        "kurdish": "ckb", "fulfulde": "fuv", "basque": "eus",
    }
)  # fmt: skip
"""Common English names the FLEURS table spells longer (``Western Persian``)."""


def _aliases() -> dict[str, tuple[str, str]]:
    """Lower-case alias -> (Seamless code, what the alias is), from the table above."""
    out: dict[str, tuple[str, str]] = {}
    for config, code, name in _TABLE:
        if code is None:
            continue
        prefix = config.split("_")[0]
        if len(prefix) == 2:
            out.setdefault(prefix, (code, f"the ISO 639-1 code of {name}"))
        out[config] = (code, f"the FLEURS config of Seamless code {code!r}")
        out.setdefault(name.lower(), (code, f"the English name of Seamless code {code!r}"))
    for alias, code in _ISO_639_3.items():
        out.setdefault(alias, (code, f"an ISO 639 code of Seamless code {code!r}"))
    for alias, code in _NAME_ALIASES.items():
        out.setdefault(alias, (code, f"an English name of Seamless code {code!r}"))
    return out


_UNSUPPORTED_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        alias: f"{name} is {_NO_SEAMLESS}"
        for config, code, name in _TABLE
        if code is None
        for alias in (config, config.split("_")[0], name.lower())
    }
)
"""FLEURS config, ISO 639-1 code or English name of a language Seamless lacks -> why."""

LANGUAGE_ALIASES: Mapping[str, tuple[str, str]] = MappingProxyType(_aliases())
"""Lower-case ISO 639-1 (``de``), ISO 639-3 / 639-2 (``ger``, ``zho``), FLEURS config
(``de_de``) or English name (``german``) -> (Seamless code, what the alias is)."""


def to_seamless(name: str) -> str | None:
    """The Seamless code ``name`` stands for (``de``, ``de_de``, ``de-DE``, ``German``,
    ``ger`` -> ``deu``), ``name`` itself if it is one, else ``None``."""
    if name in SPEECH_INPUT_CODES or name in TEXT_OUTPUT_CODES:
        return name
    hit = LANGUAGE_ALIASES.get(name.strip().lower().replace("-", "_"))
    return hit[0] if hit else None


def validate_language(code: object, allowed: Iterable[str], what: str = "language") -> str:
    """Return ``code`` if it is in ``allowed``, else raise a one-line ValueError with a hint.

    The hint maps a FLEURS config to its Seamless code (and back) when that is what the
    caller meant, else suggests close matches (difflib).

    Example: ``validate_language("de_de", {"deu", "eng"})`` raises
    ``language must be one of ['deu', 'eng'], got 'de_de'; 'de_de' is the FLEURS config
    of Seamless code 'deu': use 'deu'``.
    """
    allowed_set = set(allowed)
    if isinstance(code, str) and code in allowed_set:
        return code
    raise ValueError(
        f"{what} must be one of {format_allowed(allowed_set)}, got {code!r}; "
        f"{language_hint(code, allowed_set)}"
    )


def language_error(
    where: str, code: object, allowed: Iterable[str], fallback: str | None = None
) -> str:
    """A config violation line for a language code outside ``allowed``:
    ``<where>: must be one of [...], got <code>; <fix>``, the fix from :func:`language_hint`.

    Example: ``language_error("languages[1]", "de", {"deu", "eng"})`` is ``"languages[1]:
    must be one of ['deu', 'eng'], got 'de'; 'de' is the ISO 639-1 code of German: did you
    mean 'deu'?"``.
    """
    allowed = set(allowed)
    hint = language_hint(code, allowed, fallback)
    return f"{where}: must be one of {format_allowed(allowed)}, got {code!r}; {hint}"


def language_hint(code: object, allowed: Iterable[str], fallback: str | None = None) -> str:
    """The fix part of an unknown-language message: what ``code`` is and the allowed code it
    maps to (ISO 639-1/3, FLEURS config, English name -> Seamless code, or Seamless code ->
    FLEURS config), else close matches, else ``fallback`` (or a pointer to this table).

    Example: ``language_hint("de", {"deu", "eng"})`` is
    ``"'de' is the ISO 639-1 code of German: did you mean 'deu'?"``.
    """
    allowed = set(allowed)
    if not isinstance(code, str):
        return f"pass a language code string, not {type(code).__name__}"
    as_seamless = FLEURS_TO_SEAMLESS.get(code)
    if as_seamless in allowed:
        return (
            f"{code!r} is the FLEURS config of Seamless code {as_seamless!r}: use {as_seamless!r}"
        )
    as_fleurs = SEAMLESS_TO_FLEURS.get(code)
    if as_fleurs in allowed:
        return f"{code!r} is the Seamless code of FLEURS config {as_fleurs!r}: use {as_fleurs!r}"
    key = code.strip().lower().replace("-", "_")
    if key in _UNSUPPORTED_ALIASES:
        return f"{_UNSUPPORTED_ALIASES[key]}, so it cannot be used here"
    alias = LANGUAGE_ALIASES.get(key)
    if alias is not None and alias[0] in allowed:
        return f"{code!r} is {alias[1]}: did you mean {alias[0]!r}?"
    close = difflib.get_close_matches(code, sorted(allowed), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return fallback or "see crossmodal.data.languages for the FLEURS <-> Seamless table"
