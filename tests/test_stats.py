"""Mergeable statistics and their finalizers (streaming AP, AUROC, quantiles), against exact references.

Tricky cases covered: exact zeros (post-ReLU) and ties (fp16/bf16 rounding) that must own a
single-value bin; constant and one-row pilots; values beyond the pilot's range (tail bins and
overflow); NaN/Inf examples dropped and counted; merges in any split and order; every input
dtype; histograms that resolve every value (finalizers exact) and adversarial arrangements
inside shared bins (bounds attained, never crossed).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from crossmodal.stats.finalize import (
    ap_from_hist,
    auroc_from_hist,
    exact_ap,
    exact_auroc,
    exact_selectivity,
    quantile_from_hist,
    selectivity_from_stats,
    single_value_bins,
)
from crossmodal.stats.running import ExactValues, UnitStats, choose_edges, finite_rows, merge_all


def _values(n: int = 240, units: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, units] float32: normals, ReLU zeros, heavy tails, bf16 ties, an offset."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, units, generator=g)
    v[:, 0::4] = torch.relu(v[:, 0::4])
    v[:, 1::4] = v[:, 1::4] / torch.rand(n, len(range(1, units, 4)), generator=g).clamp(min=0.02)
    v[:, 2::4] = v[:, 2::4].to(torch.bfloat16).float()
    v[:, 3::4] = v[:, 3::4] * 3 + 2
    return v


def _hist_ref(values: torch.Tensor, edges: torch.Tensor) -> np.ndarray:
    """Brute-force histogram: numpy searchsorted per unit, bins [underflow, ..., overflow]."""
    v, e = values.float().numpy(), edges.numpy()
    return np.stack(
        [
            np.bincount(np.searchsorted(e[u], v[:, u], side="right"), minlength=e.shape[1] + 1)
            for u in range(e.shape[0])
        ]
    )


def _stats(
    values: torch.Tensor, edges: torch.Tensor, batch: int = 64, kernel: str = "auto"
) -> UnitStats:
    s = UnitStats.empty(edges)
    for i in range(0, values.shape[0], batch):
        s.update(values[i : i + batch], kernel=kernel)
    return s


KERNELS = pytest.mark.parametrize("kernel", ["torch", "numba"])


# ----------------------------------------------------------------------------- edges


def test_edges_strictly_increasing_and_shaped():
    e = choose_edges(_values(), n_bins=64)
    assert e.shape == (12, 65) and e.dtype == torch.float32
    assert bool((e[:, 1:] > e[:, :-1]).all())


def test_edges_give_exact_zeros_and_ties_their_own_bin():
    v = _values(n=400)
    e = choose_edges(v[:100], n_bins=64)
    single = single_value_bins(e)
    s = _stats(v, e)
    for u in (0, 4, 8):  # ReLU units: 0 owns [0, nextafter(0))
        b = int(torch.searchsorted(e[u], torch.tensor([0.0]), right=True))
        assert single[u, b] and e[u, b - 1] == 0.0
        assert s.hist[u, b] == int((v[:, u] == 0).sum())
    assert single[2::4].sum() > 0  # bf16 ties repeated in the pilot


def test_edges_constant_and_single_row_pilots():
    const = torch.full((50, 3), 5.0)
    e = choose_edges(const, n_bins=16)
    assert bool((e[:, 1:] > e[:, :-1]).all())
    s = _stats(const, e)
    b = int(torch.searchsorted(e[0], torch.tensor([5.0]), right=True))
    assert single_value_bins(e)[0, b] and s.hist[0, b] == 50
    one = choose_edges(torch.tensor([[1.0, -2.0, 0.0]]), n_bins=16)
    assert bool((one[:, 1:] > one[:, :-1]).all())


def test_edges_ignore_non_finite_rows():
    v = _values(n=80)
    bad = v.clone()
    bad[5, 3], bad[9, 0] = float("nan"), float("inf")
    keep = finite_rows(bad)
    assert keep.sum() == 78
    assert torch.equal(choose_edges(bad, 32), choose_edges(v[keep], 32))


def test_edges_tail_bins_catch_values_beyond_the_pilot():
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3000, 4, generator=g) / torch.rand(3000, 4, generator=g).sqrt()  # heavy
    e = choose_edges(full[:300], 256)
    s = _stats(full, e, batch=500)
    beyond = (full > full[:300].max(0).values).sum(0)
    assert bool((beyond > 0).all())
    assert bool((s.hist[:, -1] < beyond).all())  # most land in tail bins, not the overflow


def test_edges_sparse_relu_unit_spends_spare_bins_on_tails():
    """95% zeros: ~15 distinct pilot values; the spare bins must extend the tails."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 1, generator=g) / torch.rand(3000, 1, generator=g).sqrt()
    full = torch.where(torch.rand(3000, 1, generator=g) < 0.95, 0.0, x.abs())
    e = choose_edges(full[:300], 256)
    s = _stats(full, e, batch=500)
    assert int(s.hist[0, -1]) == 0 and float(e[0, -1]) > float(full.max())
    assert int((s.hist[0] > 0).sum()) > 60  # its 125 non-zero values spread over many bins


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_bins": 4}, "n_bins must be one of"),
        ({"n_tail": 0}, "n_tail must be one of"),
        ({"max_atoms": 999}, "max_atoms must be one of"),
        ({"smooth": -1}, "min_repeat, smooth must be one of"),
    ],
)
def test_edges_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_edges(_values(), **kwargs)


