"""Steering refuses what its selectivity store cannot serve, in one line, before any model.

- a step, language, task (role) or unit modality absent from the store: one line naming the
  value and what the store has (was: a 98-line xarray KeyError);
- a cell whose set forces no unit (empty, or every forcing value NaN): refused unless
  ``allow_empty_sets: true`` (was: every such cell ran with 0 forced units, no warning);
- cell ids hash the selectivity's CONTENT: the same values at another path give the same
  ids, other values at the same path other ids (was: the path, so a rewritten store reused
  stale results: "0 cells (17 already done)").
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from crossmodal.steer.grid import expand, load_grid
from crossmodal.steer.source import SelectivityError, check_grid_values, selectivity_digest


def _write(ds: xr.Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: fixed-width strings have no v3 spec yet
        ds.to_zarr(path, group="selectivity/decoder", mode="w", consolidated=False)
    return path


def _grid(path: Path, out: Path, **kw):
    raw = {
        "model": "organism",
        "selectivity": {"path": str(path)},
        "roles": ["control"],
        "unit_modalities": ["speech"],
        "steps": [1],
        "languages": ["deu"],
        "set_sizes": [5],
        "random_seeds": [0],
        "n_inputs": 2,
        "lid": {"backends": ["organism"]},
        "output": str(out),
        "input_modalities": ["text"],
    }
    raw.update(kw)
    return load_grid(raw)


@pytest.fixture
def store(tmp_path) -> Path:
    from helpers import synthetic_selectivity

    return _write(synthetic_selectivity(), tmp_path / "sel.zarr")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"steps": [1, 2]},
            "steering steps must be one of [1, 6, 11] (steps of selectivity "
            "store '{path}'), got 2; drop it from the grid or collect and reduce it",
        ),
        (
            {"languages": ["deu", "spa"]},
            "steering languages must be one of ['eng', 'deu', "
            "'jpn'] (languages of selectivity store '{path}'), got 'spa'",
        ),
        ({"roles": ["representation"]}, None),
        ({"forcing": ["on_p50", "off_mean"]}, None),
    ],
)
def test_a_value_the_store_lacks_is_one_line_and_nothing_is_written(
    store, tmp_path, override, message
):
    from crossmodal.steer.driver import run_steer

    config = _grid(store, tmp_path / "out", **override)
    if message is None:  # present in the store: passes the check
        check_grid_values(
            config, xr.open_zarr(store, group="selectivity/decoder", consolidated=False)
        )
        return
    with pytest.raises(SelectivityError) as err:
        run_steer(config, progress=False, echo=lambda _: None)
    assert str(err.value).startswith(message.format(path=store)) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "grid.json").exists()


def test_an_empty_set_is_refused_unless_allowed(tmp_path):
    from helpers import synthetic_selectivity

    from crossmodal.steer.driver import run_steer
    from crossmodal.steer.source import check_sets

    ds = synthetic_selectivity()
    ds["on_p50"].loc[{"task": "en2x", "modality": "speech", "step": 1, "language": "deu"}] = np.nan
    path = _write(ds, tmp_path / "sel.zarr")
    config = _grid(path, tmp_path / "out")
    with pytest.raises(SelectivityError) as err:
        run_steer(config, progress=False, echo=lambda _: None)
    line = str(err.value)
    assert line.startswith("steering cell sets must force >= 1 unit, got 0 for {'kind': 'selected'")
    assert "set allow_empty_sets: true" in line and "\n" not in line
    assert not (tmp_path / "out" / "grid.json").exists()
    assert not (tmp_path / "out" / "parts").exists()
    allowed = _grid(path, tmp_path / "out", allow_empty_sets=True)
    check_sets(allowed, expand(allowed, "x"), ds)  # explicitly allowed: no refusal
    step6 = _grid(path, tmp_path / "out", steps=[6])
    check_sets(step6, expand(step6, "x"), ds)  # the other step's values are observed


def test_cell_ids_follow_the_content_not_the_path(store, tmp_path):
    config = _grid(store, tmp_path / "out")
    ids = {c.id for c in expand(config, selectivity_digest(config.selectivity))}
    moved = shutil.move(str(store), str(tmp_path / "elsewhere.zarr"))
    config_moved = _grid(Path(moved), tmp_path / "out")
    assert {c.id for c in expand(config_moved, selectivity_digest(config_moved.selectivity))} == ids
    from helpers import synthetic_selectivity

    _write(synthetic_selectivity(seed=1), store)  # other values, the first store's path
    other = {c.id for c in expand(config, selectivity_digest(config.selectivity))}
    assert not other & ids


def test_a_non_utf8_transcript_is_never_a_steering_input_or_reference(tmp_path):
    """The data source skips and counts it (``text_not_utf8``, crossmodal/data/fleurs.py);
    steering reads its inputs through the same source, so 1003 (German transcript not UTF-8)
    is neither an input nor a reference, and no U+FFFD reaches the model."""
    from fleurs_fixture import build_fleurs

    from crossmodal.data import open_source
    from crossmodal.steer.worker import input_records

    fx = build_fleurs(tmp_path)
    tsv = fx.root / "data" / "de_de" / "test.tsv"
    lines = tsv.read_bytes().split(b"\n")
    lines = [ln.replace(b"Ein Stereo-Clip.", b"Ein Stereo\xff-Clip.") for ln in lines]
    tsv.write_bytes(b"\n".join(lines))
    config = load_grid(
        {
            "selectivity": {"path": "unused"},
            "languages": ["deu", "cmn"],
            "n_inputs": 3,
            "data": {"source": "fleurs_raw", "path": str(fx.root), "split": "test", "seed": 1},
            "input_modalities": ["text"],
        }
    )
    inputs, refs = input_records(config, speech=False)
    assert sorted(r.id for r in inputs) == ["1001", "1008"]  # 1003 dropped: no German text
    assert "1003" not in refs["deu"]
    assert not any("\ufffd" in t for by in refs.values() for t in by.values())
    source = open_source("fleurs_raw", path=str(fx.root), audio=False)
    list(source.records("deu", "test"))
    assert source.skipped.counts["text_not_utf8"] == 1
