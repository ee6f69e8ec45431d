"""Selectivity of units from statistics alone: AP, AUROC and quantiles, with error bounds.

Histogram finalizers know only how many positives and negatives share each bin. Their
intervals are guaranteed to contain the exact value for the underlying (float32) values: the
bounds take the best and worst arrangement inside every shared bin. The AP point estimate is
the AP expected under a random arrangement inside each bin (default) or sklearn's tie
semantics with each bin one tied group (``estimate="tied"``, biased low); both are exact when
bins resolve every value, as is AUROC (Mann-Whitney, ties 1/2).
Exact finalizers sort raw values (:class:`crossmodal.stats.running.ExactValues`) and equal sklearn's
``average_precision_score`` / ``roc_auc_score`` to rounding; reducers use them to make top-k
selection exact. Everything is vectorised over units and chunked so temporaries stay small.

Public API: per metric, :func:`ap_from_hist`, :func:`auroc_from_hist` and
:func:`quantile_from_hist` (with :func:`single_value_bins`), and :func:`exact_ap`,
:func:`exact_auroc` and :func:`exact_ap_auroc`; every metric of every language of one (task,
modality, step) at once, :func:`selectivity_from_stats` and :func:`exact_selectivity`.

Conventions: AP is NaN without positives (sklearn returns 0 with a warning); AUROC is NaN
without positives or negatives; quantiles are NaN without examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from crossmodal.stats.running import ExactValues, UnitStats

_CHUNK_ELEMS = 1 << 18
"""Elements per float64 temporary: 2 MiB chunks stay in cache (measured fastest) and bound memory."""

_EXACT_ELEMS = 1 << 20
"""Elements of the ``[unit, example]`` temporaries of the exact finalizers."""

_BOUND_SLACK = 1e-9
"""Bounds are widened by this much to cover float64 rounding (worst case about 1e-11)."""

_EULER_GAMMA = 0.5772156649015329
_ESTIMATES = ("expected", "tied")


@dataclass(frozen=True)
class Selectivity:
    """Per-unit selectivity of one language against the others of one (task, modality, step).

    All tensors are ``[unit]`` float64. For exact results ``*_lo == *_hi == value``.
    """

    ap: Tensor
    ap_lo: Tensor
    ap_hi: Tensor
    auroc: Tensor
    auroc_lo: Tensor
    auroc_hi: Tensor
    on_p50: Tensor  # median over positives (np.median semantics)
    on_p90: Tensor  # 90th percentile over positives (linear interpolation)
    off_mean: Tensor  # mean over negatives
    n_pos: int
    n_neg: int


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


def _chunks(n_units: int, width: int, elems: int = _CHUNK_ELEMS) -> list[slice]:
    """Unit slices of about ``elems / width`` units (one empty slice for zero units)."""
    step = max(1, elems // max(1, width))
    return [slice(i, min(i + step, n_units)) for i in range(0, max(n_units, 1), step)]


def _check_hists(hist_pos: Tensor, hist_neg: Tensor) -> None:
    if hist_pos.ndim != 2 or hist_pos.shape != hist_neg.shape:
        raise ValueError(
            f"hist_neg.shape must be one of [{tuple(hist_pos.shape)}] ([unit, bin]), "
            f"got {tuple(hist_neg.shape)!r}; histograms must share edges"
        )


def single_value_bins(edges: Tensor) -> Tensor:
    """Bool ``[unit, n_bins + 2]``: bins ``[e, nextafter(e))`` that hold one float32 value.

    Ties inside such a bin are real ties, so the histogram is exact there and bounds collapse.
    Underflow and overflow bins are never single-valued.
    """
    e = _as_tensor(edges).to(torch.float32)
    single = e[:, 1:] == torch.nextafter(e[:, :-1], torch.full_like(e[:, :-1], torch.inf))
    pad = torch.zeros(e.shape[0], 1, dtype=torch.bool, device=e.device)
    return torch.cat([pad, single, pad], dim=1)


def _harmonic(n_max: int, device: torch.device) -> Tensor:
    """``H[k] = 1 + 1/2 + ... + 1/k`` for ``k = 0..n_max`` (digamma is accurate to ~1 ulp)."""
    k = torch.arange(n_max + 1, dtype=torch.float64, device=device)
    return torch.digamma(k + 1) + _EULER_GAMMA


def _hist_chunk(p: Tensor, n: Tensor, single: Tensor | None, estimate: str) -> list[Tensor]:
    """AP, AUROC and their bounds for counts ``p, n: [unit, bin]`` (float64, bins ascending).

    ``a``/``f``: positives/negatives strictly above a bin. Returns six ``[unit]`` tensors.
    Written with few, in-place operations: this runs over units x bins x conditions.
    """
    cum_p, cum_n = torch.cumsum(p, 1), torch.cumsum(n, 1)
    big_p, big_n = cum_p[:, -1:].clone(), cum_n[:, -1:].clone()
    a = torch.sub(big_p, cum_p, out=cum_p)
    f = torch.sub(big_n, cum_n, out=cum_n)
    ap_ = a + p  # positives in or above the bin
    num = p * ap_
    above = ap_.add_(f)  # examples strictly above the bin's negatives
    # Best case: the bin's positives tied together above its negatives.
    hi = num / above.clamp(min=1)
    # Tied: the bin is one threshold (sklearn semantics).
    tied = num.div_(above.add_(n).clamp_(min=1))  # above is now "examples in or above"
    # Worst case: negatives first, then distinct positives: sum_{k=1..p} (a+k)/(a+c+k) with
    # c = f + n, which is p - c (H[a+c+p] - H[a+c]).
    h = _harmonic(int(big_p.max() + big_n.max()) if p.numel() else 0, p.device)
    base = (above - p).long()
    c = f + n
    lo = p - c * (h[base + p.long()] - h[base])
    if estimate == "tied":
        est = tied
    else:
        # Expected contribution when the bin's values are distinct and randomly interleaved:
        # the k-th positive has about k n / (p + 1) of the bin's negatives above it, so its
        # precision is (a + k) / (d + k / g), g = (p + 1) / (p + 1 + n), d = a + f; the sum
        # over k is replaced by its midpoint-rule integral (one log1p). A bin without
        # negatives takes the exact sum (= lo), so bins that resolve every value are exact.
        g = p + 1
        g = g.div_(g + n)
        dg = (a + f).mul_(g)
        est = torch.log1p(p / (dg + 0.5)).mul_(a.sub(dg).mul_(g)).add_(p * g)
        est = torch.where(n == 0, lo, est)
    if single is not None:
        est, lo, hi = (x.masked_scatter_(single, tied[single]) for x in (est, lo, hi))
    inv_p = 1.0 / big_p[:, 0]
    ap = est.sum(1) * inv_p
    ap_lo = (lo.sum(1) * inv_p - _BOUND_SLACK).clamp_(0.0, 1.0)
    ap_hi = (hi.sum(1) * inv_p + _BOUND_SLACK).clamp_(0.0, 1.0)
    ap = torch.minimum(torch.maximum(ap, ap_lo), ap_hi)
    # AUROC, Mann-Whitney: a positive beats the negatives below its bin, ties count 1/2.
    pn = p * n
    norm = 1.0 / (big_p[:, 0] * big_n[:, 0])
    auc = (big_p[:, 0] * big_n[:, 0] - (p * f).sum(1) - 0.5 * pn.sum(1)) * norm
    shared = pn if single is None else pn.masked_fill_(single, 0.0)
    half = 0.5 * shared.sum(1) * norm + _BOUND_SLACK
    return [ap, ap_lo, ap_hi, auc, (auc - half).clamp_(0.0, 1.0), (auc + half).clamp_(0.0, 1.0)]


def _hist_metrics(hist_pos, hist_neg, single, estimate) -> list[Tensor]:
    if estimate not in _ESTIMATES:
        raise ValueError(f"estimate must be one of {_ESTIMATES}, got {estimate!r}")
    hist_pos, hist_neg = _as_tensor(hist_pos), _as_tensor(hist_neg)
    _check_hists(hist_pos, hist_neg)
    single = None if single is None else _as_tensor(single)
    parts = [
        _hist_chunk(
            hist_pos[sl].to(torch.float64),
            hist_neg[sl].to(torch.float64),
            None if single is None else single[sl],
            estimate,
        )
        for sl in _chunks(hist_pos.shape[0], hist_pos.shape[1])
    ]
    return [torch.cat(x) for x in zip(*parts, strict=True)]


def ap_from_hist(
    hist_pos: Tensor, hist_neg: Tensor, single: Tensor | None = None, estimate: str = "expected"
) -> tuple[Tensor, Tensor, Tensor]:
    """Average precision of binned scores and an interval guaranteed to contain the exact AP.

    Args:
        hist_pos, hist_neg: ``[unit, bin]`` counts over the same edges, bins ascending.
        single: optional ``[unit, bin]`` bool from :func:`single_value_bins`; those bins are
            exact (real ties) and add no uncertainty.
        estimate: ``"tied"``: the AP of the binned scores, each bin one tied score group
            (sklearn tie semantics); it is biased low because a tie charges every positive of
            a bin with all of the bin's negatives. ``"expected"`` (default): the AP expected
            when each bin's values are distinct and randomly interleaved (tied semantics
            in single-value bins); about half the error of ``"tied"`` on heavy-tailed data.

    Returns:
        ``(ap, ap_lo, ap_hi)``, ``[unit]`` float64. The bounds put each bin's positives tied
        above / distinct below its negatives, the extreme arrangements of the positive/negative
        pairs that share a bin, so ``ap_lo <= exact AP <= ap_hi`` for any values with these
        histograms (widened by 1e-9 for rounding).
    """
    return tuple(_hist_metrics(hist_pos, hist_neg, single, estimate)[:3])  # type: ignore[return-value]


def auroc_from_hist(
    hist_pos: Tensor, hist_neg: Tensor, single: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """AUROC (Mann-Whitney on binned counts, ties 1/2) and ``auc -/+ shared pairs / (2 P N)``.

    Ties count 1/2, which is also the expected value under random order inside a bin.
    """
    return tuple(_hist_metrics(hist_pos, hist_neg, single, "tied")[3:])  # type: ignore[return-value]


def _quantiles(
    hist: Tensor, edges: Tensor, qs: tuple[float, ...], vmin: Tensor | None, vmax: Tensor | None
) -> list[Tensor]:
    """Kernel of :func:`quantile_from_hist` for several ``qs`` sharing one cumulative sum."""
    hist = hist.to(torch.float64)
    edges = edges.to(torch.float64)
    n_bins = hist.shape[1]
    cum = torch.cumsum(hist, 1)
    last = (cum[:, -1:] - 1).clamp(min=0)
    lo_end = edges[:, :1] if vmin is None else torch.minimum(vmin.to(edges)[:, None], edges[:, :1])
    hi_end = (
        edges[:, -1:] if vmax is None else torch.maximum(vmax.to(edges)[:, None], edges[:, -1:])
    )

    def place(i: Tensor) -> Tensor:
        # Bin b holds order statistics cum[b-1] .. cum[b]-1 and spans [bound b, bound b+1),
        # bounds = [vmin, e_0, ..., e_last, vmax]; its order statistics sit evenly inside.
        b = torch.searchsorted(cum, i, right=True).clamp_(max=n_bins - 1)
        h = torch.gather(hist, 1, b)
        before = torch.gather(cum, 1, b) - h
        lo = torch.where(b == 0, lo_end, torch.gather(edges, 1, (b - 1).clamp_(min=0)))
        hi = torch.where(b == n_bins - 1, hi_end, torch.gather(edges, 1, b.clamp(max=n_bins - 2)))
        return lo + (i - before + 0.5) / h.clamp_(min=1) * (hi - lo)

    out = []
    for q in qs:
        r = q * last
        i0 = r.floor()
        frac = r - i0
        val = (1 - frac) * place(i0) + frac * place(torch.minimum(i0 + 1, last))
        out.append(torch.where(cum[:, -1:] > 0, val, torch.nan)[:, 0])
    return out


def quantile_from_hist(
    hist: Tensor,
    edges: Tensor,
    q: float,
    vmin: Tensor | None = None,
    vmax: Tensor | None = None,
) -> Tensor:
    """The ``q`` quantile (np.quantile 'linear' semantics) of binned values, ``[unit]`` float64.

    Order statistics are placed evenly inside their bin and interpolated like numpy does, so
    the result is within the width of the bin(s) holding the exact order statistics. The
    underflow/overflow bins span ``[vmin, e_0)`` and ``[e_last, vmax]``: pass the statistics'
    ``min``/``max``, else they collapse onto the first/last edge.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be one of [0..1], got {q!r}; use 0.5 for the median")
    hist, edges = _as_tensor(hist), _as_tensor(edges)
    if hist.ndim != 2 or edges.shape != (hist.shape[0], hist.shape[1] - 1):
        raise ValueError(
            f"edges.shape must be one of [{(hist.shape[0], hist.shape[1] - 1)}], "
            f"got {tuple(edges.shape)!r}; pass the edges the histogram was built with"
        )
    vmin = None if vmin is None else _as_tensor(vmin)
    vmax = None if vmax is None else _as_tensor(vmax)
    parts = [
        _quantiles(
            hist[sl],
            edges[sl],
            (q,),
            None if vmin is None else vmin[sl],
            None if vmax is None else vmax[sl],
        )[0]
        for sl in _chunks(hist.shape[0], hist.shape[1])
    ]
    return torch.cat(parts)


