"""Selected sets, exact selection and roles against brute force and sklearn.

Tricky cases covered: tied AP (ties broken by unit id), NaN conditions (en2x/eng,
asr/text), pools smaller than k, intervals that straddle the k-th place, zero-width
intervals, bottom-k, unit ids that are not positions, exact AP missing or outside bounds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from helpers import synthetic_selectivity, unit_coords
from sklearn.metrics import average_precision_score

from crossmodal.reduce.roles import ROLE_TASKS, role_table, roles
from crossmodal.reduce.selection import (
    CSV_COLUMNS,
    _classify,
    _tie_ranks,
    exact_units,
    expand_scopes,
    finalize_selection,
    iter_conditions,
    parse_scope,
    plan_candidates,
    plan_exact,
    scope_mask,
    select_sets,
    set_ids,
    write_csv,
)


def brute_top(values: np.ndarray, ids: np.ndarray, k: int, bottom: bool = False) -> list[int]:
    sign = 1.0 if bottom else -1.0
    order = sorted(
        (i for i in range(len(values)) if np.isfinite(values[i])),
        key=lambda i: (sign * values[i], ids[i]),
    )
    return [int(ids[i]) for i in order[:k]]


@pytest.mark.parametrize("k", [1, 7, 40, 500])
def test_select_sets_matches_brute_force(k: int) -> None:
    ds = synthetic_selectivity()
    sets = select_sets(ds["ap"], k=k)
    assert sets.dims == ("task", "modality", "step", "language", "kind", "rank")
    ids = ds["unit"].values
    for task in ("x2en", "en2x", "asr"):
        for lang in ("eng", "jpn"):
            where = {"task": task, "modality": "speech", "step": 6, "language": lang}
            vec = ds["ap"].sel(where).values
            top, bottom = brute_top(vec, ids, k), brute_top(vec, ids, k, bottom=True)
            assert set_ids(sets, **where, kind="top").tolist() == top
            assert set_ids(sets, **where, kind="bottom").tolist() == bottom
            union = top + [u for u in bottom if u not in top]
            assert set_ids(sets, **where, kind="both").tolist() == union
    missing = {"task": "en2x", "modality": "text", "step": 1, "language": "eng", "kind": "top"}
    assert set_ids(sets, **missing).size == 0


def test_select_sets_scope_and_unit_ids() -> None:
    ds = synthetic_selectivity(seed=3)
    ds = ds.assign_coords(unit=("unit", ds["unit"].values * 7 + 1000))  # ids are not positions
    for group, allowed in (("attention", {"self_attn", "cross_attn"}), ("ffn", {"ffn"})):
        sets = select_sets(ds["ap"], k=10, group=group, layer=2)
        mask = scope_mask(ds, group, 2)
        vec = ds["ap"].sel(task="x2en", modality="text", step=1, language="deu").values
        expect = brute_top(np.where(mask, vec, np.nan), ds["unit"].values, 10)
        got = set_ids(sets, task="x2en", modality="text", step=1, language="deu", kind="top")
        assert got.tolist() == expect
        sub = ds.set_index(unit="unit").sel(unit=got)
        assert set(sub["submodule"].values) <= allowed and set(sub["layer"].values) == {2}
        assert sets.attrs == {"k": 10, "group": group, "layer": 2}


def test_scopes_parse_and_expand_per_layer() -> None:
    assert parse_scope("all") == ("all", None) and parse_scope("cross_attn@12") == (
        "cross_attn",
        12,
    )
    assert expand_scopes(["all", "ffn@*", "ffn@1", "self_attn@0"], [0, 1, 2]) == [
        "all",
        "ffn@0",
        "ffn@1",
        "ffn@2",
        "self_attn@0",
    ]
    for bad in ("mlp", "ffn@", "ffn@x", "ffn@-1", "@3"):
        with pytest.raises(ValueError, match=f"scope must be one of .*, got '{bad}'"):
            expand_scopes([bad], [0, 1])
    ds = synthetic_selectivity()
    sets = select_sets(ds["ap"], k=5, group="self_attn", layer=1)
    pool = set(ds["unit"].values[(ds["submodule"] == "self_attn") & (ds["layer"] == 1)].tolist())
    assert set(np.unique(sets.values[sets.values >= 0]).tolist()) <= pool


def test_select_sets_errors() -> None:
    ds = synthetic_selectivity()
    with pytest.raises(ValueError, match=r"group must be one of \['all', 'attention', 'self_attn'"):
        select_sets(ds["ap"], group="mlp")
    with pytest.raises(ValueError, match=r"k must be one of \[int >= 1\], got 0"):
        select_sets(ds["ap"], k=0)
    with pytest.raises(ValueError, match=r"layer must be one of \[-1, 0, 1, 2, 3\], got 9"):
        select_sets(ds["ap"], layer=9)


# ----------------------------------------------------------------------------- exact


def _exact_case(seed: int) -> tuple[xr.Dataset, np.ndarray, int]:
    """Per-example values -> exact AP (sklearn) and intervals that contain it."""
    rng = np.random.default_rng(seed)
    n_ex, n_units = 36, 150
    labels = rng.integers(0, 2, size=n_ex)
    labels[:2] = [0, 1]
    shift = rng.normal(0, 1, n_units) * (rng.random(n_units) < 0.5)
    values = np.round(rng.normal(0, 1, (n_ex, n_units)) + labels[:, None] * shift, 1)
    dup = rng.integers(0, n_units, size=30)  # identical columns -> identical AP (ties)
    values[:, dup[:15]] = values[:, dup[15:]]
    ap = np.empty((2, n_units))
    for lang in range(2):
        y = labels == lang
        ap[lang] = [average_precision_score(y, values[:, u]) for u in range(n_units)]
    slack = rng.choice([0.0, 0.005, 0.03, 0.1], size=(2, n_units))
    lo = ap - slack * rng.random(ap.shape)
    hi = ap + slack * rng.random(ap.shape)
    mid = lo + (hi - lo) * rng.random(ap.shape)  # the "histogram" AP: anywhere inside
    if seed % 3 == 0:  # unavailable units
        mid[:, :5] = lo[:, :5] = hi[:, :5] = ap[:, :5] = np.nan
    dims = ("task", "modality", "step", "language", "unit")
    coords = {"task": ["x2en"], "modality": ["speech"], "step": [1], "language": ["deu", "fra"]}
    coords |= unit_coords(n_units, id_offset=10 * seed)
    shape = (1, 1, 1, 2, n_units)
    data = {"ap": mid, "ap_lo": lo, "ap_hi": hi}
    ds = xr.Dataset({n: (dims, v.reshape(shape)) for n, v in data.items()}, coords=coords)
    k = int(rng.integers(1, 60))
    return ds, ap, k


@pytest.mark.parametrize("seed", range(24))
def test_exact_selection_equals_sklearn_top_k(seed: int) -> None:
    ds, exact, k = _exact_case(seed)
    plan = plan_exact(ds, k=k)
    wanted = exact_units(plan)[("x2en", "speech")]
    assert wanted.size < ds.sizes["unit"]  # the exact pass only needs the candidates
    pos = pd.Index(ds["unit"].values).get_indexer(wanted)
    exact_ap = xr.DataArray(
        exact[:, pos].reshape(1, 1, 1, 2, -1),
        dims=("task", "modality", "step", "language", "unit"),
        coords={k_: ds[k_].values for k_ in ("task", "modality", "step", "language")}
        | {"unit": wanted},
    )
    sets = finalize_selection(plan, exact_ap)
    ids = ds["unit"].values
    for li, lang in enumerate(("deu", "fra")):
        where = {"task": "x2en", "modality": "speech", "step": 1, "language": lang}
        top = set(brute_top(exact[li], ids, k))
        bottom = set(brute_top(exact[li], ids, k, bottom=True))
        assert set(set_ids(sets, **where, kind="top").tolist()) == top
        assert set(set_ids(sets, **where, kind="bottom").tolist()) == bottom
        assert set(set_ids(sets, **where, kind="both").tolist()) == top | bottom


def test_histogram_ap_alone_is_not_exact() -> None:
    """Why the exact pass exists: on the same case, selecting by interval midpoints errs."""
    ds, exact, k = _exact_case(0)
    naive = select_sets(ds["ap"], k=k)
    where = {"task": "x2en", "modality": "speech", "step": 1, "language": "deu", "kind": "top"}
    got = set(set_ids(naive, **where).tolist())
    assert got != set(brute_top(exact[0], ds["unit"].values, k))


@pytest.mark.parametrize("seed", range(10))
def test_classify_is_tight(seed: int) -> None:
    """Surely-in units are in for every realisation; candidates go either way."""
    rng = np.random.default_rng(100 + seed)
    n, k = 40, int(rng.integers(1, 20))
    centre = np.round(rng.random(n), 1)
    lo = centre - rng.choice([0.0, 0.05, 0.2], n)
    hi = centre + rng.choice([0.0, 0.05, 0.2], n)
    tie = rng.permutation(n)
    surely, cand = _classify(lo, hi, tie, k)

    def in_top(values: np.ndarray) -> np.ndarray:
        order = np.lexsort((tie, -values))
        member = np.zeros(n, dtype=bool)
        member[order[:k]] = True
        return member

    for i in range(n):
        best = np.where(np.arange(n) == i, hi, lo)  # i as high as possible, others low
        worst = np.where(np.arange(n) == i, lo, hi)
        could_be_in, could_be_out = in_top(best)[i], not in_top(worst)[i]
        assert surely[i] == (not could_be_out)
        assert cand[i] == (could_be_in and could_be_out)
    for _ in range(50):  # random realisations never contradict the split
        member = in_top(lo + (hi - lo) * rng.random(n))
        assert member[surely].all() and not member[~surely & ~cand].any()


def test_finalize_rejects_missing_or_inconsistent_exact_ap() -> None:
    ds, exact, _ = _exact_case(4)
    plan = plan_exact(ds, k=30)
    wanted = exact_units(plan)[("x2en", "speech")]
    assert wanted.size > 2
    dims = ("task", "modality", "step", "language", "unit")
    coords = {k_: ds[k_].values for k_ in dims[:-1]}
    pos = pd.Index(ds["unit"].values).get_indexer(wanted)
    values = exact[:, pos].reshape(1, 1, 1, 2, -1)
    short = xr.DataArray(values[..., 1:], dims=dims, coords=coords | {"unit": wanted[1:]})
    with pytest.raises(ValueError, match=r"exact_ap must be one of \[finite for every candidate\]"):
        finalize_selection(plan, short)
    wrong = xr.DataArray(values + 0.5, dims=dims, coords=coords | {"unit": wanted})
    with pytest.raises(ValueError, match=r"exact_ap must be one of \[within \[ap_lo, ap_hi\]\]"):
        finalize_selection(plan, wrong)


def test_plan_rejects_inverted_bounds() -> None:
    ds = synthetic_selectivity()
    ds["ap_lo"], ds["ap_hi"] = ds["ap_hi"], ds["ap_lo"]
    with pytest.raises(ValueError, match=r"ap_lo must be one of \[<= ap_hi\]"):
        plan_exact(ds, k=5)


def test_ragged_candidates_are_each_rows_classification() -> None:
    """Each (condition, side) row of the ragged plan holds exactly the candidates of that
    row's own classification, with their bounds; exact_units unions them per pair."""
    ds = synthetic_selectivity(seed=3, slack=0.05)
    ids, k = ds["unit"].values, 9
    plan = plan_exact(ds, k=k)
    count = plan["candidate_count"]
    assert int(count.sum()) == plan.sizes["entry"] and int(count.max()) > int(count.min())
    union: dict[tuple, set[int]] = {}
    for at in iter_conditions(count, list(count.dims)):
        cond = {d: i for d, i in at.items() if d != "side"}
        lo, hi = (ds[n].isel(cond).values for n in ("ap_lo", "ap_hi"))
        fin = np.flatnonzero(np.isfinite(ds["ap"].isel(cond).values) & np.isfinite(lo + hi))
        a, b = (lo, hi) if at["side"] == 0 else (-hi, -lo)
        _, cand = _classify(a[fin], b[fin], _tie_ranks(ids[fin]), k)
        got, got_lo, got_hi = plan_candidates(plan, at)
        assert sorted(got.tolist()) == sorted(ids[fin[cand]].tolist())
        pos = pd.Index(ids).get_indexer(got)
        np.testing.assert_array_equal(got_lo, lo[pos])
        np.testing.assert_array_equal(got_hi, hi[pos])
        key = (str(ds["task"].values[at["task"]]), str(ds["modality"].values[at["modality"]]))
        union.setdefault(key, set()).update(got.tolist())
    assert {key: set(v.tolist()) for key, v in exact_units(plan).items()} == union