def test_edges_reject_bad_pilots():
    with pytest.raises(ValueError, match="values.ndim must be one of"):
        choose_edges(torch.zeros(10))
    with pytest.raises(ValueError, match="pilot must have one of"):
        choose_edges(torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match="values.dtype must be one of"):
        choose_edges(torch.zeros(4, 2, dtype=torch.int64))


# ----------------------------------------------------------------------------- UnitStats


@KERNELS
def test_moments_min_max_hist_match_numpy(kernel):
    v = _values(n=300)
    e = choose_edges(v[::5], 32)
    s = _stats(v, e, batch=37, kernel=kernel)
    x = v.double().numpy()
    assert s.n == 300 and int(s.dropped) == 0
    np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.var.numpy(), x.var(0), rtol=1e-12)
    np.testing.assert_allclose(s.m2.numpy(), ((x - x.mean(0)) ** 2).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(s.min.numpy(), x.min(0))
    np.testing.assert_array_equal(s.max.numpy(), x.max(0))
    np.testing.assert_array_equal(s.hist.numpy(), _hist_ref(v, e))


@KERNELS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_input_dtype(dtype, kernel):
    v = _values(n=100).to(dtype)
    e = choose_edges(v[:30], 16)
    s = _stats(v, e, batch=32, kernel=kernel)
    ref = v.double().numpy()
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s.hist.numpy(), _hist_ref(v, e))


SPLITS = {
    "one": [300],
    "ones": [1] * 300,
    "uneven": [1, 2, 97, 3, 150, 47],
    "halves": [150, 150],
    "with_empty": [0, 120, 0, 180],
}
ORDERS = ["left", "reversed", "tree", "shuffled"]


