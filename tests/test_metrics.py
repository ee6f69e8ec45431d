"""Script, code-mixing and quality metrics against hand-computed values and sacreBLEU/jiwer.

Tricky cases: whitespace and punctuation (no script), Japanese tokens spanning kanji and
kana, Latin+CJK tokens, empty outputs, one-script outputs (M = I = 0), misaligned lists.
"""

from __future__ import annotations

import math

import jiwer
import pytest
import sacrebleu

from crossmodal.steer import metrics as M


def test_char_scripts_and_rates():
    text = "ab 猫ねコ!"
    assert M.char_scripts(text) == ["latin", "latin", "han", "hiragana", "katakana", None]
    r = M.code_mixing(text)
    assert r["char_latin"] == pytest.approx(2 / 6)
    assert (
        r["char_han"]
        == r["char_hiragana"]
        == r["char_katakana"]
        == r["char_other"]
        == pytest.approx(1 / 6)
    )
    # counts latin 2, han 1, hira 1, kata 1 -> p = .4 .2 .2 .2 -> (1 - .28) / 3
    assert r["char_m_index"] == pytest.approx((1 - (0.16 + 0.04 * 3)) / 3)
    # scripted sequence: L L H h K -> 3 switches over 4 gaps
    assert r["char_i_index"] == pytest.approx(3 / 4)


def test_m_index_hand_values():
    assert M.m_index({"latin": 5}) == 0.0
    assert M.m_index({}) == 0.0
    assert M.m_index({"latin": 1, "han": 1}) == pytest.approx(1 / 6)
    assert M.m_index({s: 3 for s in M.SCRIPTS}) == pytest.approx(0.75 / 3)  # even mix: 1/n
    assert M.m_index({"latin": 1, "han": 1}, scripts=("latin", "han")) == pytest.approx(0.5)
    assert M.m_index({"latin": 3, "han": 1}, scripts=("latin", "han")) == pytest.approx(1 - 0.625)


def test_i_index_hand_values():
    assert M.i_index([]) == 0.0
    assert M.i_index(["latin"]) == 0.0
    assert M.i_index(["latin", None, "latin", "han", "han", "latin"]) == pytest.approx(2 / 4)
    assert M.i_index(["han", "latin"] * 3) == 1.0


def test_token_labels():
    assert M.token_script("\u2581cat") == "latin"
    assert M.token_script("食べ") in {
        "han",
        "hiragana",
    }  # one each: majority tie -> first in SCRIPTS
    assert M.token_script("食べる") == "hiragana"
    assert M.token_script("abc猫") == "mixed"
    assert M.token_script("\u2581,") is None
    r = M.code_mixing("cat 猫", tokens=["\u2581cat", "\u2581猫", "\u2581,", "x猫"])
    assert r["tok_latin"] == r["tok_han"] == r["tok_mixed"] == r["tok_other"] == 0.25
    assert r["tok_m_index"] == pytest.approx(1 / 6)  # latin 1, han 1 (mixed is not a script)
    assert r["tok_i_index"] == pytest.approx(2 / 2)  # latin -> han -> mixed


def test_empty_output():
    r = M.code_mixing("", tokens=[])
    assert r["char_latin"] == 0.0 and r["char_m_index"] == 0.0 and r["tok_i_index"] == 0.0


HYPS = ["the cat sat on the mat", "a dog is here", ""]
REFS = ["the cat sat on a mat", "the dog is here", "nothing"]


def test_bleu_and_chrfpp_equal_sacrebleu():
    assert M.corpus_bleu(HYPS, REFS) == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    chrf = sacrebleu.metrics.CHRF(char_order=6, word_order=2)
    assert M.corpus_chrfpp(HYPS, REFS) == chrf.corpus_score(HYPS, [REFS]).score
    assert M.sentence_chrfpp(HYPS[0], REFS[0]) == chrf.sentence_score(HYPS[0], [REFS[0]]).score
    assert M.sentence_bleu(HYPS[0], REFS[0]) == sacrebleu.sentence_bleu(HYPS[0], [REFS[0]]).score
    assert (
        M.sentence_bleu("x", "x y z w v")
        < M.sentence_bleu(REFS[0], REFS[0])
        == pytest.approx(100.0)
    )


def test_chrfpp_hand_value():
    """Identical strings score 100; chrF++ of a disjoint pair is 0."""
    assert M.sentence_chrfpp("abc def", "abc def") == 100.0
    assert M.sentence_chrfpp("xyz", "abc") == 0.0


def test_cjk_bleu_tokenisation():
    hyp, ref = ["猫が座った"], ["猫が座っている"]
    assert M.bleu_tokenizer("jpn") == "char" and M.bleu_tokenizer("cmn") == "zh"
    assert (
        M.corpus_bleu(hyp, ref, "jpn") == sacrebleu.corpus_bleu(hyp, [ref], tokenize="char").score
    )
    assert M.corpus_bleu(hyp, ref, "cmn") == sacrebleu.corpus_bleu(hyp, [ref], tokenize="zh").score
    assert M.corpus_bleu(hyp, ref, "jpn") > 0 == M.corpus_bleu(hyp, ref, "deu")


def test_wer_cer_hand_and_jiwer():
    assert M.wer("a b c d", "a x c") == pytest.approx(2 / 4)  # one substitution, one deletion
    assert M.cer("abcd", "abd") == pytest.approx(1 / 4)
    assert M.wer(REFS, HYPS) == jiwer.wer(REFS, HYPS)
    assert M.cer(REFS, HYPS) == jiwer.cer(REFS, HYPS)
    assert math.isnan(M.wer([""], ["a"]))


def test_misaligned_lists_raise():
    with pytest.raises(
        ValueError, match=r"references must have one entry per hypothesis \(2\), got 1"
    ):
        M.corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references must have one entry per hypothesis"):
        M.wer(["a"], ["a", "b"])
