"""The planner: conditions, sharding, pilot, unit counts, size, printout.

Conditions follow docs/method.md, "Tasks and conditions".

Edge cases: a condition the model cannot run (dropped and listed), the last shard shorter
than shard_size, a language with fewer examples than the pilot share, no data (estimate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmodal.collect.config import load_config
from crossmodal.collect.plan import (
    FLEURS_SENTENCES,
    build_plan,
    compression_ratios,
    conditions,
    estimate_size,
    family_sizes,
    format_plan,
    unit_index,
)

ROOT = Path(__file__).resolve().parent.parent
REF = ["eng", "deu", "spa", "fra", "jpn", "cmn"]


def _config(**over):
    raw = {
        "model": "facebook/seamless-m4t-v2-large",
        "languages": REF,
        "data": {"source": "fleurs_raw", "path": "/nonexistent/fleurs"},
    }
    raw.update(over)
    return load_config(raw)


def _ids(n: int, langs=REF) -> dict[str, list[str]]:
    return {lang: [str(1000 + i) for i in range(n)] for lang in langs}


def test_conditions_follow_method():
    conds, dropped = conditions(_config())
    assert dropped == []
    by = {}
    for c in conds:
        by.setdefault((c.task, c.modality), []).append(c)
    assert {k: len(v) for k, v in by.items()} == {
        ("x2en", "speech"): 5,
        ("x2en", "text"): 5,
        ("en2x", "speech"): 5,
        ("en2x", "text"): 5,
        ("asr", "speech"): 6,
    }
    for c in conds:
        if c.task == "x2en":
            assert (c.source, c.target) == (c.language, "eng") and c.language != "eng"
        elif c.task == "en2x":
            assert (c.source, c.target) == ("eng", c.language) and c.language != "eng"
        else:
            assert c.source == c.target == c.language and c.modality == "speech"


def test_conditions_drop_what_the_model_cannot_do():
    conds, dropped = conditions(_config(languages=["eng", "ast", "deu"]))
    assert "en2x/text/ast: no text output" in dropped
    assert "x2en/text/ast: no text input" in dropped
    assert any(c.key == "x2en/speech/ast" for c in conds)  # speech input exists
    assert not any(c.key.startswith(("en2x/speech/ast", "asr/speech/ast")) for c in conds)


def test_work_units_shard_the_examples():
    plan = build_plan(_config(shard_size=4), ids=_ids(10))
    assert len(plan.work_units) == 26 * 3 and plan.n_examples == 26 * 10
    assert [w.index for w in plan.work_units] == list(range(len(plan.work_units)))
    first = plan.units_of(plan.conditions[0])
    assert [w.n_examples for w in first] == [4, 4, 2] and [w.shard for w in first] == [0, 1, 2]
    assert sum((w.example_ids for w in first), ()) == tuple(str(1000 + i) for i in range(10))
    en2x = [w for w in plan.work_units if w.condition.task == "en2x" and w.shard == 0]
    assert len({w.example_ids for w in en2x}) == 1  # the same English inputs per target
    d = plan.to_dict()
    assert d["work_units"][0]["ids"] == list(first[0].example_ids)


def test_subset_keeps_parallel_sentences_and_is_seeded():
    ids = _ids(30)
    ids["deu"] = ids["deu"][5:]  # deu lacks a few sentences
    plan = build_plan(
        _config(data={"source": "fleurs_raw", "path": "/x", "examples_per_language": 8}), ids=ids
    )
    chosen = {w.condition.source: set(w.example_ids) for w in plan.work_units}
    assert all(len(v) == 8 for v in chosen.values())
    assert len(chosen["eng"] & chosen["spa"]) == 8  # same order -> same sentences
    again = build_plan(
        _config(data={"source": "fleurs_raw", "path": "/x", "examples_per_language": 8}), ids=ids
    )
    other = build_plan(
        _config(data={"source": "fleurs_raw", "path": "/x", "examples_per_language": 8}, seed=3),
        ids=ids,
    )
    assert again.hash == plan.hash and other.hash != plan.hash


def test_pilot_spreads_over_languages():
    plan = build_plan(_config(pilot_size=12), ids=_ids(10))
    assert len(plan.pilots) == 5
    for p in plan.pilots:
        sizes = [len(ids) for _, ids in p.items]
        assert sum(sizes) == 12 and max(sizes) - min(sizes) <= 1
        for cond, ids in p.items:
            assert set(ids) <= set(_ids(10)[cond.source]) and len(set(ids)) == len(ids)
    small = build_plan(_config(pilot_size=100), ids=_ids(3))
    assert all(len(ids) == 3 for p in small.pilots for _, ids in p.items)


def test_estimate_without_data():
    plan = build_plan(_config())
    assert plan.estimated and "ESTIMATE" in plan.note
    assert plan.n_examples == 26 * FLEURS_SENTENCES["test"]
    assert all(w.example_ids == () for w in plan.work_units)


def test_no_condition_is_an_error():
    with pytest.raises(ValueError, match="must give one of \\[>= 1 condition\\]"):
        build_plan(_config(tasks=["en2x"], languages=["eng", "ast"]))


def test_unit_counts_from_config_without_weights():
    config = load_config(ROOT / "configs" / "reference.yaml")
    sizes = family_sizes(unit_index(config))
    assert sizes == {"decoder": 492_544}  # 24 x 20,480 + final layer norm (docs/method.md, "Units")
    ffn = load_config({**config.to_dict(), "families": ["ffn_act"]})
    assert family_sizes(unit_index(ffn)) == {"ffn_act": 196_608}


def test_compression_ratios_measured():
    r = compression_ratios(300, 64)
    assert r["hist"] > 3 and 1 <= r["mean"] < 3 and r["edges"] >= 1


@pytest.mark.parametrize(
    "name,n_parts,n_examples",
    [("reference.yaml", 26, 26 * 350), ("fleurs-all.yaml", 452, 452 * 350)],
)
def test_dry_run_numbers_for_shipped_configs(name, n_parts, n_examples):
    config = load_config(ROOT / "configs" / name)
    plan = build_plan(config)
    assert len(plan.work_units) == n_parts and plan.n_examples == n_examples
    sizes = {"decoder": 492_544}
    lines = {s.group: s for s in estimate_size(plan, sizes)}
    stats = lines["stats/decoder"]
    assert stats.uncompressed == len(plan.conditions) * 6 * 492_544 * (32 + 4 * 258)
    assert lines["edges/decoder"].uncompressed == 5 * 6 * 492_544 * 257 * 4
    assert 0 < stats.compressed < stats.uncompressed
    text = format_plan(plan, sizes, name)
    assert "ESTIMATE" in text and "492,544" in text and f"{n_examples:,}" in text
    assert "total (peak)" in text


def test_job_dry_run_and_config_errors(tmp_path):
    """`python -m jobs.collect CONFIG --dry-run` prints the plan; a bad config one line each."""
    from click.testing import CliRunner

    from jobs.collect import main

    result = CliRunner().invoke(main, [str(ROOT / "configs" / "reference.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "decoder 492,544" in result.output and "total (peak)" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [x2fr]\nsteps: [0]\n")
    result = CliRunner().invoke(main, [str(bad), "--dry-run"])
    assert result.exit_code == 2
    # the schema's two, and the cross-field check run on the defaults (organism data needs
    # examples_per_language): every error in one round
    assert "3 config error(s)" in result.output
    assert "data.examples_per_language: required for source 'organism'" in result.output
    assert "tasks[0]: must be one of ['x2en', 'en2x', 'asr'], got 'x2fr'" in result.output
