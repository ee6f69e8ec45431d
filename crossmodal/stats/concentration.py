"""Activation concentration: per-example Gini of |activation| over a layer's units, merged.

The v1 analysis of concentration (docs/method.md, "v1 analyses"; the paper's measure is not
public) takes, per example, the Gini coefficient of |activation| over the units of one
decoder layer, and accumulates it per condition as mergeable sums. Which units: the ``ffn_act``
family (post-ReLU FFN neurons, the classic "neuron") when it is collected, else the
``decoder`` family's units grouped by layer (every Linear/LayerNorm output of the layer; the
final ``text_decoder.layer_norm`` lies outside the layers and is left out). One family only,
so the collector pays one batched sort per (step, pooling) and batch: every layer's units are
gathered into ``[batch, layer, unit]`` and sorted at once on the device, with no host copy.

What is kept: per (condition, step, pooling, layer) ``count``, ``dropped`` (example rows with
NaN/Inf in the layer, as :mod:`crossmodal.stats.running` drops them), and the float64 ``mean`` and
``m2`` of the per-example Gini, merged as :mod:`crossmodal.stats.running` merges moments (Chan et
al. 1979: any order, exact up to rounding). They are tiny and give the mean and sample std.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

FAMILIES = ("ffn_act", "decoder")
"""Families concentration can use, in order of preference (module docstring)."""


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of ``|values|`` over units, per example: ``[batch, unit] -> [batch]``.

    G = sum_ij |x_i - x_j| / (2 n^2 mean(x)), computed from sorted values as
    sum_i (2i - n - 1) x_(i) / (n sum x) in float64. 0 = equal magnitudes, (n-1)/n = one
    unit carries everything; an all-zero row gives 0 (no concentration to measure).
    """
    if values.ndim != 2:
        raise ValueError(f"values.ndim must be one of [2], got {values.ndim!r}; pass [batch, unit]")
    x = torch.sort(values.abs().to(torch.float64), dim=-1).values
    n = x.shape[-1]
    weight = 2.0 * torch.arange(1, n + 1, device=x.device, dtype=x.dtype) - n - 1
    total = x.sum(-1)
    g = (x * weight).sum(-1) / (n * total).clamp(min=torch.finfo(x.dtype).tiny)
    return torch.where(total > 0, g, torch.zeros_like(g))


