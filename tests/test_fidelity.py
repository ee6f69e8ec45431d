"""Fidelity helpers against brute force: exemplar extremes, halves, set stability, the
Spearman bound of histogram AP, the exact-AP overlay and the every-unit budget.

The end-to-end checks on a reduced store (exact AP of every unit, exemplars and stability
against re-captured values) are in tests/test_reduce.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from helpers import synthetic_selectivity
from scipy.stats import spearmanr

from crossmodal.reduce.ap_accuracy import fits_every_unit, spearman_bound_rows, with_exact_ap
from crossmodal.reduce.exemplars import ROW_BITS, Extremes, PairExemplars
from crossmodal.reduce.overlap import spearman_rows
from crossmodal.reduce.selection import select_sets
from crossmodal.reduce.stability import split_halves, stability


def _brute_extremes(values: np.ndarray, n: int, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the n rows with the highest sign*value; ties: earlier row first."""
    order = np.stack(
        [sorted(range(len(col)), key=lambda r: (-sign * col[r], r)) for col in values.T]
    )
    rows = order[:, :n].T
    return np.take_along_axis(values, rows, 0), rows


def test_extremes_over_parts_equal_brute_force():
    """Three work units, folded batch by batch and merged like the driver does, keep the
    same top/bottom-5 (values and examples) as sorting every value; ties (rounded values)
    keep the earlier example."""
    rng = np.random.default_rng(0)
    units = np.array([3, 7, 11, 40])
    parts = [np.round(rng.normal(size=(n, units.size)), 1).astype(np.float32) for n in (7, 3, 9)]
    pair = PairExemplars()
    for p, values in enumerate(parts):
        ex = Extremes.empty(units, 5)
        for lo in range(0, len(values), 4):  # batches of 4 rows
            ex.update(values[lo : lo + 4], np.arange(lo, min(lo + 4, len(values))))
        texts = [(f"id{p}.{r}", f"in{p}.{r}", f"out{p}.{r}") for r in range(len(values))]
        pair.add(p, ["deu", "fra", "jpn"][p], {("decoder", "slot"): ex}, texts)
    every = np.concatenate(parts)
    refs = np.concatenate([(p << ROW_BITS) + np.arange(len(v)) for p, v in enumerate(parts)])
    got = pair.extremes[("decoder", "slot")]
    for side, sign in (("top", 1.0), ("bottom", -1.0)):
        want_v, want_rows = _brute_extremes(every, 5, sign)
        np.testing.assert_array_equal(getattr(got, side), want_v)
        np.testing.assert_array_equal(getattr(got, f"{side}_ref"), refs[want_rows])
    assert set(pair.examples) == set(got.refs().tolist())  # only referenced texts are kept
    ref = int(got.top_ref[0, 0])
    p, r = ref >> ROW_BITS, ref & ((1 << ROW_BITS) - 1)
    assert pair.examples[ref] == (
        f"id{p}.{r}",
        ["deu", "fra", "jpn"][p],
        f"in{p}.{r}",
        f"out{p}.{r}",
    )


def test_extremes_fewer_examples_than_n():
    ex = Extremes.empty(np.array([0, 1]), 5)
    ex.update(np.array([[1.0, 2.0], [3.0, np.float32(-1.0)]]), np.array([0, 1]))
    assert ex.top_ref[:, 0].tolist() == [1, 0, -1, -1, -1]
    assert np.isnan(ex.top[2:]).all() and ex.bottom[:2, 1].tolist() == [-1.0, 2.0]


def test_split_halves_is_seeded_and_balanced():
    ids = [str(i) for i in range(11)]
    a = split_halves(ids, seed=0)
    assert a == split_halves(list(reversed(ids)), seed=0)  # the order of ids does not matter
    assert sorted(a.values()).count(0) == 5 and set(a) == set(ids)
    assert a != split_halves(ids, seed=1)