def _reduce(parts: list[UnitStats], order: str) -> UnitStats:
    if order == "left":
        return merge_all(parts)
    if order == "reversed":
        return merge_all(parts[::-1])
    if order == "shuffled":
        perm = np.random.default_rng(3).permutation(len(parts))
        return merge_all([parts[i] for i in perm])
    while len(parts) > 1:  # tree: pairwise, right to left
        parts = [
            parts[i + 1].merge(parts[i]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    return parts[0]


@pytest.fixture(scope="module")
def merge_reference():
    v = _values(n=300, units=16, seed=4)
    e = choose_edges(v[::10], 64)
    return v, e, _stats(v, e, batch=300)


@pytest.mark.parametrize(("split", "order"), list(itertools.product(SPLITS, ORDERS)))
def test_merge_is_associative_and_commutative(merge_reference, split, order):
    v, e, ref = merge_reference
    bounds = np.cumsum([0, *SPLITS[split]])
    kernels = itertools.cycle(["numba", "torch"])  # parts from either kernel merge alike
    parts = [
        _stats(v[a:b], e, batch=max(1, b - a), kernel=next(kernels))
        for a, b in itertools.pairwise(bounds)
    ]
    got = _reduce(parts, order)
    assert int(got.count) == 300 and torch.equal(got.hist, ref.hist)
    assert torch.equal(got.min, ref.min) and torch.equal(got.max, ref.max)
    torch.testing.assert_close(got.mean, ref.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.m2, ref.m2, rtol=1e-12, atol=0)


def test_merge_leaves_inputs_untouched_and_checks_edges():
    v = _values()
    e = choose_edges(v, 16)
    a, b = _stats(v[:100], e), _stats(v[100:], e)
    a_hist, a_mean = a.hist.clone(), a.mean.clone()
    a.merge(b)
    assert torch.equal(a.hist, a_hist) and torch.equal(a.mean, a_mean)
    with pytest.raises(ValueError, match="edges must be one of"):
        a.merge(UnitStats.empty(e + 1))
    with pytest.raises(ValueError, match="stats must be one of"):
        merge_all([])


def test_memory_does_not_grow_with_examples():
    v = _values(n=64)
    e = choose_edges(v, 64)
    s = UnitStats.empty(e)
    s.update(v)
    first = s.nbytes
    for _ in range(99):
        s.update(v)
    assert s.nbytes == first and s.n == 6400


@KERNELS
def test_non_finite_examples_are_dropped_and_counted(kernel):
    v = _values(n=50)
    bad = v.double()
    bad[3, 1], bad[7, 5], bad[7, 6], bad[20, 0] = float("nan"), float("inf"), -float("inf"), 1e40
    # 1e40 is finite in float64, so it is kept; it overflows float32 -> the overflow bin.
    e = choose_edges(v, 16)
    s = UnitStats.empty(e)
    assert int(s.update(bad[:10], kernel)) == 2 and int(s.update(bad[10:], kernel)) == 0
    keep = torch.ones(50, dtype=torch.bool)
    keep[[3, 7]] = False
    ref = _stats(bad[keep], e, kernel="torch")
    assert s.n == 48 and int(s.dropped) == 2
    assert torch.equal(s.hist, ref.hist) and torch.equal(s.max, ref.max)
    torch.testing.assert_close(s.mean, ref.mean, rtol=1e-12, atol=0)
    assert s.hist[0, -1] >= 1  # 1e40 -> overflow bin
    ex = ExactValues.empty(12, [1, 5])
    assert int(ex.update(bad)) == 2 and ex.n == 48 and int(ex.dropped) == 2
    np.testing.assert_array_equal(ex.values.numpy(), bad[keep][:, [1, 5]].float().numpy())


@KERNELS
def test_all_rows_dropped_leaves_stats_empty(kernel):
    e = choose_edges(_values(), 16)
    s = UnitStats.empty(e)
    assert int(s.update(torch.full((4, 12), float("nan")), kernel)) == 4
    assert int(s.update(torch.zeros((0, 12)), kernel)) == 0
    assert s.n == 0 and int(s.hist.sum()) == 0 and bool((s.mean == 0).all())


@pytest.mark.parametrize(
    ("hist_dtype", "n_bins"),
    [(torch.int32, 256), (torch.int64, 31), (torch.int32, 15), (torch.int32, 40)],
)
def test_numba_kernel_equals_torch_on_edge_cases(hist_dtype, n_bins):
    """Values exactly on edges, one ulp either side, signed zeros, huge and tiny values, ties;
    edge counts that are and are not multiples of the kernel's block of 16."""
    g = torch.Generator().manual_seed(7)
    v = _values(n=200, units=12, seed=7)
    e = choose_edges(v[::4], n_bins)  # ReLU columns: edges at exactly 0.0
    assert bool((e == 0).any())
    on = e[:, torch.randint(0, e.shape[1], (60,), generator=g)].T
    up = torch.nextafter(on, torch.full_like(on, torch.inf))
    down = torch.nextafter(on, torch.full_like(on, -torch.inf))
    special = torch.tensor([0.0, -0.0, 1e-42, -1e-42, 3e38, -3e38, 1e30, -1e30])
    x = torch.cat([v, on, up, down, special[:, None].expand(-1, 12), v[:7]])
    x = x[torch.randperm(x.shape[0], generator=g)]
    a, b = UnitStats.empty(e, hist_dtype=hist_dtype), UnitStats.empty(e, hist_dtype=hist_dtype)
    for i in range(0, x.shape[0], 33):
        a.update(x[i : i + 33], kernel="torch")
        b.update(x[i : i + 33], kernel="numba")
    assert a.hist.dtype == b.hist.dtype == hist_dtype and torch.equal(a.hist, b.hist)
    np.testing.assert_array_equal(b.hist.numpy(), _hist_ref(x, e))
    assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max) and a.n == b.n == x.shape[0]
    scale = float(x.double().abs().max())  # +-3e38 cancel: summation order shows at 1e-16 x it
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-12, atol=1e-14 * scale)
    torch.testing.assert_close(b.m2, a.m2, rtol=1e-12, atol=0)


