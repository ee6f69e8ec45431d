"""The Zarr store: layout, labelled reads, part writes, merge, resume checks.

Edge cases covered: a condition split over several parts (merge == one pass), a step no
example reached (count 0), parts deleted after the merge, a part region being whole shards
(one writer per shard file), a store from another config / plan / layout version.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from crossmodal.model.units import UnitIndex
from crossmodal.stats.running import UnitStats, choose_edges
from crossmodal.store.collect_store import CollectStore
from crossmodal.store.layout import (
    LAYOUT_VERSION,
    StoreDims,
    StoreError,
    UnitCoords,
    create_store,
    manifest,
    open_existing,
    read_edges,
    unit_chunk,
    write_edges,
    write_part,
)

N_BINS = 16
STEPS = (1, 6)
POOLINGS = ("prefix_mean", "last")
CELLS = [(step, pooling) for step in STEPS for pooling in POOLINGS]


def _coords(sizes=(5, 7, 3)) -> UnitCoords:
    n = len(sizes)
    return UnitCoords(
        {
            "site_name": np.asarray([f"decoder.layers.{i}.fc" for i in range(n)]),
            "site_path": np.asarray([f"text_decoder.layers.{i}.fc" for i in range(n)]),
            "site_layer": np.arange(n, dtype=np.int16),
            "site_submodule": np.asarray(["ffn"] * n),
            "site_type": np.asarray(["Linear"] * n),
            "site_positions": np.asarray(["decoder"] * n),
            "site_offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
            "site_size": np.asarray(sizes, dtype=np.int64),
        }
    )


def _dims(parts=(("x2en", "speech", "deu", 0), ("x2en", "speech", "deu", 1))) -> StoreDims:
    return StoreDims(
        ("x2en", "asr"), ("speech", "text"), ("eng", "deu"), STEPS, POOLINGS, N_BINS, tuple(parts)
    )


def _make(tmp_path, dims=None, name="s.zarr"):
    path = tmp_path / name
    root = create_store(
        path,
        dims=dims or _dims(),
        units={"decoder": _coords()},
        attrs={"config_hash": "abc", "plan_hash": "p1", "config": {"x": 1}},
        plan={"work_units": []},
    )
    return path, root


def _values(seed: int, n: int, units: int = 15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, units, generator=g, dtype=torch.float64) * 3
    x[:, :4] = x[:, :4].clamp(min=0)  # ReLU-like units with exact zeros
    return x.float()


def test_unit_coords_from_index(tiny_model):
    index = UnitIndex.from_model(tiny_model.model, ("decoder", "ffn_act"))
    for family in ("decoder", "ffn_act"):
        coords = UnitCoords.from_index(index, family)
        assert coords.n_units == index.counts("family")[family]
        arrays = coords.unit_arrays()
        assert arrays["unit_feature"][0] == 0
        assert arrays["unit_site"][-1] == len(coords.sites["site_name"]) - 1
        sites = [s for s in index.sites if s.family == family]
        last = sites[-1]
        assert arrays["unit_feature"][-1] == last.n_features - 1
        assert coords.sites["site_offset"][-1] == last.offset - sites[0].offset
    with pytest.raises(ValueError, match="family must be one of"):
        UnitCoords.from_index(UnitIndex.from_model(tiny_model.model, ("decoder",)), "ffn_act")


def test_xarray_reads_every_group_with_labels(tmp_path):
    path, _ = _make(tmp_path)
    expected = {
        "units/decoder": {"site_name": ("site",), "unit_layer": ("unit",)},
        "edges/decoder": {"edges": ("task", "modality", "step", "pooling", "unit", "edge")},
        "parts/decoder": {
            "hist": ("part", "step", "pooling", "unit", "bin"),
            "count": ("part", "step", "pooling"),
        },
        "stats/decoder": {
            "hist": ("task", "modality", "language", "step", "pooling", "unit", "bin"),
            "mean": ("task", "modality", "language", "step", "pooling", "unit"),
            "n_rows": ("task", "modality", "language", "step"),
        },
    }
    for group, variables in expected.items():
        ds = xr.open_zarr(path, group=group, consolidated=False)
        for name, dims in variables.items():
            assert ds[name].dims == dims
    stats = xr.open_zarr(path, group="stats/decoder", consolidated=False)
    assert list(stats.task.values) == ["x2en", "asr"]
    assert list(stats.language.values) == ["eng", "deu"]
    assert list(stats.step.values) == list(STEPS)
    assert stats.sizes["bin"] == N_BINS + 2 and stats.sizes["unit"] == 15
    assert {"unit_layer", "unit_site", "unit_feature"} <= set(stats.coords)
    assert np.isnan(stats["mean"].sel(task="asr", modality="text").values).all()  # never written
    parts = xr.open_zarr(path, group="parts/decoder", consolidated=False)
    assert list(parts.part_language.values) == ["deu", "deu"]
    assert list(parts.part_shard.values) == [0, 1]
    units = xr.open_zarr(path, group="units/decoder", consolidated=False)
    assert units.site_name.values[1] == "decoder.layers.1.fc"
    assert list(units.site_offset.values) == [0, 5, 12]
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["layout_version"] == LAYOUT_VERSION


def test_part_region_is_whole_shards(tmp_path):
    path, root = _make(tmp_path)
    for name in ("mean", "hist"):
        arr = root[f"parts/decoder/{name}"]
        assert arr.shards[:3] == (1, 1, 1) and arr.shards[3] >= arr.shape[3]
    edges = root["edges/decoder/edges"]
    assert edges.shards[:4] == (1, 1, 1, 1) and edges.shards[4] >= edges.shape[4]
    assert unit_chunk(492_544, 256) == 8192 and unit_chunk(15, 256) == 15


def _stats_for(values: torch.Tensor, edges: torch.Tensor) -> UnitStats:
    s = UnitStats.empty(edges)
    for batch in values.split(7) if len(values) else []:
        s.update(batch)
    return s


def _write_condition(path, root, chunks: list[torch.Tensor], edges: dict) -> None:
    for part, values in enumerate(chunks):
        write_part(
            path,
            "decoder",
            part,
            {
                (step, pooling): _stats_for(
                    values[STEPS.index(step)] if values.ndim == 3 else values,
                    edges[(step, pooling)],
                ).to_numpy()
                for step, pooling in CELLS
            },
        )


@pytest.mark.parametrize("keep_parts", [True, False])
def test_merge_of_two_parts_equals_one_pass(tmp_path, keep_parts):
    path, root = _make(tmp_path)
    pilot = _values(0, 40)
    edges = {cell: choose_edges(pilot, N_BINS) for cell in CELLS}
    write_edges(path, "decoder", "x2en", "speech", {k: v.numpy() for k, v in edges.items()})
    read = read_edges(path, "decoder", "x2en", "speech")[(6, "prefix_mean")]
    np.testing.assert_array_equal(read, edges[(6, "prefix_mean")].numpy())
    values = _values(1, 90)
    _write_condition(path, root, [values[:50], values[50:]], edges)
    counts = {"n_examples": 90, "n_skipped": 2, "n_rows": [90, 61], "n_ended": [0, 29]}
    CollectStore(root, _dims()).merge_condition(
        "x2en",
        "speech",
        "deu",
        families=["decoder"],
        parts=[0, 1],
        counts=counts,
        keep_parts=keep_parts,
    )

    one = _stats_for(values, edges[(1, "prefix_mean")]).to_numpy()
    ds = xr.open_zarr(path, group="stats/decoder", consolidated=False)
    got = ds.sel(task="x2en", modality="speech", language="deu", step=1, pooling="prefix_mean")
    assert int(got["count"]) == 90 and int(got["dropped"]) == 0
    np.testing.assert_array_equal(got["hist"].values, one["hist"])
    for name in ("mean", "m2"):
        np.testing.assert_allclose(got[name].values, one[name], rtol=1e-12, atol=0)
    exact = values.double().numpy()
    np.testing.assert_allclose(got["mean"].values, exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["m2"].values, exact.var(0) * 90, rtol=1e-12)
    np.testing.assert_array_equal(got["min"].values, exact.min(0))
    np.testing.assert_array_equal(got["max"].values, exact.max(0))
    sel = ds.sel(task="x2en", modality="speech", language="deu")
    assert list(sel["n_rows"].values) == [90, 61] and int(sel["n_skipped"]) == 2
    assert manifest(root)["merged"] == ["x2en/speech/deu"]
    shard_dirs = list((path / "parts/decoder/hist/c").glob("*"))
    assert (len(shard_dirs) == 2) is keep_parts
    assert int(root["parts/decoder/count"][1, 0, 0]) == 40  # tiny scalars are always kept


def test_merge_handles_a_step_nobody_reached(tmp_path):
    path, root = _make(tmp_path, _dims(parts=(("asr", "speech", "eng", 0),)))
    edges = {cell: choose_edges(_values(0, 20), N_BINS) for cell in CELLS}
    write_edges(path, "decoder", "asr", "speech", {k: v.numpy() for k, v in edges.items()})
    empty = torch.zeros(0, 15)
    write_part(
        path,
        "decoder",
        0,
        {
            (step, pooling): _stats_for(
                _values(3, 8) if step == STEPS[0] else empty, edges[(step, pooling)]
            ).to_numpy()
            for step, pooling in CELLS
        },
    )
    CollectStore(root, _dims(parts=(("asr", "speech", "eng", 0),))).merge_condition(
        "asr",
        "speech",
        "eng",
        families=["decoder"],
        parts=[0],
        counts={"n_examples": 8, "n_skipped": 0, "n_rows": [8, 0], "n_ended": [0, 8]},
        keep_parts=False,
    )
    ds = xr.open_zarr(path, group="stats/decoder", consolidated=False)
    got = ds.sel(task="asr", modality="speech", language="eng")
    assert list(got["count"].sel(pooling="last").values) == [8, 0]
    assert int(got["hist"].sel(step=6).sum()) == 0
    assert int(got["hist"].sel(step=1, pooling="last").sum()) == 8 * 15


def test_manifest_marks(tmp_path):
    _, root = _make(tmp_path)
    store = CollectStore(root, _dims())
    store.mark_part(1, {"n_examples": 3, "texts": ["a"]})
    store.mark_part(0, {"n_examples": 2})
    store.mark_edges("x2en", "speech", {"n_examples": 4})
    store.mark_edges("x2en", "speech", {"n_examples": 5})
    assert store.manifest == manifest(root)
    m = manifest(root)
    assert set(m["parts"]) == {"0", "1"} and m["parts"]["1"]["texts"] == ["a"]
    assert m["edges"] == {"x2en/speech": {"n_examples": 5}}


def test_open_existing_checks(tmp_path):
    assert open_existing(tmp_path / "none.zarr", config_hash="abc", plan_hash="p1") is None
    path, _ = _make(tmp_path)
    assert open_existing(path, config_hash="abc", plan_hash="p1") is not None
    with pytest.raises(StoreError, match="different config .*'abc'.*'zzz'"):
        open_existing(path, config_hash="zzz", plan_hash="p1")
    with pytest.raises(StoreError, match="planned from different data"):
        open_existing(path, config_hash="abc", plan_hash="p2")
    zarr.open_group(str(path), mode="r+").attrs["layout_version"] = 99
    with pytest.raises(StoreError, match=r"layout_version must be one of \[2\], got 99"):
        open_existing(path, config_hash="abc", plan_hash="p1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a Zarr store"):
        open_existing(other, config_hash="abc", plan_hash="p1")
    with pytest.raises(StoreError, match="already exists"):
        _make(tmp_path)  # create refuses an existing store


def test_store_matches_its_schema(tmp_path):
    """Every array is documented in crossmodal/schemas/store.schema.json with its dims and dtype."""
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads(
        (
            Path(__file__).resolve().parent.parent / "crossmodal/schemas/store.schema.json"
        ).read_text()
    )
    path, root = _make(tmp_path)
    attrs = {**root.attrs.asdict(), "created": "t", "provenance": {"packages": {}, "host": "h"}}
    jsonschema.validate(attrs, schema)
    unit_coords = {"unit", "unit_site", "unit_layer", "unit_feature"}
    for group, spec in schema["x-groups"].items():
        g = root[group.replace("<family>", "decoder")]
        documented = dict(spec["arrays"])
        names = {name for name, _ in g.arrays()}
        unit_free = group == "units/<family>" or group.startswith("concentration/")  # per layer
        extra = unit_coords if "<family>" in group and not unit_free else set()
        assert names == set(documented) | extra, group
        for name, doc in documented.items():
            arr = g[name]
            assert tuple(arr.metadata.dimension_names) == tuple(doc["dims"]), (group, name)
            kind = "string" if arr.dtype.kind in "OUT" else str(arr.dtype)
            assert kind == doc["dtype"], (group, name, arr.dtype)
