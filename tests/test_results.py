"""crossmodal.store.results on a small synthetic store (no model, no Ray): fast unit tests.

The groups are written with :func:`crossmodal.store.datasets.write_dataset`, the writer the reduce
job uses, so these tests also pin the layout: dimension names, non-index coordinates,
variable-length strings (read back as numpy StringDType, which results turns into '<U'
label axes and object site names, because numpy cannot ``.astype(str)`` StringDType).
Edge cases: a non-default pooling in a subgroup, a scope absent from the sets, a missing
group, steering runs linked from the store's attrs (an unlinked sibling is not one), two steering
runs (ambiguous default).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from crossmodal.reduce.overlap import overlap
from crossmodal.reduce.selection import scope_mask, select_sets, set_ids
from crossmodal.store import results
from crossmodal.store.datasets import write_dataset
from crossmodal.store.layout import StoreDims, UnitCoords, create_store

LANGS = ["eng", "deu", "fra"]
SITES = ["decoder.layers.0.self_attn.q_proj", "decoder.layers.0.ffn.fc1", "decoder.layer_norm"]
SIZES = [6, 8, 4]


def _coords() -> UnitCoords:
    sizes = np.asarray(SIZES, dtype=np.int64)
    return UnitCoords(
        {
            "site_name": np.asarray(SITES),
            "site_path": np.asarray([s.replace("decoder", "text_decoder", 1) for s in SITES]),
            "site_layer": np.asarray([0, 0, -1], np.int16),
            "site_submodule": np.asarray(["self_attn", "ffn", "final_norm"]),
            "site_type": np.asarray(["Linear", "Linear", "LayerNorm"]),
            "site_positions": np.asarray(["decoder"] * 3),
            "site_offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
            "site_size": sizes,
        }
    )


def _selectivity(seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    shape = (2, 2, 2, len(LANGS), n)
    ap = rng.uniform(0.1, 0.9, shape)
    ap[:, :, :, 0] = np.nan  # eng is no condition of x2en/en2x
    site = np.repeat(np.arange(3), SIZES)
    sub = np.asarray(["self_attn", "ffn", "other"])[site]
    data = {
        name: (("task", "modality", "step", "language", "unit"), ap + off)
        for name, off in (("ap", 0.0), ("ap_lo", -0.01), ("ap_hi", 0.01))
    }
    coords = {
        "task": ["x2en", "en2x"],
        "modality": ["speech", "text"],
        "step": [1, 3],
        "language": LANGS,
        "unit": np.arange(n),
        "layer": ("unit", np.where(site < 2, 0, -1)),
        "submodule": ("unit", sub),
        "site": ("unit", np.asarray(SITES)[site]),
        "feature": ("unit", np.arange(n) - np.repeat([0, 6, 14], SIZES)),
    }
    return xr.Dataset(data, coords=coords)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with units, a selectivity per pooling, sets, roles and overlap groups."""
    path = tmp_path_factory.mktemp("res") / "run.zarr"
    dims = StoreDims(
        ("x2en", "en2x"), ("speech", "text"), tuple(LANGS), (1, 3), ("prefix_mean", "last"), 8, ()
    )
    config = {"families": ["decoder"], "poolings": ["prefix_mean", "last"]}
    create_store(
        path,
        dims=dims,
        units={"decoder": _coords()},
        plan={"work_units": []},
        attrs={"config": config},
    )
    views = {"prefix_mean": _selectivity(0), "last": _selectivity(1)}
    write_dataset(path, "selectivity/decoder", views["prefix_mean"])
    write_dataset(path, "selectivity/decoder/last", views["last"])
    per = {
        (p, s): select_sets(ds["ap"], k=3, group=s)
        for p, ds in views.items()
        for s in ("all", "ffn")
    }
    sets = xr.concat(
        [
            xr.concat(
                [per[(p, s)] for p in views],
                pd.Index(list(views), name="pooling"),
                combine_attrs="drop",
            )
            for s in ("all", "ffn")
        ],
        pd.Index(["all", "ffn"], name="scope"),
        combine_attrs="drop",
    )
    write_dataset(path, "sets/decoder", sets.rename("units").assign_attrs(k=3, exact=True))
    ov = overlap(per[("prefix_mean", "all")], views["prefix_mean"])
    ov = ov.expand_dims(scope=["all"]).expand_dims(pooling=["prefix_mean"])
    write_dataset(path, "overlap/decoder/sets", ov.drop_attrs())
    return path, views, per


def test_open_refuses_a_non_store(tmp_path):
    with pytest.raises(ValueError, match="must be one of \\[a store written by"):
        results.open(tmp_path)


def test_selectivity_default_and_other_pooling(store):
    path, views, _ = store
    r = results.open(path)
    ds = r.selectivity()
    assert ds.attrs == {} and ds["ap"].dims == ("task", "modality", "step", "language", "unit")
    np.testing.assert_array_equal(ds["ap"].values, views["prefix_mean"]["ap"].values)
    np.testing.assert_array_equal(
        r.selectivity(pooling="last")["ap"].values, views["last"]["ap"].values
    )
    assert ds["language"].dtype.kind == "U" and ds["site"].dtype == object
    assert scope_mask(ds, "ffn").sum() == 8  # selection works on the opened Dataset
    assert set(ds.coords) >= {"layer", "submodule", "site", "feature"}
    with pytest.raises(ValueError, match="pooling must be one of \\['prefix_mean', 'last'\\]"):
        r.selectivity(pooling="mean")
    with pytest.raises(ValueError, match="family must be one of \\['decoder'\\]"):
        r.selectivity("ffn_act")