def test_numba_kernel_bins_like_searchsorted_for_every_edge_count():
    """The kernel's blocks of 16 edges: counts below, at and around every multiple of 16."""
    rng = np.random.default_rng(3)
    for n_edges in [*range(2, 70), 255, 256, 257, 258, 513]:
        e = torch.from_numpy(np.sort(rng.standard_normal((5, n_edges)), 1).astype(np.float32))
        e = e + torch.arange(n_edges) * 1e-3  # strictly increasing
        x = torch.cat([torch.randn(40, 5) * 2, e[:, rng.integers(0, n_edges, 9)].T])
        s = UnitStats.empty(e)
        s.update(x, kernel="numba")
        np.testing.assert_array_equal(s.hist.numpy(), _hist_ref(x, e), err_msg=f"{n_edges=}")


def test_numpy_round_trip_and_update_errors():
    v = _values()
    e = choose_edges(v, 16)
    s = _stats(v, e)
    arrays = s.to_numpy()
    for a in arrays.values():
        a.setflags(write=False)  # as ray.put delivers them
    back = UnitStats.from_numpy(arrays)
    assert all(torch.equal(getattr(back, k), getattr(s, k)) for k in arrays)
    back.update(v[:3])  # still writable
    assert back.n == s.n + 3
    with pytest.raises(ValueError, match="missing"):
        UnitStats.from_numpy({"edges": arrays["edges"]})
    with pytest.raises(ValueError, match=r"values.shape\[1\] must be one of \[12\]"):
        s.update(v[:, :5])
    with pytest.raises(ValueError, match="hist_dtype must be one of"):
        UnitStats.empty(e, hist_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"kernel must be one of \[auto, numba, torch\]"):
        s.update(v[:3], kernel="fast")
    strided = UnitStats.empty(e)
    strided.mean = torch.zeros(24, dtype=torch.float64)[::2]  # not contiguous: numba refuses
    with pytest.raises(ValueError, match=r"kernel must be one of \[auto, torch\] here"):
        strided.update(v[:3], kernel="numba")
    strided.update(v[:3])  # auto falls back to torch
    assert strided.n == 3


def test_exact_values_merge_and_round_trip():
    v = _values()
    a, b = ExactValues.empty(12, [0, 3, 7]), ExactValues.empty(12, [0, 3, 7])
    a.update(v[:100])
    b.update(v[100:])
    m = a.merge(b)
    np.testing.assert_array_equal(m.values.numpy(), v[:, [0, 3, 7]].numpy())
    back = ExactValues.from_numpy(m.to_numpy())
    assert torch.equal(back.values, m.values) and torch.equal(back.units, m.units)
    assert ExactValues.empty(12).values.shape == (0, 12)
    with pytest.raises(ValueError, match="units must be one of"):
        ExactValues.empty(12, [3, 12])
    with pytest.raises(ValueError, match="units must be one of"):
        a.merge(ExactValues.empty(12, [0, 3]))


# ----------------------------------------------------------------------------- exact finalizers