def _check_languages(names: list[str]) -> None:
    if len(names) < 2:
        raise ValueError(
            f"languages must be one of [>= 2 languages], got {names!r}; selectivity needs negatives"
        )


def selectivity_from_stats(
    stats: Mapping[str, UnitStats], estimate: str = "expected"
) -> dict[str, Selectivity]:
    """Per language L: L's examples against all other languages of one (task, modality, step).

    The statistics must share edges (one :func:`crossmodal.stats.running.choose_edges` call per
    (task, modality, step)). Negatives are the merged other languages; ``off_mean`` is their
    pooled mean. Cost is O(unit x bin) per language; temporaries are chunked over units.
    """
    if estimate not in _ESTIMATES:
        raise ValueError(f"estimate must be one of {_ESTIMATES}, got {estimate!r}")
    names = list(stats)
    _check_languages(names)
    edges = stats[names[0]].edges
    for name in names[1:]:
        if not torch.equal(stats[name].edges, edges):
            raise ValueError(
                f"stats[{name!r}].edges must be one of [the edges of {names[0]!r}], "
                "got different edges; share one choose_edges() per (task, modality, step)"
            )
    single = single_value_bins(edges)
    parts: dict[str, list[list[Tensor]]] = {name: [] for name in names}
    for sl in _chunks(edges.shape[0], edges.shape[1] + 1):
        hists = [stats[name].hist[sl].to(torch.float64) for name in names]
        total = torch.stack(hists).sum(0)
        for name, pos in zip(names, hists, strict=True):
            s = stats[name]
            metrics = _hist_chunk(pos, total - pos, single[sl], estimate)
            quant = _quantiles(pos, edges[sl], (0.5, 0.9), s.min[sl], s.max[sl])
            parts[name].append(metrics + quant)
    counts = {k: s.count.to(torch.float64) for k, s in stats.items()}
    out = {}
    for name, s in stats.items():
        cols = [torch.cat(x) for x in zip(*parts[name], strict=True)]
        others = [m for m in names if m != name]
        n_neg = sum(counts[m] for m in others)
        off_mean = sum(counts[m] * stats[m].mean for m in others) / n_neg  # pooled (Chan) mean
        out[name] = Selectivity(
            *cols[:6],
            on_p50=cols[6],
            on_p90=cols[7],
            off_mean=off_mean,
            n_pos=int(s.count),
            n_neg=int(n_neg),
        )
    return out