def test_stability_equals_brute_force_selection_on_each_half():
    """Overlap of the top/bottom-k sets of each half, per scope and condition, equals
    select_sets run on each half's AP separately; expected = k*k/N."""
    halves = [synthetic_selectivity(seed=s, n_units=124)["ap"] for s in (0, 1)]
    ap_half = xr.concat(halves, "half")
    ap_half[1, 0, 0, 0, 0, :5] = np.nan  # a few units without AP on one half
    k = 10
    got = stability(ap_half, ["all", "ffn"], k)
    for scope, group in (("all", "all"), ("ffn", "ffn")):
        a, b = (select_sets(ap_half.isel(half=h), k=k, group=group) for h in (0, 1))
        for kind in ("top", "bottom"):
            x, y = a.sel(kind=kind), b.sel(kind=kind)
            cells = got.sel(scope=scope, kind=kind)["overlap"].values
            for idx in np.ndindex(x.shape[:-1]):
                want = np.intersect1d(x.values[idx][x.values[idx] >= 0], y.values[idx])
                assert cells[idx] == want.size or (np.isnan(cells[idx]) and want.size == 0)
    n = got.sel(scope="all")["n_units"].values
    assert sorted(set(n.ravel().tolist())) == [0, 119, 124]  # 0: conditions without AP
    e = got.sel(scope="all", kind="top")["expected"].values
    np.testing.assert_allclose(e[n > 0], k * k / n[n > 0])
    assert (
        np.isnan(e[n == 0]).all()
        and np.isnan(got.sel(scope="all", kind="top")["overlap"].values[n == 0]).all()
    )


def test_spearman_bound_holds_for_values_inside_the_intervals():
    """For any exact values inside the AP intervals, scipy's Spearman of the exact vectors
    lies within the bound of the estimate's Spearman."""
    rng = np.random.default_rng(3)
    n = 300
    truth = rng.uniform(size=(2, 2, n))  # [text/speech, language, unit]
    truth[1] = 0.7 * truth[0] + 0.3 * rng.uniform(size=(2, n))
    width = rng.uniform(0, 0.005, size=truth.shape)
    lo, hi = truth - width * rng.uniform(size=truth.shape), truth + width
    est = lo + (hi - lo) * rng.uniform(size=truth.shape)
    rho = spearman_rows(est[0], est[1])
    bound = spearman_bound_rows(rho, (est[0], lo[0], hi[0]), (est[1], lo[1], hi[1]))
    for i in range(2):
        for j in range(2):
            exact = spearmanr(truth[0, i], truth[1, j]).statistic
            assert abs(exact - rho[i, j]) <= bound[i, j] + 1e-12
            assert bound[i, j] < 0.1  # narrow intervals give a useful bound
    tight = spearman_bound_rows(rho, (est[0], est[0], est[0]), (est[1], est[1], est[1]))
    np.testing.assert_allclose(tight, 0.0, atol=1e-9)  # exact AP: bound 0


def test_with_exact_ap_overlays_only_measured_units():
    view = synthetic_selectivity(seed=0, n_units=20)
    exact = view["ap"].isel(unit=[2, 5]) * 0 + 0.5
    exact[0, 0, 0, 0, 0] = np.nan
    out = with_exact_ap(view, exact)
    assert float(out["ap"][0, 0, 0, 0, 5]) == 0.5 and float(out["ap_lo"][0, 0, 0, 1, 2]) == 0.5
    assert float(out["ap"][0, 0, 0, 0, 2]) == float(view["ap"][0, 0, 0, 0, 2])  # NaN: kept
    xr.testing.assert_equal(out["ap"].isel(unit=[0, 1]), view["ap"].isel(unit=[0, 1]))


@pytest.mark.parametrize(
    ("need", "free", "budget", "fits"),
    [(100, 1000, 200, True), (300, 1000, 200, False), (100, 150, 200, False), (1, 10, 0, False)],
)
def test_every_unit_budget(need, free, budget, fits):
    assert fits_every_unit(need, free, budget) is fits