def _labelled(n: int = 300, units: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.3
    v = torch.randn(n, units, generator=g) + y[:, None] * torch.linspace(-1, 2, units)
    v[:, ::3] = torch.relu(v[:, ::3])  # many exact zeros
    v[:, 1::3] = torch.round(v[:, 1::3] * 4) / 4  # heavy ties
    return v, y


def test_exact_ap_and_auroc_equal_sklearn():
    v, y = _labelled()
    ap, auc = exact_ap(v, y), exact_auroc(v, y)
    ref_ap = [average_precision_score(y.numpy(), v[:, u].numpy()) for u in range(v.shape[1])]
    ref_auc = [roc_auc_score(y.numpy(), v[:, u].numpy()) for u in range(v.shape[1])]
    np.testing.assert_allclose(ap.numpy(), ref_ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(auc.numpy(), ref_auc, rtol=0, atol=1e-12)


def test_exact_with_several_labels_from_one_sort():
    v, _ = _labelled(seed=1)
    lang = torch.arange(300) % 5
    onehot = lang[:, None] == torch.arange(5)[None, :]
    ap, auc = exact_ap(v, onehot), exact_auroc(v, onehot)
    assert ap.shape == (5, 40)
    for k in range(5):
        np.testing.assert_allclose(ap[k].numpy(), exact_ap(v, onehot[:, k]).numpy(), atol=1e-15)
        np.testing.assert_allclose(auc[k].numpy(), exact_auroc(v, onehot[:, k]).numpy(), atol=1e-15)
    y = torch.zeros(300, dtype=torch.bool)
    assert bool(exact_ap(v, y).isnan().all()) and bool(exact_auroc(v, y).isnan().all())
    with pytest.raises(ValueError, match=r"labels.shape must be one of"):
        exact_ap(v, y[:10])
    with pytest.raises(ValueError, match="labels must be one of"):
        exact_ap(v, onehot | onehot.roll(1, dims=1))


def test_exact_selectivity_matches_numpy():
    v, _ = _labelled(seed=2)
    lang = torch.arange(300) % 3
    ex = {}
    for k, name in enumerate(["deu", "fra", "jpn"]):
        ex[name] = ExactValues.empty(40, [2, 5, 11])
        ex[name].update(v[lang == k])
    sel = exact_selectivity(ex)
    sub = v[:, [2, 5, 11]].double().numpy()
    order = np.concatenate([np.flatnonzero(lang.numpy() == k) for k in range(3)])
    for k, name in enumerate(["deu", "fra", "jpn"]):
        pos, neg = sub[lang.numpy() == k], sub[lang.numpy() != k]
        y = np.isin(order, np.flatnonzero(lang.numpy() == k))
        ref = [average_precision_score(y, sub[order, j]) for j in range(3)]
        np.testing.assert_allclose(sel[name].ap.numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(sel[name].on_p50.numpy(), np.median(pos, 0), rtol=1e-12)
        np.testing.assert_allclose(sel[name].on_p90.numpy(), np.percentile(pos, 90, 0), rtol=1e-12)
        np.testing.assert_allclose(sel[name].off_mean.numpy(), neg.mean(0), rtol=1e-12)
        assert (sel[name].n_pos, sel[name].n_neg) == (100, 200)
        assert torch.equal(sel[name].ap_lo, sel[name].ap_hi)


# ----------------------------------------------------------------------------- histogram finalizers


def _resolving_edges(v: torch.Tensor) -> torch.Tensor:
    """One single-value bin [x, nextafter(x)) per distinct value of each unit (few values)."""
    rows = []
    for u in range(v.shape[1]):
        x = torch.unique(v[:, u])
        rows.append(torch.stack([x, torch.nextafter(x, torch.tensor(np.inf))], 1).flatten())
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[-1] + torch.arange(1, width - len(r) + 1)]) for r in rows])


def _pos_neg(v, y, e):
    return _stats(v[y], e).hist, _stats(v[~y], e).hist