def gini_by_group(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-example Gini within each unit group (layer): ``[batch, unit] -> [batch, n_groups]``.

    ``groups[unit]`` in ``0..n_groups-1``; a group without units gives NaN. Feed the result
    to a running (count, mean, M2) per group and condition to aggregate it mergeably.
    """
    if groups.shape != (values.shape[-1],):
        raise ValueError(
            f"groups.shape must be one of [({values.shape[-1]},)], got {tuple(groups.shape)!r}"
        )
    out = torch.full(
        (values.shape[0], n_groups), float("nan"), dtype=torch.float64, device=values.device
    )
    groups = groups.to(values.device)
    for g in range(n_groups):
        cols = torch.nonzero(groups == g).flatten()
        if cols.numel():
            out[:, g] = gini(values[:, cols])
    return out


def concentration_family(families: Iterable[str]) -> str | None:
    """The family whose layers concentration is measured on, or None (no decoder family)."""
    have = set(families)
    return next((f for f in FAMILIES if f in have), None)


def layer_groups(unit_layer: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Layers (>= 0) of a family's ``unit_layer`` coordinate and each layer's unit columns."""
    unit_layer = np.asarray(unit_layer)
    layers = np.unique(unit_layer[unit_layer >= 0])
    return layers, [np.flatnonzero(unit_layer == layer) for layer in layers]


class LayerGini:
    """``values [batch, unit] -> [batch, layer]`` float64: each row's Gini within each layer.

    Columns are resolved once here; equal-size layers (every Seamless family) are gathered
    into ``[batch, layer, unit]`` and sorted in one call. A row with NaN/Inf in a layer gets
    NaN there (:func:`gini` alone would call it 0).
    """

    def __init__(self, unit_layer: np.ndarray, device: torch.device | str = "cpu") -> None:
        self.layers, cols = layer_groups(unit_layer)
        if not cols:
            raise ValueError("unit_layer must be one of [>= 1 unit with layer >= 0], got none")
        dev = torch.device(device)
        self.n_units = np.asarray([c.size for c in cols], dtype=np.int64)
        self._cols = [torch.as_tensor(c, device=dev) for c in cols]
        same = len(set(self.n_units.tolist())) == 1
        self._index = torch.as_tensor(np.stack(cols), device=dev) if same else None

    def __call__(self, values: Tensor) -> Tensor:
        if values.ndim != 2:
            raise ValueError(f"values.ndim must be one of [2], got {values.ndim!r}")
        groups = (
            [values[:, self._index]]  # [batch, layer, unit]
            if self._index is not None
            else [values[:, c][:, None, :] for c in self._cols]
        )
        out = []
        for x in groups:
            b, n_layer, n = x.shape
            g = gini(x.reshape(b * n_layer, n)).reshape(b, n_layer)
            out.append(torch.where(torch.isfinite(x).all(-1), g, float("nan")))
        return torch.cat(out, dim=1)


@dataclass
class GiniStats:
    """Running count, mean and M2 of per-example Gini per layer; merge in any order (Chan).

    Mean/M2 rather than sum/sum of squares: the Gini of one layer varies little between
    examples (std ~1e-4 of the mean on the tiny model), where sums of squares cancel.
    """

    count: Tensor  # [layer] int64
    dropped: Tensor  # [layer] int64, rows with NaN/Inf in the layer
    mean: Tensor  # [layer] float64
    m2: Tensor  # [layer] float64, sum of squared deviations from the mean

    @classmethod
    def empty(cls, n_layers: int, device: torch.device | str = "cpu") -> GiniStats:
        i = torch.zeros(n_layers, dtype=torch.int64, device=device)
        f = torch.zeros(n_layers, dtype=torch.float64, device=device)
        return cls(i, i.clone(), f, f.clone())

    def update(self, g: Tensor) -> None:
        """Merge ``g [batch, layer]`` (NaN = dropped) in place; no device sync."""
        if g.ndim != 2 or g.shape[1] != self.count.shape[0]:
            raise ValueError(
                f"g.shape must be one of [(batch, {self.count.shape[0]})], got {tuple(g.shape)!r}"
            )
        ok = torch.isfinite(g)
        x = torch.where(ok, g.to(torch.float64), 0.0)
        n = ok.sum(0)
        mean = x.sum(0) / n.clamp(min=1)
        m2 = torch.where(ok, (x - mean) ** 2, 0.0).sum(0)
        merged = self.merge(GiniStats(n, (~ok).sum(0), mean, m2))
        self.count, self.dropped, self.mean, self.m2 = (
            merged.count,
            merged.dropped,
            merged.mean,
            merged.m2,
        )

    def merge(self, other: GiniStats) -> GiniStats:
        """Chan et al. (1979) pairwise merge; a side with count 0 contributes nothing."""
        n = self.count + other.count
        na, nb = self.count.to(torch.float64), other.count.to(torch.float64)
        w = torch.where(n > 0, nb / n.clamp(min=1), 0.0)
        delta = other.mean - self.mean
        return GiniStats(
            n,
            self.dropped + other.dropped,
            self.mean + delta * w,
            self.m2 + other.m2 + delta * delta * na * w,
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)}

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, np.ndarray]) -> GiniStats:
        return cls(*(torch.as_tensor(np.asarray(arrays[f.name])) for f in fields(cls)))


def mean_std(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean and sample std (ddof 1); NaN where there are too few examples."""
    n = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(n > 1, np.asarray(m2) / (n - 1), np.nan))
    return np.where(n > 0, mean, np.nan), std
