"""``crossmodal verify``: a good store passes; each deliberate corruption is named, one test each.

The stores are written by the real driver (:func:`crossmodal.collect.driver.run_collect`) with a
local executor in place of Ray (``helpers.local_collect``: one in-process
:class:`~crossmodal.collect.collector.Collector`), on a random tiny model with the organism tokenizer
and the organism's synthetic corpus: two families (decoder, ffn_act), two steps, two
poolings, x2en and en2x text, 3 examples per language in shards of 2. Corruptions: layout version, not a store, a missing
root attribute, a part merged before it was done, a lost part (zeroed counts), a doubled
merge, n_rows growing with the step, a histogram that does not sum to the count, NaN
moments, families that disagree, a finished store with an unmerged condition, broken edges.
An unfinished store is not corrupt (a note, exit 0); a store whose parts were deleted after
merging (keep_parts false) passes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import build_model_dir, collect_config, local_collect

from crossmodal.cli import verify as verify_command
from crossmodal.store.verify import verify_store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def good_store(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "s.zarr"
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, collect_config(model_dir, out))
    return out


@pytest.fixture
def store(good_store, tmp_path) -> Path:
    """A fresh copy of the good store, to corrupt."""
    return Path(shutil.copytree(good_store, tmp_path / "s.zarr"))


def _problems(path: Path) -> list[str]:
    report = verify_store(path)
    assert not report.ok
    return report.problems


def _one(problems: list[str], text: str) -> str:
    hits = [p for p in problems if text in p]
    assert len(hits) == 1, problems
    return hits[0]


def _cond(root: zarr.Group, key: str) -> tuple[int, int, int]:
    task, modality, language = key.split("/")
    labels = {
        d: [str(v) for v in root[f"stats/decoder/{d}"][...]]
        for d in ("task", "modality", "language")
    }
    return (
        labels["task"].index(task),
        labels["modality"].index(modality),
        labels["language"].index(language),
    )


def test_good_store_is_ok_on_the_command_line(good_store):
    report = verify_store(good_store)
    assert report.ok and report.notes == []
    root = zarr.open_group(str(good_store), mode="r")
    n_parts = len(root["manifest"].attrs["parts"])
    assert report.checked == {"parts": n_parts, "conditions": 4, "families": 2}
    result = CliRunner().invoke(verify_command, [str(good_store)])
    assert result.exit_code == 0
    assert result.output == f"ok: {good_store} ({n_parts} parts, 4 conditions, 2 families)\n"


def test_store_whose_parts_were_deleted_after_merging_is_ok(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "lean.zarr"
    local_collect(
        monkeypatch,
        collect_config(model_dir, out, keep_parts=False, tasks=["x2en"], modalities=["text"]),
    )
    assert not any((out / "parts/decoder/hist/c").iterdir())  # the shards are gone
    assert verify_store(out).ok


def test_layout_version(store):
    zarr.open_group(str(store), mode="r+").attrs["layout_version"] = 3
    result = CliRunner().invoke(verify_command, [str(store)])
    assert result.exit_code == 1
    assert result.output == (
        "layout_version: must be one of [2], got 3; this crossmodal cannot read it: collect it "
        "again into a new output\n"
    )


def test_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _problems(tmp_path / "empty") == [
        f"store: {str(tmp_path / 'empty')!r} is not a Zarr store (no zarr.json); pass a "
        "`crossmodal collect` output"
    ]


def test_missing_root_attribute(store):
    root = zarr.open_group(str(store), mode="r+")
    attrs = root.attrs.asdict()
    del attrs["plan_hash"]
    root.attrs.put(attrs)
    assert _problems(store) == ["attrs attrs: 'plan_hash' is a required property"]


def test_condition_merged_before_its_parts_were_done(store):
    root = zarr.open_group(str(store), mode="r+")
    parts = root["manifest"].attrs["parts"]
    key = parts["3"]["key"]
    del parts["3"]
    root["manifest"].attrs["parts"] = parts
    problems = _problems(store)
    cond = key.rsplit("/", 1)[0]
    assert _one(problems, "merged before") == (
        f"manifest merged {cond}: parts ['3'] are not done; they were merged before they "
        "were written"
    )


def test_lost_part(store):
    """A part whose writer died after the manifest said done: its counts are zero."""
    root = zarr.open_group(str(store), mode="r+")
    summary = root["manifest"].attrs["parts"]["2"]
    for family in ("decoder", "ffn_act"):
        root[f"parts/{family}/count"][2] = 0
    problems = _problems(store)
    line = _one(problems, "parts/decoder part 2")
    assert "the part was lost or written twice" in line
    assert f"n_rows {summary['n_rows']}" in line
    cond = summary["key"].rsplit("/", 1)[0]
    line = _one(problems, f"stats/decoder[{cond}] count")  # stats != the sum of its parts
    assert line.endswith("a part was merged twice or lost")


def test_doubled_merge(store):
    root = zarr.open_group(str(store), mode="r+")
    at = _cond(root, "x2en/text/deu")
    root["stats/decoder/count"][at] = 2 * root["stats/decoder/count"][at]
    problems = _problems(store)
    assert "a part was merged twice or lost" in _one(problems, "stats/decoder[x2en/text/deu] count")
    _one(problems, "count + dropped")
    hist = [p for p in problems if "do not sum to count" in p]  # every (step, pooling)
    assert len(hist) == 4 and all("stats/decoder[x2en/text/deu] step" in p for p in hist)
    _one(problems, "count differs across families")


def test_rows_growing_with_the_step(store):
    root = zarr.open_group(str(store), mode="r+")
    at = _cond(root, "en2x/text/jpn")
    rows = root["stats/decoder/n_rows"][at]
    root["stats/decoder/n_rows"][at] = [rows[0], rows[0] + 1]
    assert f"n_rows: [{rows[0]}, {rows[0] + 1}] grows with the step [1, 3]" in _one(
        _problems(store), "grows with"
    )


def test_histogram_not_summing_to_count(store):
    root = zarr.open_group(str(store), mode="r+")
    at = _cond(root, "x2en/text/deu")
    hist = root["stats/ffn_act/hist"][(*at, 1, 0)]
    hist[5, 3] += 1
    root["stats/ffn_act/hist"][(*at, 1, 0)] = hist
    n_units = hist.shape[0]
    count = int(root["stats/ffn_act/count"][(*at, 1, 0)])
    assert _problems(store) == [
        f"stats/ffn_act[x2en/text/deu] step 1 pooling 0: 1 of {n_units} unit histograms "
        f"do not sum to count {count}"
    ]


def test_nan_moments(store):
    root = zarr.open_group(str(store), mode="r+")
    at = _cond(root, "en2x/text/deu")
    mean = root["stats/decoder/mean"][(*at, 0, 1)]
    mean[[0, 7]] = [np.nan, np.inf]
    root["stats/decoder/mean"][(*at, 0, 1)] = mean
    assert _problems(store) == [
        f"stats/decoder[en2x/text/deu] step 0 pooling 1: 2 of {mean.size} units have NaN/Inf "
        f"or inconsistent moments (m2 < 0 or min > max) with count "
        f"{int(root['stats/decoder/count'][(*at, 0, 1)])}"
    ]


def test_families_disagree(store):
    root = zarr.open_group(str(store), mode="r+")
    at = _cond(root, "x2en/text/jpn")
    count = root["stats/ffn_act/count"][at]
    root["stats/ffn_act/count"][at] = count - 1
    root["stats/ffn_act/dropped"][at] = root["stats/ffn_act/dropped"][at] + 1
    problems = _problems(store)
    _one(problems, "stats[x2en/text/jpn] count differs across families")


def test_finished_store_with_an_unmerged_condition(store):
    root = zarr.open_group(str(store), mode="r+")
    merged = root["manifest"].attrs["merged"]
    root["manifest"].attrs["merged"] = [k for k in merged if k != "en2x/text/deu"]
    assert _problems(store) == [
        "manifest: the store is marked finished but 1 planned condition(s) are not merged "
        "(en2x/text/deu); resume it with `crossmodal collect`"
    ]


def test_unfinished_store_is_a_note_not_a_problem(store):
    root = zarr.open_group(str(store), mode="r+")
    attrs = root.attrs.asdict()
    del attrs["finished"]
    root.attrs.put(attrs)
    merged = root["manifest"].attrs["merged"]
    root["manifest"].attrs["merged"] = [k for k in merged if k != "en2x/text/deu"]
    report = verify_store(store)
    assert report.ok and report.notes == [
        "incomplete: 3 of 4 conditions merged; resume it with `crossmodal collect CONFIG` "
        "(its own config)"
    ]
    result = CliRunner().invoke(verify_command, [str(store)])
    assert result.exit_code == 0 and result.output.startswith("note: incomplete: 3 of 4")


def test_broken_edges(store):
    root = zarr.open_group(str(store), mode="r+")
    edges = root["edges/decoder/edges"][1, 0, 0, 0]
    edges[4] = edges[4][::-1]
    edges[9, 2] = np.nan
    root["edges/decoder/edges"][1, 0, 0, 0] = edges
    task, modality = str(root["stats/decoder/task"][1]), str(root["stats/decoder/modality"][0])
    assert _problems(store) == [
        f"edges/decoder[{task}, {modality}, step 0, pooling 0]: 2 unit(s) have non-finite or "
        "non-increasing edges"
    ]