def test_plan_with_exact_bounds_has_no_candidates_and_matches_select_sets() -> None:
    ds = synthetic_selectivity(seed=5, slack=0.0)
    plan = plan_exact(ds, k=15)
    assert int((plan["candidate"] >= 0).sum()) == 0
    empty = xr.DataArray(
        np.zeros((0,)), dims=("unit",), coords={"unit": np.zeros(0, dtype=np.int64)}
    )
    sets = finalize_selection(plan, empty)
    xr.testing.assert_equal(sets, select_sets(ds["ap"], k=15))


# ----------------------------------------------------------------------------- export, roles


def test_csv_has_reference_columns(tmp_path) -> None:
    ds = synthetic_selectivity(seed=2)
    sets = select_sets(ds["ap"], k=12)
    where = {"task": "x2en", "modality": "text", "step": 6, "language": "jpn", "kind": "top"}
    path = write_csv(ds, sets, tmp_path / "expertise_top.csv", **where)
    df = pd.read_csv(path)
    assert tuple(df.columns) == CSV_COLUMNS
    assert df["unit"].tolist() == set_ids(sets, **where).tolist()
    cond = {k: v for k, v in where.items() if k != "kind"}
    ref = ds.sel(cond).sel(unit=df["unit"].values)
    np.testing.assert_allclose(df["ap"], ref["ap"].values)
    np.testing.assert_allclose(df["on_p50"], ref["on_p50"].values)
    np.testing.assert_allclose(df["off_mean"], ref["off_mean"].values)
    assert df["site"].tolist() == ref["site"].values.tolist()
    assert df["feature"].tolist() == ref["feature"].values.tolist()
    assert df["ap"].is_monotonic_decreasing