@pytest.mark.parametrize("estimate", ["expected", "tied"])
def test_hist_finalizers_exact_when_bins_resolve_every_value(estimate):
    v, y = _labelled(units=12, seed=3)
    v = torch.round(v * 2) / 2  # few distinct values, ties included
    e = _resolving_edges(v)
    hp, hn = _pos_neg(v, y, e)
    single = single_value_bins(e)
    ap, lo, hi = ap_from_hist(hp, hn, single, estimate=estimate)
    auc, alo, ahi = auroc_from_hist(hp, hn, single)
    np.testing.assert_allclose(ap.numpy(), exact_ap(v, y).numpy(), atol=1e-12)
    np.testing.assert_allclose(auc.numpy(), exact_auroc(v, y).numpy(), atol=1e-12)
    assert float((hi - lo).max()) <= 3e-9 and float((ahi - alo).max()) <= 3e-9


def test_expected_estimate_exact_for_distinct_values_one_per_bin():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(80, 6, generator=g)
    y = torch.rand(80, generator=g) < 0.4
    s = torch.sort(v, 0).values
    e = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1]).T.contiguous()  # 1 value/bin
    hp, hn = _pos_neg(v, y, e)
    for estimate in ("expected", "tied"):
        ap, lo, hi = ap_from_hist(hp, hn, estimate=estimate)
        np.testing.assert_allclose(ap.numpy(), exact_ap(v, y).numpy(), atol=1e-12)
        assert bool((lo <= ap).all() & (ap <= hi).all())


def _arranged(hp: torch.Tensor, hn: torch.Tensor, e: torch.Tensor, best: bool):
    """One unit's values with these histograms, arranged inside each bin as the AP bounds say:
    positives tied above the negatives (best) or distinct below them (worst)."""
    col, lab = [], []
    for b in range(1, hp.shape[1] - 1):
        p, n = int(hp[0, b]), int(hn[0, b])
        grid = np.linspace(float(e[0, b - 1]), float(e[0, b]), p + n + 2)[1:-1]
        if best:
            col += [grid[-1]] * p + list(grid[:n])
        else:
            col += list(grid[:p]) + list(grid[p:])
        lab += [True] * p + [False] * n
    return torch.tensor(col)[:, None], torch.tensor(lab)


def test_ap_bounds_hold_and_are_attained():
    g = torch.Generator().manual_seed(6)
    n = 200
    y = torch.rand(n, generator=g) < 0.35
    v = torch.randn(n, 1, generator=g) + y[:, None] * 0.8
    e = torch.linspace(-3, 3.6, 9)[None, :]  # 8 coarse bins, shared pairs everywhere
    v = v.clamp(-2.99, 3.59)  # keep under/overflow empty so arrangements stay in bins
    hp, hn = _pos_neg(v, y, e)
    ap, lo, hi = ap_from_hist(hp, hn)
    exact = exact_ap(v, y)
    assert float(lo) < float(exact) < float(hi) and float(lo) <= float(ap) <= float(hi)
    for best, bound in ((True, hi), (False, lo)):
        vals, labels = _arranged(hp, hn, e, best)
        ahp, ahn = _pos_neg(vals.float(), labels, e)
        assert torch.equal(ahp, hp) and torch.equal(ahn, hn)
        np.testing.assert_allclose(float(exact_ap(vals, labels)), float(bound), atol=2e-9)
        auc, alo, ahi = auroc_from_hist(hp, hn)
        got = float(exact_auroc(vals, labels))
        np.testing.assert_allclose(got, float(ahi if best else alo), atol=2e-9)


def test_bounds_contain_exact_on_random_data():
    g = torch.Generator().manual_seed(7)
    v = torch.randn(400, 300, generator=g) * torch.rand(300, generator=g) * 3
    v[:, ::2] = torch.relu(v[:, ::2]).to(torch.bfloat16).float()
    y = torch.rand(400, generator=g) < 0.2
    v = v + y[:, None] * torch.randn(300, generator=g)
    e = choose_edges(v[:40], 16)  # coarse: wide bounds, many shared pairs
    hp, hn = _pos_neg(v, y, e)
    single = single_value_bins(e)
    ex_ap, ex_auc = exact_ap(v, y), exact_auroc(v, y)
    for estimate in ("expected", "tied"):
        ap, lo, hi = ap_from_hist(hp, hn, single, estimate=estimate)
        assert bool(((lo <= ex_ap) & (ex_ap <= hi) & (lo <= ap) & (ap <= hi)).all())
    auc, alo, ahi = auroc_from_hist(hp, hn, single)
    assert bool(((alo <= ex_auc) & (ex_auc <= ahi)).all())
    with pytest.raises(ValueError, match="estimate must be one of"):
        ap_from_hist(hp, hn, estimate="mid")
    with pytest.raises(ValueError, match="hist_neg.shape must be one of"):
        ap_from_hist(hp, hn[:, 1:])
    with pytest.raises(ValueError, match="hist_neg.shape must be one of"):
        auroc_from_hist(hp, hn[:, 1:])