def test_sets_roles_and_overlap(store):
    path, _, per = store
    r = results.open(path)
    sets = r.sets(scope="ffn", pooling="last")
    assert sets.dims == ("task", "modality", "step", "language", "kind", "rank")
    assert sets.attrs["k"] == 3 and sets.attrs["group"] == "ffn" and sets.attrs["layer"] == "all"
    where = dict(task="en2x", modality="text", step=3, language="fra", kind="bottom")
    np.testing.assert_array_equal(set_ids(sets, **where), set_ids(per[("last", "ffn")], **where))
    assert r.sets(scope=None).dims[0] == "scope"
    with pytest.raises(ValueError, match="scope must be one of \\['all', 'ffn'\\]"):
        r.sets(scope="attention")
    ov = r.overlap()
    assert ov["count"].dims == ("task", "step", "kind", "text_language", "speech_language")
    with pytest.raises(ValueError, match="kind must be one of"):
        r.overlap(kind="matrix")
    with pytest.raises(ValueError, match="no group 'roles/decoder'"):
        r.roles()


def test_units_table(store):
    units = results.open(store[0]).units()
    assert len(units) == sum(SIZES) and units.index.name == "unit"
    row = units.loc[7]
    assert (row["site"], row["layer"], row["feature"], row["submodule"]) == (SITES[1], 0, 1, "ffn")
    assert units.loc[17, "path"] == "text_decoder.layer_norm" and units.loc[17, "layer"] == -1


def test_steering_runs(store, tmp_path):
    """Runs come from the store's ``steering`` attr, which the steer driver writes
    (:func:`link_run`); a sibling folder that reads the store but was never linked is not one."""
    from crossmodal.steer.driver import link_run
    from crossmodal.steer.grid import load_grid

    path = store[0]
    r = results.open(path)
    runs = [path.parent / name for name in ("steer-a", "steer-b", "steer-unlinked")]
    for run in runs:
        run.mkdir(exist_ok=True)
        (run / "grid.json").write_text(json.dumps({"config": {"selectivity": {"path": str(path)}}}))
    assert r.steering_runs() == []

    def link(run, source=path):
        config = load_grid({"selectivity": {"path": str(source)}, "output": str(run)})
        return link_run(config, run, echo=lambda _: None)

    assert link(runs[0]) and r.steering_runs() == [runs[0]]
    assert not link(runs[1], tmp_path / "other.nc")  # not a collect store: nothing to link
    assert r.steering_runs() == [runs[0]]
    with pytest.raises(ValueError, match="must hold summary.parquet"):
        r.steering()
    frame = pd.DataFrame({"cell_id": ["a"], "selected": [0.5]})
    frame.to_parquet(runs[0] / "summary.parquet")
    pd.testing.assert_frame_equal(r.steering(), frame)
    with pytest.raises(ValueError, match="table must be one of"):
        r.steering(table="cells")
    assert link(runs[1]) and link(runs[0])  # linking again keeps one entry per run
    assert r.steering_runs() == runs[:2]
    with pytest.raises(ValueError, match="run must be one of"):
        r.steering()  # two runs read this store: name one
    pd.testing.assert_frame_equal(r.steering(runs[0]), frame)


def test_reduce_refuses_bad_options_and_unfinished_stores(store, tmp_path):
    """Checked before Ray starts: one-line errors naming the value and the fix."""
    from crossmodal.reduce.driver import run_reduce

    with pytest.raises(ValueError, match="k must be one of \\[int >= 1\\], got 0"):
        run_reduce(store[0], k=0)
    with pytest.raises(
        ValueError, match="scopes must be one of \\['all', 'attention', 'self_attn'"
    ):
        run_reduce(store[0], scopes=["layer"])
    with pytest.raises(ValueError, match="optionally with '@<layer>' or '@\\*', got \\['ffn@x'\\]"):
        run_reduce(store[0], scopes=["ffn@x"])
    with pytest.raises(ValueError, match="must be one of \\[a collect store\\]"):
        run_reduce(tmp_path)
    path = tmp_path / "half.zarr"
    dims = StoreDims(
        ("x2en",), ("text",), ("eng", "deu"), (1,), ("last",), 8, (("x2en", "text", "deu", 0),)
    )
    work = [{"index": 0, "task": "x2en", "modality": "text", "language": "deu", "ids": ["1"]}]
    create_store(
        path,
        dims=dims,
        units={"decoder": _coords()},
        plan={"work_units": work},
        attrs={"config": {}},
    )
    with pytest.raises(
        ValueError, match="got 0 of 1 conditions merged .*`crossmodal collect CONFIG`"
    ):
        run_reduce(path)