def test_roles_relabel_tasks() -> None:
    ds = synthetic_selectivity(seed=6)
    sets = select_sets(ds["ap"], k=5)
    r = roles(sets)
    assert r.dims == ("role", "modality", "step", "language", "kind", "rank")
    for role, task in ROLE_TASKS.items():
        np.testing.assert_array_equal(r.sel(role=role).values, sets.sel(task=task).values)
    table = role_table(sets)
    assert list(table.columns) == ["role", "modality", "step", "language", "kind", "rank", "unit"]
    rows = table.query("role == 'control' and modality == 'speech' and step == 1")
    rows = rows.query("language == 'jpn' and kind == 'top'")
    expect = set_ids(sets, task="en2x", modality="speech", step=1, language="jpn", kind="top")
    assert rows["unit"].tolist() == expect.tolist()
    assert table.query("role == 'control' and language == 'eng'").empty
    with pytest.raises(ValueError, match="task must be one of"):
        roles(sets.sel(task=["x2en"]))


def test_dynamic_scope_leaves_step_invariant_units_out() -> None:
    ds = synthetic_selectivity(seed=4)
    invariant = ds["step_invariant"].values
    assert invariant.any()
    sets = select_sets(ds["ap"], k=20, group="dynamic")
    vec = ds["ap"].sel(task="x2en", modality="text", step=1, language="deu").values
    expect = brute_top(np.where(invariant, np.nan, vec), ds["unit"].values, 20)
    got = set_ids(sets, task="x2en", modality="text", step=1, language="deu", kind="top")
    assert got.tolist() == expect
    assert scope_mask(ds, "dynamic").sum() == (~invariant).sum()
    with pytest.raises(ValueError, match="step_invariant unit coordinate"):
        scope_mask(ds.drop_vars("step_invariant"), "dynamic")


