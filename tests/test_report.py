"""The report writes valid PNGs and a Markdown summary whose numbers match brute force."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import synthetic_concentration as concentration
from helpers import synthetic_selectivity
from matplotlib.image import imread
from scipy.stats import spearmanr

from crossmodal.reduce.selection import select_sets, set_ids
from crossmodal.report.selection import md_table, write_report

K = 10


def md_section(text: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first Markdown table after ``heading``: {row label: cells}."""
    lines = text.splitlines()
    start = lines.index(heading)
    table = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            if table:
                break
            continue
        table.append([c.strip() for c in ln.strip("|").split("|")])
    assert table, f"no table after {heading!r}"
    header, body = table[0], table[2:]
    return {"__header__": header[1:], **{r[0]: r[1:] for r in body}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Markdown only: the numbers; the figures are rendered by the integration test."""
    ds = synthetic_selectivity(seed=11)
    conc = concentration(ds)
    out = tmp_path_factory.mktemp("report")
    return ds, out, write_report(ds, out, k=K, concentration=conc, figures=False), conc


@pytest.mark.integration
def test_report_writes_expected_files(tmp_path) -> None:
    """Renders all 14 figures (several seconds on 2 CPU cores, hence integration)."""
    ds = synthetic_selectivity(seed=11)
    out = tmp_path
    paths = write_report(ds, out, k=K, concentration=concentration(ds), dpi=40)
    names = {p.name for p in paths}
    expected = {"summary.md", "diagonal_vs_step.png", "concentration.png"}
    for task in ("x2en", "en2x"):
        expected |= {f"overlap_{task}_{kind}.png" for kind in ("top", "bottom", "both")}
        expected |= {f"spearman_{task}.png", f"spearman_{task}_components.png"}
        expected |= {f"layer_counts_{task}.png"}
    assert names == expected  # asr has no text modality: no asr figures
    for p in paths:
        assert p.exists() and p.parent == out
        if p.suffix == ".png":
            img = imread(p)
            assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
            assert img.std() > 0  # not blank


def test_summary_overlap_numbers_match_brute_force(report) -> None:
    ds, out, _, _ = report
    text = (out / "summary.md").read_text()
    sets = select_sets(ds["ap"], k=K)
    for task, kind, step in (("x2en", "top", 1), ("en2x", "both", 11), ("x2en", "bottom", 6)):
        table = md_section(text, f"### Overlap {task} {kind} step {step}")
        assert table["__header__"] == ["eng", "deu", "jpn"]
        for lt in ("eng", "deu", "jpn"):
            for j, ls in enumerate(("eng", "deu", "jpn")):
                cell = {"task": task, "step": step, "kind": kind}
                a = set(set_ids(sets, **cell, modality="text", language=lt).tolist())
                b = set(set_ids(sets, **cell, modality="speech", language=ls).tolist())
                want = "–" if not a or not b else str(len(a & b))
                assert table[lt][j] == want
    assert md_section(text, "### Overlap en2x top step 1")["eng"] == ["–", "–", "–"]


def test_summary_spearman_and_chance_numbers(report) -> None:
    ds, out, _, conc = report
    text = (out / "summary.md").read_text()
    table = md_section(text, "### Spearman x2en step 6")
    t = ds["ap"].sel(task="x2en", modality="text", step=6, language="deu").values
    s = ds["ap"].sel(task="x2en", modality="speech", step=6, language="jpn").values
    assert table["deu"][2] == f"{spearmanr(t, s).statistic:.3f}"
    chance = md_section(text, "## Same-language overlap against chance")
    assert chance["__header__"][:3] == ["diagonal mean", "off-diagonal mean", "random expectation"]
    sets = select_sets(ds["ap"], k=K)
    diag = [
        len(
            set(
                set_ids(
                    sets, task="x2en", modality="text", step=1, language=lang, kind="top"
                ).tolist()
            )
            & set(
                set_ids(
                    sets, task="x2en", modality="speech", step=1, language=lang, kind="top"
                ).tolist()
            )
        )
        for lang in ("eng", "deu", "jpn")
    ]
    row = chance["x2en top step 1"]
    assert row[0] == f"{np.mean(diag):.2f}"
    assert row[2] == f"{K * K / ds.sizes['unit']:.2f}"
    sub = md_section(text, "### Spearman by submodule x2en")
    assert sub["__header__"] == ["1", "6", "11"]
    assert set(sub) - {"__header__"} == {"self_attn", "cross_attn", "ffn", "other"}
    gini = md_section(text, "### Gini en2x")
    want = float(conc.sel(task="en2x", modality="speech", step=11).mean())
    assert gini["speech"][2] == f"{want:.3f}"
    layers = md_section(text, "### Units per layer en2x")
    sets_both = [
        set_ids(sets, task="en2x", modality="text", step=6, language=lang, kind="both")
        for lang in ("deu", "jpn")  # eng has no en2x set: left out of the mean, not a zero
    ]
    layer_of = dict(zip(ds["unit"].values.tolist(), ds["layer"].values.tolist(), strict=True))
    per_lang = [sum(layer_of[u] == 2 for u in ids.tolist()) for ids in sets_both]
    col = layers["__header__"].index("text 6")
    assert layers["2"][col] == f"{np.mean(per_lang):.1f}"


def test_md_table_formats_and_marks_missing() -> None:
    import pandas as pd

    df = pd.DataFrame({"a": [1.0, np.nan], "b": [0.00012, 3.0]}, index=["x", "y"])
    assert md_table(df, ["{:.1f}", "{:.1e}"], "row").splitlines() == [
        "| row | a | b |",
        "|---|---|---|",
        "| x | 1.0 | 1.2e-04 |",
        "| y | – | 3.0e+00 |",
    ]


def test_report_needs_both_modalities(tmp_path) -> None:
    ds = synthetic_selectivity().sel(task=["asr"])
    with pytest.raises(
        ValueError, match=r"task must be one of \[tasks with text and speech data\]"
    ):
        write_report(ds, tmp_path, k=K)


def test_summary_lists_skipped_examples_per_reason(tmp_path) -> None:
    """Collect's skips (reason -> ids) are a table in summary.md; none -> no section."""
    ds = synthetic_selectivity(seed=11)
    skipped = {
        "text_not_utf8": ["deu/test/7"],
        "audio_too_long": [f"fra/test/{i}" for i in range(8)],
    }
    write_report(ds, tmp_path, k=K, skipped=skipped, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "## Skipped examples" in md
    assert (
        "| audio_too_long | 8 | `fra/test/0`, `fra/test/1`, `fra/test/2`, `fra/test/3`, `fra/test/4` |"
        in md
    )
    assert "| text_not_utf8 | 1 | `deu/test/7` |" in md
    write_report(ds, tmp_path / "clean", k=K, skipped={}, figures=False)
    assert "Skipped examples" not in (tmp_path / "clean" / "summary.md").read_text()