def test_quantiles_within_one_bin_width():
    v = _values(n=301, units=12, seed=8)
    e = choose_edges(v[::7], 32)
    s = _stats(v, e)
    bounds = torch.cat([s.min[:, None], e.double(), s.max[:, None]], 1)
    x = np.sort(v.double().numpy(), 0)
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        got = quantile_from_hist(s.hist, e, q, s.min, s.max).numpy()
        ref = np.quantile(v.double().numpy(), q, axis=0)
        r = q * 300
        for u in range(12):
            b = np.searchsorted(e[u].numpy(), x[[int(np.floor(r)), int(np.ceil(r))], u], "right")
            width = float((bounds[u, b + 1] - bounds[u, b]).max())
            assert abs(got[u] - ref[u]) <= width + 1e-9, (q, u)
    assert bool(quantile_from_hist(torch.zeros_like(s.hist), e, 0.5).isnan().all())
    with pytest.raises(ValueError, match="q must be one of"):
        quantile_from_hist(s.hist, e, 1.5)
    with pytest.raises(ValueError, match="edges.shape must be one of"):
        quantile_from_hist(s.hist, e[:, 1:], 0.5)


def test_quantiles_exact_with_resolving_bins():
    v = torch.round(_values(n=101, units=6, seed=9) * 2) / 2
    e = _resolving_edges(v)
    s = _stats(v, e)
    got = quantile_from_hist(s.hist, e, 0.5, s.min, s.max)
    np.testing.assert_allclose(got.numpy(), np.median(v.double().numpy(), 0), atol=1e-6)


def test_selectivity_from_stats_per_language():
    v, _ = _labelled(n=600, units=30, seed=10)
    lang = torch.arange(600) % 4
    names = ["eng", "deu", "fra", "cmn"]
    e = choose_edges(v[::5], 64)
    stats = {name: _stats(v[lang == k], e) for k, name in enumerate(names)}
    sel = selectivity_from_stats(stats)
    tied = selectivity_from_stats(stats, estimate="tied")
    x = v.double().numpy()
    for k, name in enumerate(names):
        y = lang == k
        hp, hn = stats[name].hist, sum(stats[m].hist for m in names if m != name)
        for est, got in (("expected", sel[name]), ("tied", tied[name])):
            ref = ap_from_hist(hp, hn, single_value_bins(e), estimate=est)
            assert all(
                torch.equal(a, b) for a, b in zip(ref, (got.ap, got.ap_lo, got.ap_hi), strict=True)
            )
        ex = exact_ap(v, y)
        assert bool(((sel[name].ap_lo <= ex) & (ex <= sel[name].ap_hi)).all())
        assert float((sel[name].ap - ex).abs().max()) < 0.03
        np.testing.assert_allclose(sel[name].off_mean.numpy(), x[~y.numpy()].mean(0), rtol=1e-12)
        med = quantile_from_hist(hp, e, 0.5, stats[name].min, stats[name].max)
        assert torch.equal(sel[name].on_p50, med)
        assert (sel[name].n_pos, sel[name].n_neg) == (150, 450)
    with pytest.raises(ValueError, match="languages must be one of"):
        selectivity_from_stats({"eng": stats["eng"]})
    with pytest.raises(ValueError, match=r"stats\['deu'\].edges must be one of"):
        selectivity_from_stats({"eng": stats["eng"], "deu": UnitStats.empty(e + 1)})
