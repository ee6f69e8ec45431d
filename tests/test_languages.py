"""The FLEURS <-> Seamless table and the language sets, against the published lists.

References pasted here (not derived from the module under test): the 102 configs of the
google/fleurs loading script, and the Seamless README table's speech-only rows.
"""

from __future__ import annotations

import pytest

from crossmodal.data.languages import (
    FLEURS_TO_SEAMLESS,
    LANGUAGE_NAMES,
    SEAMLESS_TO_FLEURS,
    SPEECH_INPUT_CODES,
    TEXT_INPUT_CODES,
    TEXT_OUTPUT_CODES,
    UNSUPPORTED_FLEURS,
    fleurs_configs,
    fleurs_to_seamless,
    format_allowed,
    seamless_to_fleurs,
    validate_language,
)
from crossmodal.data.sources import REFERENCE_LANGUAGES

# google/fleurs fleurs.py, _FLEURS_LANG.
FLEURS_SCRIPT_CONFIGS = """af_za am_et ar_eg as_in ast_es az_az be_by bn_in bs_ba ca_es ceb_ph
cmn_hans_cn yue_hant_hk cs_cz cy_gb da_dk de_de el_gr en_us es_419 et_ee fa_ir ff_sn fi_fi
fil_ph fr_fr ga_ie gl_es gu_in ha_ng he_il hi_in hr_hr hu_hu hy_am id_id ig_ng is_is it_it
ja_jp jv_id ka_ge kam_ke kea_cv kk_kz km_kh kn_in ko_kr ckb_iq ky_kg lb_lu lg_ug ln_cd lo_la
lt_lt luo_ke lv_lv mi_nz mk_mk ml_in mn_mn mr_in ms_my mt_mt my_mm nb_no ne_np nl_nl nso_za
ny_mw oc_fr om_et or_in pa_in pl_pl ps_af pt_br ro_ro ru_ru bg_bg sd_in sk_sk sl_si sn_zw
so_so sr_rs sv_se sw_ke ta_in te_in tg_tj th_th tr_tr uk_ua umb_ao ur_pk uz_uz vi_vn wo_sn
xh_za yo_ng zu_za""".split()  # noqa: SIM905 - pasted as published


def test_table_covers_exactly_the_102_fleurs_configs() -> None:
    assert len(FLEURS_SCRIPT_CONFIGS) == 102
    assert fleurs_configs() == tuple(sorted(FLEURS_SCRIPT_CONFIGS))
    assert set(LANGUAGE_NAMES) == set(FLEURS_SCRIPT_CONFIGS)


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ("en_us", "eng"),
        ("de_de", "deu"),
        ("es_419", "spa"),
        ("fr_fr", "fra"),
        ("ja_jp", "jpn"),
        ("cmn_hans_cn", "cmn"),
        ("yue_hant_hk", "yue"),
        ("af_za", "afr"),
        ("am_et", "amh"),
        ("ar_eg", "arb"),
        ("zu_za", "zul"),
        ("ms_my", "zlm"),
        ("fa_ir", "pes"),
        ("fil_ph", "tgl"),
        ("mn_mn", "khk"),
        ("om_et", "gaz"),
        ("sw_ke", "swh"),
        ("nb_no", "nob"),
        ("lb_lu", "ltz"),
        ("pt_br", "por"),
    ],
)
def test_known_pairs_both_ways(config: str, code: str) -> None:
    assert fleurs_to_seamless(config) == code
    assert seamless_to_fleurs(code) == config


def test_unsupported_configs_map_to_none_with_a_reason() -> None:
    none = {c for c, s in FLEURS_TO_SEAMLESS.items() if s is None}
    assert (
        none == {"ha_ng", "ln_cd", "mi_nz", "nso_za", "umb_ao", "wo_sn"} == set(UNSUPPORTED_FLEURS)
    )
    assert fleurs_to_seamless("ha_ng") is None
    assert UNSUPPORTED_FLEURS["wo_sn"].startswith("Wolof is not among SeamlessM4T v2's languages")


def test_mapping_is_one_to_one_and_matches_the_model_sets() -> None:
    mapped = [s for s in FLEURS_TO_SEAMLESS.values() if s is not None]
    assert len(mapped) == len(set(mapped)) == len(SEAMLESS_TO_FLEURS) == 96
    assert set(mapped) <= SPEECH_INPUT_CODES  # every mapped FLEURS language is read as speech
    speech_only = {"ast", "kam", "kea", "ltz", "oci", "xho"}  # README rows with target "--"
    assert set(mapped) - TEXT_OUTPUT_CODES == speech_only
    assert len(TEXT_OUTPUT_CODES) == 98 and TEXT_INPUT_CODES == TEXT_OUTPUT_CODES
    assert len(SPEECH_INPUT_CODES) == 103
    assert {"cmn_Hant", "sat", "zlm"} <= TEXT_OUTPUT_CODES and "zsm" not in TEXT_OUTPUT_CODES
    assert set(REFERENCE_LANGUAGES) <= TEXT_OUTPUT_CODES


def test_validate_language_messages_are_one_line() -> None:
    assert validate_language("deu", {"deu", "eng"}) == "deu"
    cases = [
        (
            "de_de",
            {"deu", "eng"},
            r"^language must be one of \['deu', 'eng'\], got 'de_de'; 'de_de' is the FLEURS config of Seamless code 'deu': use 'deu'$",
        ),
        ("deu", {"de_de"}, r"'deu' is the Seamless code of FLEURS config 'de_de': use 'de_de'$"),
        (
            "duu",
            TEXT_OUTPUT_CODES,
            r"^language must be one of \['afr', 'amh', .*, 'zlm', 'zul'\] \(98 in all\), got 'duu'; did you mean 'deu'",
        ),
        (
            "ha_ng",
            SEAMLESS_TO_FLEURS,
            r"Hausa is not among SeamlessM4T v2's languages .*cannot be used here$",
        ),
        ("qqqqq", {"deu"}, r"see crossmodal.data.languages"),
        (None, {"deu"}, r"got None; pass a language code string, not NoneType$"),
    ]
    for code, allowed, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            validate_language(code, allowed)
        assert "\n" not in str(info.value)
    with pytest.raises(
        ValueError, match=r"^FLEURS config must be one of .*got 'en_uk'; did you mean 'en_us'"
    ):
        fleurs_to_seamless("en_uk")
    with pytest.raises(ValueError, match=r"^language must be one of .*\(96 in all\), got 'eus'"):
        seamless_to_fleurs("eus")  # Basque: Seamless has it, FLEURS does not


def test_format_allowed_abbreviates() -> None:
    assert format_allowed(["b", "a"]) == "['a', 'b']"
    assert (
        format_allowed([f"x{i:02d}" for i in range(20)], limit=4)
        == "['x00', 'x01', ..., 'x18', 'x19'] (20 in all)"
    )