# ----------------------------------------------------------------------------- exact


def _exact_chunk(v: Tensor, lab: Tensor, n_cls: int) -> tuple[Tensor, Tensor]:
    """AP and AUROC ``[class, unit]`` for ``v: [example, unit]``, one class per example.

    Works in ``[unit, example]`` layout (sorting contiguous rows is ~3x faster) and keeps one
    example axis for all classes: per class only int32 counts, then scatter-adds by class.
    """
    n = v.shape[0]
    s, order = torch.sort(v.T.contiguous(), dim=1)  # [unit, example]; order within ties is moot
    cls = lab[order]  # [unit, example]
    i = torch.arange(n, device=v.device)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.cummax(torch.where(first, i, 0), dim=1).values  # first index of tie group
    end = torch.flip(torch.cummin(torch.flip(torch.where(last, i, n - 1), [1]), 1).values, [1])
    # AP: an example's precision is that of the threshold at its tie group, i.e. over all
    # examples >= the group's value (positions >= start); its class's positives there are
    # P - (class members before start).
    below = torch.zeros_like(cls, dtype=torch.int32)
    for k in range(n_cls):
        mine = cls == k
        before = torch.cumsum(mine, 1, dtype=torch.int32).sub_(mine.to(torch.int32))
        below = torch.where(mine, torch.gather(before, 1, start), below)
    big_p = torch.zeros(v.shape[1], n_cls, dtype=torch.float64, device=v.device)
    big_p.scatter_add_(1, cls, torch.ones_like(s, dtype=torch.float64))
    tp = torch.gather(big_p, 1, cls).sub_(below.to(torch.float64))
    prec = tp.div_((n - start).to(torch.float64))
    ap = torch.zeros_like(big_p).scatter_add_(1, cls, prec) / big_p
    # AUROC: Mann-Whitney with mid-ranks for ties.
    rank = (start + end).to(torch.float64).mul_(0.5).add_(1.0)
    rank_sum = torch.zeros_like(big_p).scatter_add_(1, cls, rank)
    auc = (rank_sum - big_p * (big_p + 1) * 0.5) / (big_p * (n - big_p))
    return ap.T, auc.T


