"""Outcome metrics of steered outputs: scripts and code-mixing, BLEU, chrF++, WER, CER.

Forcing control units rarely switches the output language cleanly: the paper reports
code-mixed outputs (docs/method.md, finding 3), so script rates and code-mixing indices are
measured alongside translation quality.

Definitions (docs/method.md, "Interventions"; the reference code's
``codemix_seamless_regex_metrics.py``):
- Scripts: Latin, Han, Hiragana, Katakana (Unicode ``Script=`` properties); anything else
  (digits, punctuation, other scripts) is ``other``. Character rates divide by the
  non-whitespace characters (the reference divides by ``len(text)``, spaces included, which
  makes Latin text look less Latin than CJK text of the same content).
- Token labels: a token is the one script its characters share, ``mixed`` when it holds
  Latin and a CJK script, ``None`` when it has no scripted character (ignored by I-index).
- M-index = (1 - sum p_i^2) / (n - 1) with p_i the share of script i among the n = 4
  scripts: the paper's and the reference code's form, 0 for one script and 1/n for an
  even n-way mix (Barnett's M-index would also divide by sum p_i^2, reaching 1).
- I-index = script switches / (N - 1) over the N scripted units in order (0 when N < 2).
- BLEU and chrF++ via sacreBLEU (chrF++ = character order 6, word order 2); BLEU tokenises
  Chinese with ``zh`` and Japanese by character (``ja-mecab`` needs MeCab, absent offline).
- WER and CER via jiwer (``jiwer.wer(reference, hypothesis)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jiwer
import pandas as pd
import regex
import sacrebleu

SCRIPTS = ("latin", "han", "hiragana", "katakana")
CJK_SCRIPTS = ("han", "hiragana", "katakana")
CJK_TARGETS = frozenset({"jpn", "cmn", "cmn_Hant", "yue"})
"""Target languages whose outputs get the script and code-mixing metrics."""

_SCRIPT_RE = {
    "latin": regex.compile(r"\p{Script=Latin}"),
    "han": regex.compile(r"\p{Script=Han}"),
    "hiragana": regex.compile(r"\p{Script=Hiragana}"),
    "katakana": regex.compile(r"\p{Script=Katakana}"),
}
_BLEU_TOKENIZE = {
    "cmn": "zh",
    "cmn_Hant": "zh",
    "yue": "zh",
    "jpn": "char",
    "kor": "char",
    "tha": "char",
}
CHRF_CHAR_ORDER, CHRF_WORD_ORDER = 6, 2
SENTENCEPIECE_SPACE = "\u2581"


def char_script(char: str) -> str | None:
    """The script of one character among :data:`SCRIPTS`, or ``None``."""
    for name, pattern in _SCRIPT_RE.items():
        if pattern.match(char):
            return name
    return None


def char_scripts(text: str) -> list[str | None]:
    """One label per non-whitespace character of ``text``."""
    return [char_script(c) for c in text if not c.isspace()]


def token_script(token: str) -> str | None:
    """A token's script: its characters' (majority) script, ``mixed`` (Latin + CJK) or ``None``."""
    labels = [s for s in char_scripts(token.replace(SENTENCEPIECE_SPACE, "")) if s is not None]
    if not labels:
        return None
    if "latin" in labels and len(set(labels)) > 1:
        return "mixed"
    # a CJK-only token spanning scripts (Japanese kanji + okurigana): its majority script
    return max(SCRIPTS, key=labels.count)


def rates(labels: Sequence[str | None], names: Sequence[str]) -> dict[str, float]:
    """Share of each name among ``labels`` (``other`` collects the rest); zeros when empty."""
    n = len(labels)
    out = {name: (sum(1 for x in labels if x == name) / n if n else 0.0) for name in names}
    out["other"] = (sum(1 for x in labels if x not in names) / n) if n else 0.0
    return out


def m_index(counts: Mapping[str, float], scripts: Sequence[str] = SCRIPTS) -> float:
    """(1 - sum p_i^2) / (n - 1) over ``scripts``; 0 when none of them occurs.

    Example: ``m_index({"latin": 1, "han": 1})`` = (1 - 0.5) / 3 = 1/6.
    """
    total = sum(counts.get(s, 0) for s in scripts)
    if total == 0 or len(scripts) < 2:
        return 0.0
    return (1.0 - sum((counts.get(s, 0) / total) ** 2 for s in scripts)) / (len(scripts) - 1)


def i_index(labels: Sequence[str | None]) -> float:
    """Switches between consecutive scripted labels / (N - 1); ``None`` labels are skipped."""
    seq = [x for x in labels if x is not None]
    if len(seq) < 2:
        return 0.0
    return sum(1 for a, b in zip(seq, seq[1:], strict=False) if a != b) / (len(seq) - 1)


def code_mixing(text: str, tokens: Sequence[str] | None = None) -> dict[str, float]:
    """Character (and, given the model's tokens, token) script rates, M-index and I-index.

    Keys: ``char_<script>`` and ``char_other`` rates, ``char_m_index``, ``char_i_index``, and
    with ``tokens``: ``tok_<script>``, ``tok_mixed``, ``tok_other``, ``tok_m_index``,
    ``tok_i_index``.
    """
    chars = char_scripts(text)
    out = {f"char_{k}": v for k, v in rates(chars, SCRIPTS).items()}
    out["char_m_index"] = m_index({s: chars.count(s) for s in SCRIPTS})
    out["char_i_index"] = i_index(chars)
    if tokens is not None:
        labels = [token_script(t) for t in tokens]
        out.update({f"tok_{k}": v for k, v in rates(labels, (*SCRIPTS, "mixed")).items()})
        out["tok_m_index"] = m_index({s: labels.count(s) for s in SCRIPTS})
        out["tok_i_index"] = i_index(labels)
    return out


def bleu_tokenizer(language: str | None) -> str:
    """sacreBLEU tokenizer for a target language (``13a`` unless CJK/Thai)."""
    return _BLEU_TOKENIZE.get(language or "", "13a")


def sentence_bleu(hypothesis: str, reference: str, language: str | None = None) -> float:
    """sacreBLEU sentence BLEU (exp smoothing) against one reference."""
    return float(
        sacrebleu.sentence_bleu(hypothesis, [reference], tokenize=bleu_tokenizer(language)).score
    )


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str], language: str | None = None
) -> float:
    """sacreBLEU corpus BLEU, one reference per hypothesis."""
    _same_length(hypotheses, references)
    return float(
        sacrebleu.corpus_bleu(
            list(hypotheses), [list(references)], tokenize=bleu_tokenizer(language)
        ).score
    )


def sentence_chrfpp(hypothesis: str, reference: str) -> float:
    """chrF++ (character order 6, word order 2) of one sentence."""
    return float(
        sacrebleu.sentence_chrf(
            hypothesis, [reference], char_order=CHRF_CHAR_ORDER, word_order=CHRF_WORD_ORDER
        ).score
    )


def corpus_chrfpp(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF++ (character order 6, word order 2)."""
    _same_length(hypotheses, references)
    return float(
        sacrebleu.corpus_chrf(
            list(hypotheses),
            [list(references)],
            char_order=CHRF_CHAR_ORDER,
            word_order=CHRF_WORD_ORDER,
        ).score
    )


def wer(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Word error rate (jiwer); NaN when every reference is empty."""
    refs, hyps = _as_lists(references, hypotheses)
    return float(jiwer.wer(refs, hyps)) if any(r.strip() for r in refs) else float("nan")


def cer(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Character error rate (jiwer); NaN when every reference is empty."""
    refs, hyps = _as_lists(references, hypotheses)
    return float(jiwer.cer(refs, hyps)) if any(r.strip() for r in refs) else float("nan")


def _as_lists(
    references: Sequence[str] | str, hypotheses: Sequence[str] | str
) -> tuple[list[str], list[str]]:
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    _same_length(hyps, refs)
    return refs, hyps


def _same_length(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"references must have one entry per hypothesis ({len(hypotheses)}), got "
            f"{len(references)}; pass aligned lists"
        )


def summarize(
    frame: pd.DataFrame,
    *,
    keys: Sequence[str],
    lid_prefixes: Sequence[str],
    languages: Sequence[str],
    output_language: str,
) -> pd.DataFrame:
    """Per-cell summary of a steering results table (one row per cell and input).

    Columns: ``keys`` (constant per cell), ``n_inputs``, ``target_share`` (share of outputs
    whose top language, by the first LID backend, is the cell's language) and ``p_target``;
    per backend ``<prefix>_target_share``, ``<prefix>_mean_p_<lang>`` and ``<prefix>_share_<lang>``
    (share of outputs whose top language is ``lang``, baselines included); corpus BLEU and
    chrF++ against the cell-language references (``*_target``) and the output-language
    references (``*_output``), corpus WER/CER against the latter; the mean of every
    ``char_*``/``tok_*`` script and code-mixing column and of ``n_tokens``.
    """
    mix = [c for c in frame.columns if c.startswith(("char_", "tok_"))]
    rows = []
    for cell_id, g in frame.groupby("cell_id", sort=False):
        first = g.iloc[0]
        lang = first["language"] if isinstance(first["language"], str) else None
        row: dict[str, object] = {
            "cell_id": cell_id,
            **{k: first[k] for k in keys},
            "n_inputs": len(g),
        }
        hits = g["target_hit"].dropna().astype(bool) if "target_hit" in g else pd.Series(dtype=bool)
        row["target_share"] = float(hits.mean()) if lang and len(hits) else float("nan")
        row["p_target"] = float(g["p_target"].mean()) if lang else float("nan")
        for prefix in lid_prefixes:
            tops = g[f"{prefix}_top"]
            row[f"{prefix}_target_share"] = float((tops == lang).mean()) if lang else float("nan")
            for code in languages:
                row[f"{prefix}_mean_p_{code}"] = float(g[f"{prefix}_p_{code}"].mean())
                row[f"{prefix}_share_{code}"] = float((tops == code).mean())
        hyps = g["text"].tolist()
        if lang:
            refs = g["reference_target"].tolist()
            row["bleu_target"], row["chrf_target"] = (
                corpus_bleu(hyps, refs, lang),
                corpus_chrfpp(hyps, refs),
            )
        else:
            row["bleu_target"] = row["chrf_target"] = float("nan")
        refs = g["reference_output"].tolist()
        row["bleu_output"] = corpus_bleu(hyps, refs, output_language)
        row["chrf_output"] = corpus_chrfpp(hyps, refs)
        row["wer_output"], row["cer_output"] = wer(refs, hyps), cer(refs, hyps)
        row.update({c: float(g[c].mean()) for c in [*mix, "n_tokens"]})
        rows.append(row)
    return pd.DataFrame(rows)