def test_sets_table_is_long_exact_and_ordered(tmp_path) -> None:
    """The long-format table: one row per member, every member with its exact AP (equal to
    sklearn's on the raw values), ranked by exact AP, replaced whole when written again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossmodal.reduce.sets import final_sets, sets_table, write_sets_table
    from crossmodal.schemas.outputs import declared_columns

    ds, exact, k = _exact_case(1)
    scopes = ["all", "dynamic"]
    plans = {("last", s): plan_exact(ds, k=k, group=s) for s in scopes}
    members = [exact_units(p, members=("candidate", "certain")) for p in plans.values()]
    wanted = np.unique(np.concatenate([m[("x2en", "speech")] for m in members]))
    pos = pd.Index(ds["unit"].values).get_indexer(wanted)
    conds = {c: ds[c].values for c in ("task", "modality", "step", "language")}
    exact_ap = xr.DataArray(
        exact[:, pos].reshape(1, 1, 1, 1, 2, -1),
        dims=("pooling", "task", "modality", "step", "language", "unit"),
        coords={"pooling": ["last"], **conds, "unit": wanted},
    )
    sets = final_sets(plans, exact_ap, ["last"], scopes).assign_attrs(k=k)
    table = sets_table({"last": ds}, sets, exact_ap, "decoder")
    assert list(table.columns) == declared_columns("reduce/sets.parquet")
    assert len(table) == int((sets.values >= 0).sum()) and table["exact_ap"].notna().all()
    upos = pd.Index(ds["unit"].values).get_indexer(table["unit"])
    lang = (table["language"] == "fra").to_numpy().astype(int)
    np.testing.assert_array_equal(table["exact_ap"].to_numpy(), exact[lang, upos])
    assert (table["ap_lo"] <= table["exact_ap"]).all() and (
        table["exact_ap"] <= table["ap_hi"]
    ).all()
    for (scope, _, kind), g in table.groupby(["scope", "language", "kind"]):
        assert g["rank"].tolist() == list(range(len(g)))
        if kind != "both":
            diffs = np.diff(g["exact_ap"].to_numpy())
            assert (diffs <= 0).all() if kind == "top" else (diffs >= 0).all()
        if scope == "dynamic":
            assert not g["step_invariant"].any()
    inv = ds["step_invariant"].values[upos]
    np.testing.assert_array_equal(table["step_invariant"].to_numpy(), inv)
    path = write_sets_table(table, tmp_path / "decoder.parquet", {"crossmodal.sets": "{}"})
    schema = pq.read_schema(path)
    assert schema.field("unit").type == pa.int64() and schema.field("step").type == pa.int32()
    assert schema.field("step_invariant").type == pa.bool_()
    assert schema.metadata[b"crossmodal.sets"] == b"{}"
    write_sets_table(table[table["scope"] == "dynamic"], path, {})
    assert set(pd.read_parquet(path)["scope"]) == {"dynamic"}  # replaced, nothing stale