def test_pair_exemplars_do_not_grow_with_examples():
    """The driver-side exemplars of a pair keep n values per unit and side and only the
    texts they reference: the same size for 4x the examples per work unit."""
    import pickle

    def size(n_rows: int) -> int:
        rng = np.random.default_rng(0)
        units, pair = np.arange(8), PairExemplars()
        for p in range(4):
            ex = Extremes.empty(units, 5)
            ex.update(rng.normal(size=(n_rows, units.size)), np.arange(n_rows))
            texts = [(f"{p:03d}{r:05d}", "x" * 20, "y" * 20) for r in range(n_rows)]
            pair.add(p, "deu", {("decoder", "slot"): ex}, texts)
        assert len(pair.examples) <= 2 * 5 * units.size
        return len(pickle.dumps(pair))

    small, large = size(100), size(400)
    assert abs(large - small) < 0.05 * small


def _pairs_store(path, units: np.ndarray, poolings, tasks, steps) -> None:
    """A store holding only ``exact/decoder/exemplars``: one written pair per (task, speech)
    with random extremes and texts of varied lengths (and one slot left without a pair)."""
    import zarr

    from crossmodal.reduce.exact import Slot
    from crossmodal.reduce.exemplars import write_pair

    zarr.open_group(str(path), mode="w", zarr_format=3)
    rng = np.random.default_rng(1)
    for task in tasks:
        pair = PairExemplars()
        for part in range(2):
            extremes = {}
            for step in steps:
                for pooling in poolings:
                    if (task, step, pooling) == (tasks[-1], steps[-1], poolings[-1]):
                        continue  # a slot the exact pass did not measure: "" and NaN
                    ex = Extremes.empty(units, 3)
                    ex.update(rng.normal(size=(6, units.size)), np.arange(6))
                    extremes[("decoder", Slot(step, pooling))] = ex
            texts = [(f"{task}{part}-{r}", "é" * (r + 1), "long " * r) for r in range(6)]
            pair.add(part, ["deu", "spa"][part], extremes, texts)
        write_pair(str(path), "decoder", f"{task}/speech", pair)


@pytest.mark.parametrize("one_slot_blocks", [False, True])
def test_write_exemplars_by_blocks_equals_the_whole_dataset(tmp_path, monkeypatch, one_slot_blocks):
    """write_exemplars (texts written a block of chunks at a time, as object arrays; also
    one slot at a time, blocks smaller than a chunk) writes the same group, array for array
    (dtype, chunks, values, attrs), as writing the whole in-memory exemplar_dataset."""
    import zarr

    from crossmodal.reduce import exemplars
    from crossmodal.reduce.exemplars import exemplar_dataset, write_exemplars
    from crossmodal.store.datasets import write_dataset

    if one_slot_blocks:
        whole = exemplars._chunk_blocks
        monkeypatch.setattr(exemplars, "_chunk_blocks", lambda s, c: whole(s, (1,) * len(s)))

    poolings, tasks, steps = ["prefix_mean", "last"], ["x2en", "en2x"], [1, 6]
    units = np.arange(30, dtype=np.int64) * 3
    rng = np.random.default_rng(2)
    shape = (1, 2, 2, 1, 2, 2, 3, 8)  # scope, pooling, task, modality, step, language, kind, rank
    ids = np.where(rng.random(shape) < 0.7, rng.choice(units, size=shape), -1)
    sets = xr.DataArray(
        ids,
        dims=("scope", "pooling", "task", "modality", "step", "language", "kind", "rank"),
        coords={"scope": ["all"], "pooling": poolings, "task": tasks, "modality": ["speech"],
                "step": steps, "language": ["deu", "spa"], "kind": ["top", "bottom", "both"]},
    )  # fmt: skip
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for store in (a, b):
        _pairs_store(store, units, poolings, tasks, steps)
    write_exemplars(str(a), "decoder", sets)
    write_dataset(str(b), "exemplars/decoder", exemplar_dataset(str(b), "decoder", sets))
    ga, gb = (zarr.open_group(str(s), path="exemplars/decoder", mode="r") for s in (a, b))
    assert dict(ga.attrs) == dict(gb.attrs) and sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in gb.array_keys():
        x, y = ga[name], gb[name]
        assert (x.dtype, x.shape, x.chunks, dict(x.attrs)) == (
            y.dtype,
            y.shape,
            y.chunks,
            dict(y.attrs),
        )
        assert x.metadata.dimension_names == y.metadata.dimension_names
        u, v = (np.asarray(z[...], dtype=object if z.dtype.kind == "T" else None) for z in (x, y))
        assert np.array_equal(u, v, equal_nan=x.dtype.kind == "f"), name
    texts = np.asarray(ga["input"][...], dtype=object)
    assert (texts == "").any() and (texts != "").any()  # some cells empty, some filled


