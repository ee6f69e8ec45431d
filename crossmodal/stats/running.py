"""Mergeable per-unit statistics whose memory does not grow with the number of examples.

For one condition (task, modality, language) and decoding step, every batch gives per-example
unit values ``[batch, unit]``. :class:`UnitStats` keeps, on the values' device, the sufficient
statistics the selectivity finalizers need (``crossmodal.stats.finalize``): count, mean and
M2 merged in float64 (Chan et al. 1979, exact up to rounding and associative), min, max and a
histogram over per-unit bin edges. Edges come from a pilot sample (:func:`choose_edges`) and are
shared by all languages of one (task, modality, step), so their histograms can be added and
compared. :class:`ExactValues` keeps the raw values instead, for small runs, for validation and
for the subset of units whose top-k selection must be exact.

Conventions:
  * an example (row) with any NaN/Inf is not merged anywhere and is counted in ``dropped``;
  * histograms bin the values rounded to float32 (exact for fp16/bf16/fp32 inputs);
    moments, min and max use the values in float64;
  * nothing here synchronises with the device: counts stay 0-d tensors until read;
  * on CPU, ``update`` folds a batch with a numba kernel (:mod:`crossmodal.stats.kernel`, same
    results, several times faster); on GPU, and without numba, with torch operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from crossmodal.stats import kernel as fold

_CHUNK_ELEMS = 1 << 24
"""Largest number of (unit x example) elements a temporary may hold; bounds peak memory."""


def _unit_chunks(n_units: int, rows: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, rows))
    return [slice(i, min(i + step, n_units)) for i in range(0, n_units, step)]


def _check_values(values: Tensor, n_units: int | None = None) -> None:
    if values.ndim != 2:
        raise ValueError(f"values.ndim must be one of [2], got {values.ndim!r}; pass [batch, unit]")
    if not values.is_floating_point():
        raise ValueError(
            f"values.dtype must be one of [float16, bfloat16, float32, float64], "
            f"got {values.dtype!r}; cast the activations to a float dtype"
        )
    if n_units is not None and values.shape[1] != n_units:
        raise ValueError(
            f"values.shape[1] must be one of [{n_units}], got {values.shape[1]!r}; "
            "pass every unit the statistics were created for"
        )


def finite_rows(values: Tensor) -> Tensor:
    """Bool ``[batch]``: rows (examples) whose values are all finite; the others are dropped."""
    return torch.isfinite(values).all(dim=1)


# ----------------------------------------------------------------------------- edges


def _sortable_key(x: Tensor) -> Tensor:
    """float32 -> int64 key with the same order, where adjacent floats differ by 1."""
    bits = (x + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_key(key: Tensor) -> Tensor:
    bits = torch.where(key < 0, (-key) | -0x80000000, key).to(torch.int32)
    return bits.view(torch.float32)


def _strictly_increasing(edges: Tensor) -> Tensor:
    """Nudge each edge up by the fewest float32 ulps that make the row strictly increasing."""
    fmax = _sortable_key(torch.tensor(torch.finfo(torch.float32).max))
    key = _sortable_key(
        edges.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
    )
    j = torch.arange(edges.shape[-1], device=edges.device)
    key = torch.cummax(key - j, dim=-1).values + j
    return _from_key(key.clamp(max=int(fmax)))


def _smooth_sorted(x: Tensor, m: Tensor, half: int) -> Tensor:
    """Moving average of sorted rows over ranks i-k..i+k, k = min(half, i, m-1-i).

    A kernel quantile estimate: a gap between two pilot values that is wide by chance is
    spread over its neighbours, so no bin inherits a whole chance gap (this halved the worst
    AP errors on heavy-tailed data); the ends stay exact, the rows stay sorted, and entries
    from ``m`` on (padding) are left unchanged. Summed window by window, not as differences
    of a cumulative sum, which cancels when values span many orders of magnitude.
    """
    n = x.shape[1]
    i = torch.arange(n, device=x.device)[None, :]
    k = torch.minimum(torch.minimum(i, m[:, None] - 1 - i), torch.full_like(i, half)).clamp(min=0)
    valid = i < m[:, None]
    acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for d in range(-half, half + 1):
        near = torch.gather(x, 1, (i + d).clamp(0, n - 1).expand_as(x)).double()
        acc += torch.where(k >= abs(d), near, 0.0)
    return torch.where(valid, (acc / (2 * k + 1)).float(), x)


def _atoms(s: Tensor, max_atoms: int, min_repeat: int) -> tuple[Tensor, Tensor, Tensor]:
    """The most repeated values of sorted rows ``s``: (values, is_atom ``[unit, k]``, member).

    ``member[u, i]``: ``s[u, i]`` equals one of the chosen atoms.
    """
    n_units, n = s.shape
    pos = torch.arange(n, device=s.device).expand(n_units, n)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.cummax(torch.where(first, pos, 0), dim=1).values
    end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos, n - 1), [1]), 1).values, [1])
    score = torch.where(first & (end - start + 1 >= min_repeat), end - start + 1, 0)
    top, top_pos = torch.topk(score, min(max_atoms, n), dim=1)
    is_atom = top > 0
    hit = torch.zeros_like(first).scatter_(1, top_pos, is_atom)
    return torch.gather(s, 1, top_pos), is_atom, torch.gather(hit, 1, start)


_END_DENSITY = 0.6
"""Quantile ranks are warped by x - a sin(2 pi x) / 2 pi: cut the AP error ~15% (p99, max)."""


def _quantile_edges(rest: Tensor, m: Tensor, count: Tensor, width: int) -> Tensor:
    """``count[u]`` interpolated quantiles of ``rest[u, :m[u]]`` (warped ranks), +inf padded."""
    n = rest.shape[1]
    i = torch.arange(width, device=rest.device, dtype=torch.float64).expand(rest.shape[0], width)
    x = i / (count - 1).clamp(min=1)[:, None]
    # Denser at both ends (bin mass 1 - _END_DENSITY of the mean there, more in the middle):
    # the top ranks weigh most in AP, and the pilot is sparsest near its extremes.
    x = (x - _END_DENSITY * torch.sin(2 * torch.pi * x) / (2 * torch.pi)).clamp(0, 1)
    r = x * (m - 1).clamp(min=0)[:, None]
    lo_i = r.floor().long().clamp(max=n - 1)
    hi_i = torch.minimum(lo_i + 1, (m - 1).clamp(min=0)[:, None])
    v_lo = torch.gather(rest, 1, lo_i).double()
    v = (v_lo + (r - lo_i) * (torch.gather(rest, 1, hi_i).double() - v_lo)).float()
    return torch.where((i < count[:, None]) & (m[:, None] > 0), v, torch.inf)


def _with_tails(core: Tensor, gap_lo: Tensor, gap_hi: Tensor, n_bins: int, n_tail: int) -> Tensor:
    """Add geometric tail edges around sorted, +inf padded ``core`` edges -> ``n_bins + 1``.

    A 10% pilot misses the heavy tails of the full data, so ``n_tail`` bins per side (plus
    the slots the core left unused) grow geometrically past the pilot's range. The first tail
    bin is as wide as the pilot's spacing at that end (``gap_*``, per rank: a mean over the
    whole range is far too wide for heavy tails), or the mean core bin where that spacing is
    undefined or ulp-sized (repeated values); never below ~64 float32 ulps of the end.
    """
    n_units, n_core = core.shape
    c = torch.isfinite(core).sum(1)
    ends = torch.gather(core, 1, torch.stack([torch.zeros_like(c), (c - 1).clamp(min=0)], 1))
    cmin, cmax = ends.double().unbind(1)
    tiny_lo = (cmin.abs() * 2.0**-17).clamp(min=2.0**-100)
    tiny_hi = (cmax.abs() * 2.0**-17).clamp(min=2.0**-100)
    scale = torch.maximum(cmax.abs(), cmin.abs())
    mean_w = (cmax - cmin) / c.clamp(min=1)
    fallback = torch.where(scale > 2.0**-100, scale, 1.0) * 2.0**-10  # e.g. an all-zero pilot
    fallback = torch.where(mean_w > torch.maximum(tiny_lo, tiny_hi), mean_w, fallback)
    w_lo = torch.where(gap_lo > tiny_lo, gap_lo, torch.maximum(fallback, tiny_lo))
    w_hi = torch.where(gap_hi > tiny_hi, gap_hi, torch.maximum(fallback, tiny_hi))
    t_lo = (n_tail + (n_core - c) // 2)[:, None]
    t_hi = n_bins + 1 - t_lo - c[:, None]
    j = torch.arange(n_bins + 1, device=core.device).expand(n_units, n_bins + 1)
    lower = cmin[:, None] - w_lo[:, None] * _geometric((t_lo - j).clamp(min=0), t_lo)
    k_hi = (j - t_lo - c[:, None] + 1).clamp(min=0)
    upper = cmax[:, None] + w_hi[:, None] * _geometric(k_hi, t_hi)
    mid = torch.gather(core, 1, (j - t_lo).clamp(min=0, max=n_core - 1)).double()
    return torch.where(j < t_lo, lower, torch.where(k_hi > 0, upper, mid)).float()


_TAIL_DOUBLINGS = 6
"""Each tail spans (2**6 - 1) / (r - 1) first-bin widths; with 16 tail bins r = 1.3. Tuned
with n_tail on the accuracy test: slow growth beats reach (a short pilot top is common)."""


def _geometric(k: Tensor, t: Tensor) -> Tensor:
    """Offset of tail edge ``k`` (of ``t`` per side) in first-bin widths: bins grow by
    ``r = 2**(_TAIL_DOUBLINGS / t)``, so the last edge is ``(2**6 - 1) / (r - 1)`` widths out:
    finite, and spare bins (few distinct pilot values) grow more slowly rather than further.
    """
    log_r = (_TAIL_DOUBLINGS * np.log(2.0)) / t.clamp(min=1).double()
    return torch.expm1(k.double() * log_r) / torch.expm1(log_r)


def _edges_chunk(
    pilot: Tensor, n_bins: int, n_tail: int, max_atoms: int, min_repeat: int, smooth: int
) -> Tensor:
    """Edges for ``pilot: [unit, example]`` (finite float32); see :func:`choose_edges`."""
    n = pilot.shape[1]
    n_core = n_bins + 1 - 2 * n_tail
    s = torch.sort(pilot + 0.0, dim=1).values  # + 0.0: -0.0 and 0.0 are one value
    atom_v, is_atom, member = _atoms(s, max_atoms, min_repeat)
    inf = torch.full_like(atom_v, torch.inf)
    nudged = torch.nextafter(atom_v, inf)
    atom_edges = torch.cat(
        [torch.where(is_atom, atom_v, inf), torch.where(is_atom, nudged, inf)], 1
    )
    rest = torch.sort(torch.where(member, torch.inf, s), dim=1).values
    m = n - member.sum(1)
    k = (m - 1).clamp(min=0, max=4)[:, None]  # pilot spacing per rank at both ends
    ends = torch.gather(
        rest,
        1,
        torch.cat([torch.zeros_like(k), k, m[:, None] - 1 - k, m[:, None] - 1], 1).clamp(min=0),
    ).double()
    gap_lo = (ends[:, 1] - ends[:, 0]) / k[:, 0].clamp(min=1)
    gap_hi = (ends[:, 3] - ends[:, 2]) / k[:, 0].clamp(min=1)
    rest = _smooth_sorted(rest, m, smooth) if smooth else rest
    # Beyond each end of the pilot lies about one pilot gap's worth of data: with few
    # distinct pilot values (sparse ReLU units) that is a large share, so the tails get
    # ~1/(m+2) of the slots each, the quantiles the rest (at least every pilot gap halved).
    free = n_core - 2 * is_atom.sum(1)
    count = torch.minimum(free, torch.maximum(2 * m - 1, free * m // (m + 2))).clamp(min=0)
    quant = _quantile_edges(rest, m, count, n_core)
    # Union, dedupe, compact: the distinct core edges first, +inf after.
    core = torch.sort(torch.cat([atom_edges, quant], dim=1), dim=1).values
    dup = torch.zeros_like(core, dtype=torch.bool)
    dup[:, 1:] = core[:, 1:] == core[:, :-1]
    core = torch.sort(torch.where(dup, torch.inf, core), dim=1).values[:, :n_core]
    return _strictly_increasing(_with_tails(core, gap_lo, gap_hi, n_bins, n_tail))


def _edge_options(
    n_bins: int, n_tail: int | None, max_atoms: int | None, min_repeat: int, smooth: int
) -> tuple[int, int]:
    """``(n_tail, max_atoms)`` with defaults filled in, after checking every option.

    Raises:
        ValueError: an option out of its range (one line naming it).
    """
    if n_bins < 8:
        raise ValueError(f"n_bins must be one of [>= 8], got {n_bins!r}; use 256 (default)")
    n_tail = max(1, n_bins // 16) if n_tail is None else n_tail
    max_atoms = n_bins // 4 if max_atoms is None else max_atoms
    if not 1 <= n_tail <= n_bins // 4:
        raise ValueError(f"n_tail must be one of [1..{n_bins // 4}], got {n_tail!r}; use default")
    if not 0 <= max_atoms <= n_bins // 4:
        raise ValueError(f"max_atoms must be one of [0..{n_bins // 4}], got {max_atoms!r}")
    if min_repeat < 2 or smooth < 0:
        raise ValueError(
            f"min_repeat, smooth must be one of [>= 2, >= 0], got {min_repeat!r}, {smooth!r}"
        )
    return n_tail, max_atoms


def choose_edges(
    pilot: Tensor,
    n_bins: int = 256,
    *,
    n_tail: int | None = None,
    max_atoms: int | None = None,
    min_repeat: int = 2,
    smooth: int = 4,
) -> Tensor:
    """Per-unit histogram edges ``[unit, n_bins + 1]`` (float32) from a pilot ``[example, unit]``.

    Why this shape of bins: the AP error comes only from positive/negative pairs that share a
    bin, so bins should hold equal numbers of *distinct* values and a repeated value should own
    its bin. Hence (per unit, vectorised):
      1. up to ``max_atoms`` values repeated in the pilot (ReLU zeros, saturation, ties) get a
         single-value bin ``[v, nextafter(v))``, where ties are exact and bounds collapse;
      2. the other edges are quantiles (linear interpolation) of the other pilot values,
         after a moving average over ``2 * smooth + 1`` ranks (a kernel quantile estimate:
         with ~1 pilot value per bin, a gap that is wide by chance would otherwise become one
         crowded bin), at ranks spaced 2.5x closer than average at both ends (the top
         ranks weigh most in AP and the pilot is sparsest at its extremes);
      3. ``n_tail`` bins on each side grow geometrically beyond the pilot's range (the pilot
         misses heavy tails, and its extremes often fall short); with few distinct pilot
         values (sparse ReLU units) the tails get more bins, as more data lies beyond;
      4. edges are nudged up by float32 ulps until strictly increasing, so every bin is
         well defined. Values below the first edge or at/above the last go to the underflow
         and overflow bins.
    Pilot rows (examples) with any NaN/Inf are ignored, as :meth:`UnitStats.update` drops them.
    Defaults were tuned on heavy-tailed, zero-inflated, fp16/bf16-tied synthetic data with a 10%
    pilot (tests/test_stats_accuracy.py).

    Args:
        pilot: ``[example, unit]`` values, ideally a random sample of all languages of the
            (task, modality, step) the edges will be shared by.
        n_bins: bins between the first and last edge.
        n_tail: geometric tail bins per side; default ``max(1, n_bins // 16)``.
        max_atoms: most single-value bins; default ``n_bins // 4``.
        min_repeat: pilot multiplicity that makes a value an atom.
        smooth: half-width (in ranks) of the moving average; 0 for raw quantiles.
    """
    _check_values(pilot)
    n_tail, max_atoms = _edge_options(n_bins, n_tail, max_atoms, min_repeat, smooth)
    rows = pilot[finite_rows(pilot)].to(torch.float32)
    if rows.shape[0] == 0:
        raise ValueError("pilot must have one of [>= 1 finite rows], got 0; pass a larger pilot")
    out = torch.empty(pilot.shape[1], n_bins + 1, dtype=torch.float32, device=pilot.device)
    for sl in _unit_chunks(pilot.shape[1], 4 * (rows.shape[0] + n_bins)):
        out[sl] = _edges_chunk(
            rows[:, sl].T.contiguous(), n_bins, n_tail, max_atoms, min_repeat, smooth
        )
    return out


# ----------------------------------------------------------------------------- UnitStats


@dataclass
class UnitStats:
    """Running statistics of one condition and step, per unit; merge in any order.

    ``update`` changes the object in place; ``merge`` returns a new object and leaves both
    inputs untouched (so a reducer can merge shards without aliasing).
    """

    edges: Tensor  # [unit, edge] float32, edge = n_bins + 1, shared by the languages
    count: Tensor  # [] int64: examples merged
    dropped: Tensor  # [] int64: examples refused because of NaN/Inf
    mean: Tensor  # [unit] float64
    m2: Tensor  # [unit] float64: sum of squared deviations from the mean
    min: Tensor  # [unit] float64 (+inf while empty)
    max: Tensor  # [unit] float64 (-inf while empty)
    hist: Tensor  # [unit, bin] int, bin = n_bins + 2: underflow, n_bins bins, overflow

    @classmethod
    def empty(
        cls, edges: Tensor, device: torch.device | str | None = None, hist_dtype=torch.int32
    ) -> UnitStats:
        """No examples yet. int32 histograms count to 2**31 and halve the memory of int64."""
        if edges.ndim != 2 or edges.shape[1] < 2:
            raise ValueError(f"edges.shape must be one of [[unit, n_bins+1]], got {edges.shape!r}")
        if hist_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"hist_dtype must be one of [int32, int64], got {hist_dtype!r}")
        edges = edges.to(device=device, dtype=torch.float32)
        n_units, dev = edges.shape[0], edges.device
        f64 = {"dtype": torch.float64, "device": dev}
        return cls(
            edges=edges,
            count=torch.zeros((), dtype=torch.int64, device=dev),
            dropped=torch.zeros((), dtype=torch.int64, device=dev),
            mean=torch.zeros(n_units, **f64),
            m2=torch.zeros(n_units, **f64),
            min=torch.full((n_units,), float("inf"), **f64),
            max=torch.full((n_units,), float("-inf"), **f64),
            hist=torch.zeros(n_units, edges.shape[1] + 1, dtype=hist_dtype, device=dev),
        )

    @property
    def n_units(self) -> int:
        return self.edges.shape[0]

    @property
    def n(self) -> int:
        """Examples merged, as a Python int (synchronises with the device)."""
        return int(self.count)

    @property
    def var(self) -> Tensor:
        """Population variance ``m2 / count`` (NaN while empty)."""
        return self.m2 / self.count.to(torch.float64)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def update(self, values: Tensor, kernel: str = "auto") -> Tensor:
        """Merge a batch ``[batch, unit]``; returns how many of its rows were dropped (0-d).

        ``kernel``: ``"numba"`` (one pass over the values, CPU only, ~5x faster there; see
        :mod:`crossmodal.stats.kernel`), ``"torch"`` (any device), or ``"auto"``: numba for CPU tensors
        where it is installed, torch otherwise. Both give the same counts, histograms, min and
        max, and moments equal up to float64 rounding.
        """
        _check_values(values, self.n_units)
        if kernel not in ("auto", "numba", "torch"):
            raise ValueError(f"kernel must be one of [auto, numba, torch], got {kernel!r}")
        values = values.to(self.edges.device)
        if values.shape[0] == 0:
            return torch.zeros((), dtype=torch.int64, device=values.device)
        if kernel == "numba" and not self._numba_ready():
            raise ValueError(
                "kernel must be one of [auto, torch] here, got 'numba'; it needs numba "
                "installed and every tensor on CPU and contiguous"
            )
        if kernel == "numba" or (kernel == "auto" and self._numba_ready()):
            return self._update_numba(values)
        return self._update_torch(values)

    def _numba_ready(self) -> bool:
        tensors = [getattr(self, f.name) for f in fields(self)]
        return fold.AVAILABLE and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)

    def _update_numba(self, values: Tensor) -> Tensor:
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float32)  # exact for fp16 / bf16
        x = values.detach().contiguous().numpy()
        rows = np.flatnonzero(fold.finite_rows(x))
        padded, pivots = self._fold_layout()
        fold.fold(
            np.ascontiguousarray(x.T),
            rows,
            padded,
            pivots,
            self.hist.numpy(),
            self.mean.numpy(),
            self.m2.numpy(),
            self.min.numpy(),
            self.max.numpy(),
            float(self.count),
        )
        self.count += len(rows)
        dropped = torch.tensor(x.shape[0] - len(rows))
        self.dropped += dropped
        return dropped

    def _fold_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's copy of the edges (:func:`crossmodal.stats.kernel.layout`), built on first use
        and kept while ``edges`` is the same tensor (edges are never changed in place)."""
        cached = self.__dict__.get("_layout")
        if cached is None or cached[0] is not self.edges:
            cached = (self.edges, *fold.layout(self.edges.numpy()))
            self.__dict__["_layout"] = cached
        return cached[1], cached[2]

    def _update_torch(self, values: Tensor) -> Tensor:
        keep = finite_rows(values)
        n_b = keep.sum()
        n_a = self.count
        n_ab = (n_a + n_b).to(torch.float64)
        inv_b = 1.0 / n_b.clamp(min=1).to(torch.float64)
        w_a = n_a.to(torch.float64) * n_b.to(torch.float64) / n_ab.clamp(min=1)
        frac_b = n_b.to(torch.float64) / n_ab.clamp(min=1)
        ones = keep.to(self.hist.dtype)
        n_k = self.hist.shape[1]
        for sl in _unit_chunks(self.n_units, values.shape[0]):
            x = torch.where(keep[:, None], values[:, sl].to(torch.float64), 0.0)
            mean_b = x.sum(0) * inv_b
            dev = torch.where(keep[:, None], x - mean_b, 0.0)
            delta = mean_b - self.mean[sl]
            self.mean[sl] += delta * frac_b
            self.m2[sl] += (dev * dev).sum(0) + delta * delta * w_a
            big = torch.where(keep[:, None], x, torch.inf)
            torch.minimum(self.min[sl], big.amin(0), out=self.min[sl])
            small = torch.where(keep[:, None], x, -torch.inf)
            torch.maximum(self.max[sl], small.amax(0), out=self.max[sl])
            v32 = values[:, sl].to(torch.float32).T.contiguous()  # [unit, batch]
            idx = torch.searchsorted(self.edges[sl].contiguous(), v32, right=True)
            idx += torch.arange(idx.shape[0], device=idx.device)[:, None] * n_k
            src = ones[None, :].expand_as(idx).reshape(-1)
            self.hist[sl].view(-1).scatter_add_(0, idx.view(-1), src)
        self.count += n_b
        dropped = values.shape[0] - n_b
        self.dropped += dropped
        return dropped

    def merge(self, other: UnitStats) -> UnitStats:
        """Chan et al. merge of two disjoint sets of examples; a new object, inputs untouched."""
        if self.edges.shape != other.edges.shape or not torch.equal(self.edges, other.edges):
            raise ValueError(
                "edges must be one of [identical], got different edges; choose edges once per "
                "(task, modality, step) and share them across languages and replicas"
            )
        n_a, n_b = self.count.to(torch.float64), other.count.to(torch.float64)
        n = (n_a + n_b).clamp(min=1)
        delta = other.mean - self.mean
        return UnitStats(
            edges=self.edges,
            count=self.count + other.count,
            dropped=self.dropped + other.dropped,
            mean=self.mean + delta * (n_b / n),
            m2=self.m2 + other.m2 + delta * delta * (n_a * n_b / n),
            min=torch.minimum(self.min, other.min),
            max=torch.maximum(self.max, other.max),
            hist=self.hist + other.hist.to(self.hist.dtype),
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Arrays for storage (host copies), keyed by field name; see :meth:`from_numpy`."""
        return _to_numpy(self)

    @classmethod
    def from_numpy(
        cls, arrays: Mapping[str, np.ndarray], device: torch.device | str | None = None
    ) -> UnitStats:
        """Inverse of :meth:`to_numpy`; copies, so read-only (Ray) arrays are fine."""
        return _from_numpy(cls, arrays, device)


def merge_all(stats: Sequence[UnitStats]) -> UnitStats:
    """Merge several statistics (any order gives the same counts, histograms and moments)."""
    if not stats:
        raise ValueError("stats must be one of [non-empty sequence], got []; pass >= 1 UnitStats")
    out = stats[0]
    for s in stats[1:]:
        out = out.merge(s)
    return out


# ----------------------------------------------------------------------------- ExactValues


@dataclass
class ExactValues:
    """Per-example values of a chosen subset of units, mergeable by concatenation.

    For small runs, for validating histograms, and for the units whose top-k selection must be
    exact. Rows with any NaN/Inf over *all* units are dropped, as in :class:`UnitStats`, so both
    describe the same examples. ``update`` appends in place; ``merge`` returns a new object.
    Memory grows with the examples: that is the point of this mode.
    """

    units: Tensor  # [sel] int64 indices into the unit axis
    values: Tensor  # [example, sel], float32 by default (as the histograms see the values)
    dropped: Tensor  # [] int64: examples refused because of NaN/Inf

    @classmethod
    def empty(
        cls,
        n_units: int,
        units: Tensor | Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ExactValues:
        """Keep ``units`` (default: all ``n_units``) of every later batch."""
        sel = torch.arange(n_units) if units is None else torch.as_tensor(units, dtype=torch.int64)
        if sel.ndim != 1 or (sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n_units)):
            raise ValueError(
                f"units must be one of [1-d indices in 0..{n_units - 1}], got {sel.tolist()!r}"
            )
        sel = sel.to(device)
        return cls(
            units=sel,
            values=torch.empty(0, sel.numel(), dtype=dtype, device=sel.device),
            dropped=torch.zeros((), dtype=torch.int64, device=sel.device),
        )

    @property
    def n(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def update(self, values: Tensor) -> Tensor:
        """Append a batch ``[batch, unit]`` (all units); returns the rows dropped (0-d)."""
        _check_values(values)
        values = values.to(self.units.device)
        keep = finite_rows(values)
        kept = values[keep][:, self.units].to(self.values.dtype)
        self.values = torch.cat([self.values, kept], dim=0)
        dropped = values.shape[0] - keep.sum()
        self.dropped += dropped
        return dropped

    def merge(self, other: ExactValues) -> ExactValues:
        """Concatenate the examples of both; a new object, inputs untouched."""
        if not torch.equal(self.units, other.units):
            raise ValueError("units must be one of [identical], got different unit subsets")
        return ExactValues(
            units=self.units,
            values=torch.cat([self.values, other.values.to(self.values.dtype)], dim=0),
            dropped=self.dropped + other.dropped,
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        return _to_numpy(self)

    @classmethod
    def from_numpy(
        cls, arrays: Mapping[str, np.ndarray], device: torch.device | str | None = None
    ) -> ExactValues:
        return _from_numpy(cls, arrays, device)


def _to_numpy(obj: UnitStats | ExactValues) -> dict[str, np.ndarray]:
    return {f.name: getattr(obj, f.name).detach().cpu().numpy() for f in fields(obj)}


def _from_numpy(cls, arrays: Mapping[str, np.ndarray], device):
    names = [f.name for f in fields(cls)]
    missing = [k for k in names if k not in arrays]
    if missing:
        raise ValueError(
            f"arrays must be one of [{cls.__name__}.to_numpy() output], missing {missing!r}"
        )
    return cls(**{k: torch.as_tensor(np.array(arrays[k]), device=device) for k in names})