def _exact(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    values, labels = _as_tensor(values), _as_tensor(labels).to(torch.bool)
    if values.ndim != 2 or labels.ndim not in (1, 2) or labels.shape[0] != values.shape[0]:
        raise ValueError(
            f"labels.shape must be one of [[example], [example, label]] with example = "
            f"{values.shape[0] if values.ndim else '?'}, got {tuple(labels.shape)!r}"
        )
    if labels.ndim == 2 and not bool((labels.sum(1) == 1).all()):
        raise ValueError(
            "labels must be one of [one-hot rows], got rows with zero or several labels; "
            "pass one bool label vector per call instead"
        )
    lab = (labels.long() if labels.ndim == 1 else labels.long().argmax(1)).to(values.device)
    n_cls = 2 if labels.ndim == 1 else labels.shape[1]
    parts = [
        _exact_chunk(values[:, sl], lab, n_cls)
        for sl in _chunks(values.shape[1], values.shape[0], _EXACT_ELEMS)
    ]
    ap, auc = (torch.cat(x, dim=1) for x in zip(*parts, strict=True))
    return (ap[1], auc[1]) if labels.ndim == 1 else (ap, auc)


def exact_ap_auroc(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`exact_ap` and :func:`exact_auroc` from one sort (the sort is most of the cost)."""
    return _exact(values, labels)


def exact_ap(values: Tensor, labels: Tensor) -> Tensor:
    """sklearn ``average_precision_score`` per unit of ``values: [example, unit]``.

    ``labels``: bool ``[example]`` -> ``[unit]``, or one-hot ``[example, label]`` (e.g. the
    language of each example) -> ``[label, unit]``, all from one sort. float64; NaN for a
    label without positives.
    """
    return _exact(values, labels)[0]


def exact_auroc(values: Tensor, labels: Tensor) -> Tensor:
    """sklearn ``roc_auc_score`` per unit (Mann-Whitney, ties 1/2); shapes as :func:`exact_ap`."""
    return _exact(values, labels)[1]


def _exact_quantile(v: Tensor, q: float) -> Tensor:
    if v.shape[0] == 0:
        return torch.full((v.shape[1],), torch.nan, dtype=torch.float64, device=v.device)
    s = torch.sort(v.to(torch.float64), dim=0).values
    r = q * (v.shape[0] - 1)
    i0 = int(np.floor(r))
    i1 = min(i0 + 1, v.shape[0] - 1)
    return s[i0] + (r - i0) * (s[i1] - s[i0])


def exact_selectivity(exact: Mapping[str, ExactValues]) -> dict[str, Selectivity]:
    """Exact counterpart of :func:`selectivity_from_stats` for the kept subset of units."""
    names = list(exact)
    _check_languages(names)
    units = exact[names[0]].units
    if not all(torch.equal(e.units, units) for e in exact.values()):
        raise ValueError("units must be one of [identical across languages], got different subsets")
    values = torch.cat([e.values for e in exact.values()], dim=0)
    lang = torch.cat(
        [torch.full((e.n,), k, dtype=torch.int64) for k, e in enumerate(exact.values())]
    )
    onehot = lang[:, None] == torch.arange(len(names))[None, :]
    ap, auc = _exact(values, onehot)
    out = {}
    for k, (name, e) in enumerate(exact.items()):
        neg = values[~onehot[:, k].to(values.device)].to(torch.float64)
        out[name] = Selectivity(
            ap=ap[k],
            ap_lo=ap[k],
            ap_hi=ap[k],
            auroc=auc[k],
            auroc_lo=auc[k],
            auroc_hi=auc[k],
            on_p50=_exact_quantile(e.values, 0.5),
            on_p90=_exact_quantile(e.values, 0.9),
            off_mean=neg.mean(0),
            n_pos=e.n,
            n_neg=values.shape[0] - e.n,
        )
    return out