def test_with_exact_ap_leaves_a_store_view_lazy_and_equals_where(tmp_path):
    """On a store-backed view, with_exact_ap gives np.where(finite exact, exact, view) and
    loads nothing into the view (its AP arrays stay on disk)."""
    from crossmodal.store.datasets import read_dataset, write_dataset

    view = synthetic_selectivity(seed=3, n_units=40)
    write_dataset(str(tmp_path / "s.zarr"), "sel", view)
    lazy = read_dataset(str(tmp_path / "s.zarr"), "sel")
    exact = (view["ap"].isel(unit=slice(5, 30)) * 0.5).copy()
    exact[0, 0, 0, 1, :4] = np.nan
    out = with_exact_ap(lazy, exact)
    full = exact.reindex(unit=view["unit"].values).values
    for name in ("ap", "ap_lo", "ap_hi"):
        want = np.where(np.isfinite(full), full, view[name].values)
        np.testing.assert_array_equal(out[name].values, want)
        assert out[name].dtype == view[name].dtype
        assert not lazy[name].variable._in_memory


def test_with_exact_ap_of_every_unit_is_one_shared_array(tmp_path):
    """When exact AP covers every value the view has (the every-unit exact pass), the three
    variables are one read-only array, equal to np.where(finite exact, exact, view)."""
    from crossmodal.store.datasets import read_dataset, write_dataset

    view = synthetic_selectivity(seed=5, n_units=40)  # NaN conditions: en2x/eng, asr/text
    write_dataset(str(tmp_path / "s.zarr"), "sel", view)
    lazy = read_dataset(str(tmp_path / "s.zarr"), "sel")
    exact = (view["ap"] * 0.5).copy()  # finite wherever the view is
    out = with_exact_ap(lazy, exact)
    want = exact.values
    for name in ("ap", "ap_lo", "ap_hi"):
        np.testing.assert_array_equal(out[name].values, want)
        assert np.shares_memory(out[name].values, out["ap"].values)
        assert not out[name].values.flags.writeable
    exact[0, 0, 0, 1, 3] = np.nan  # one value the view has but exact AP lacks: three arrays
    out = with_exact_ap(lazy, exact)
    assert not np.shares_memory(out["ap_lo"].values, out["ap"].values)
    assert float(out["ap_lo"][0, 0, 0, 1, 3]) == float(view["ap_lo"][0, 0, 0, 1, 3])


def test_with_unit_coords_equals_selecting_the_view():
    from crossmodal.reduce.labels import UNIT_COORDS
    from crossmodal.reduce.stability import with_unit_coords

    view = synthetic_selectivity(seed=4, n_units=30)
    half = xr.DataArray(np.zeros((2, 4)), dims=("half", "unit"), coords={"unit": [7, 2, 29, 0]})
    got = with_unit_coords(half, view)
    sel = view.sel(unit=[7, 2, 29, 0])
    for c in UNIT_COORDS:
        np.testing.assert_array_equal(got[c].values, sel[c].values)
    with pytest.raises(KeyError, match="99"):
        with_unit_coords(half.assign_coords(unit=[7, 2, 99, 0]), view)


def test_chunk_blocks_tile_the_leading_dims_along_chunks():
    from crossmodal.reduce.exemplars import _chunk_blocks

    blocks = list(_chunk_blocks((2, 3, 5), (1, 2, 5, 7, 9)))
    assert len(blocks) == 2 * 2 * 1
    seen = np.zeros((2, 3, 5), int)
    for b in blocks:
        seen[b] += 1
        assert all(s.start % c == 0 for s, c in zip(b, (1, 2, 5), strict=True))
    assert (seen == 1).all()
