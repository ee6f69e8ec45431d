"""Forcing hooks: set chosen features of chosen modules to constants, row by row, during generation.

A unit is (module path, output feature). Forcing it replaces that feature of the module's
output with a constant, at every position and at every call of the module, so at every
decoding step of ``generate`` (docs/method.md, "Interventions"). Different rows of one batch
carry different interventions, so many steering-grid cells share one ``generate`` call.
Which units a grid cell forces, and with which constants, is :mod:`crossmodal.steer.units`.

Invariants (what the tests pin):
- :func:`plan_batch` builds, once per batch, per hooked module ``[batch, width]`` mask and
  value tensors over the module's whole output width.
- The hook rewrites ``out[b, ..., f]`` only where ``mask[b, f]`` is set: a row without
  forcing gets back exactly the values it would have had (bit-identical), and no row ever
  sees another row's forcing.
- Cross-attention ``k_proj``/``v_proj`` run once over the encoder frames and their result is
  cached: forcing that call forces every later step too (docs/method.md, "Interventions").
- ``ffn.fc1`` units are forced before the ReLU (the reference's units); ``ffn.act`` units are
  the post-ReLU activations. Conv1d and GLU outputs (encoder units) carry features on dim 1.
- Hooks exist only inside :func:`forcing`, which removes them in ``finally``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from torch import nn
from transformers import SeamlessM4Tv2Model

from crossmodal.model.capture import padding_guard
from crossmodal.model.fastgen import encode, greedy_generate
from crossmodal.model.load import LoadedModel
from crossmodal.model.units import declared_width

Intervention = Mapping[str, tuple[Sequence[int], Sequence[float]]]
"""One row's forcing: module path -> (feature indices, constant values), same lengths (lists
or 1-d arrays)."""

NO_FORCING: Intervention = {}
"""The unforced row (the grid's baseline)."""


class SteeringError(ValueError):
    """An intervention that cannot be applied (one line: value, allowed, fix)."""


@dataclass(frozen=True)
class SitePlan:
    """The forcing of one hooked module for a whole batch, over the module's full width.

    Full width, so that the hook is one ``torch.where`` per call (no gather and scatter of
    the forced columns at every decoding step; docs/benchmarks.md, "Steering").

    Attributes:
        mask: ``[batch, width]`` True where that row forces that feature.
        values: ``[batch, width]`` the constants (0 where ``mask`` is False).
        feature_dim: the output dim that indexes features (-1, or 1 for Conv1d/GLU).
        max_col: the largest forced feature (checked against the output without a sync).
    """

    mask: torch.Tensor
    values: torch.Tensor
    feature_dim: int
    max_col: int
    _fitted: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def cols(self) -> torch.Tensor:
        """``[n_cols]`` features forced in at least one row (sorted)."""
        return self.mask.any(dim=0).nonzero().flatten()

    def fitted(self, out: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, values)`` shaped to broadcast against ``out`` (features on ``dim``), in
        ``out``'s dtype and width; built on the first call of a shape, then reused."""
        key = (out.ndim, dim, out.shape[dim], out.dtype, out.device)
        if key not in self._fitted:
            mask, values = self.mask, self.values
            if out.shape[dim] > mask.shape[1]:  # a module without a declared width
                pad = (0, out.shape[dim] - mask.shape[1])
                mask, values = nn.functional.pad(mask, pad), nn.functional.pad(values, pad)
            shape = [1] * out.ndim
            shape[0], shape[dim] = mask.shape
            self._fitted[key] = (
                mask.to(out.device).view(shape),
                values.to(device=out.device, dtype=out.dtype).view(shape),
            )
        return self._fitted[key]


@dataclass(frozen=True)
class BatchPlan:
    """Per-site plans for one batch of ``batch_size`` rows."""

    batch_size: int
    sites: Mapping[str, SitePlan]


def _feature_dim(module: nn.Module) -> int:
    """Conv1d outputs are [batch, channels, time]; GLU keeps the dim it halves."""
    if isinstance(module, nn.Conv1d):
        return 1
    if isinstance(module, nn.GLU) and module.dim in (1, -2):
        return 1
    return -1


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=2, cutoff=0.6)
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
        raise SteeringError(
            f"site must be a module path of the model (e.g. 'text_decoder.layers.0.ffn.fc1'), "
            f"got {path!r}; {hint or 'list them with model.named_modules()'}"
        ) from None


def plan_batch(
    model: nn.Module,
    interventions: Sequence[Intervention],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BatchPlan:
    """Build the per-site ``[batch, width]`` masks and values for one batch.

    Every site's mask and values are laid out side by side in one host array each and moved
    to ``device`` in one copy (two transfers per batch, not two per site).

    Args:
        model: the module whose submodules are named by the interventions' paths.
        interventions: one per row (``NO_FORCING`` for an unforced row).
        device, dtype: where the plan lives; default: the model's first parameter.

    Raises:
        SteeringError: unknown module path, mismatched lengths, feature out of range.
    """
    first = next(model.parameters())
    device = torch.device(device) if device is not None else first.device
    dtype = dtype or first.dtype
    batch = len(interventions)
    laid = []
    for path, (rows, features, values) in _site_triples(interventions).items():
        module = _resolve(model, path)  # an unknown path fails even when it forces nothing
        if len(features) == 0:
            continue
        width = _checked_width(module, path, features)
        laid.append((path, _feature_dim(module), width, rows, features, values))
    offsets = np.cumsum([0] + [site[2] for site in laid])
    mask = np.zeros((batch, int(offsets[-1])), dtype=bool)
    table = np.zeros((batch, int(offsets[-1])), dtype=np.float32)
    for (_, _, _, rows, features, values), off in zip(laid, offsets, strict=False):
        mask[rows, off + features] = True
        table[rows, off + features] = values  # a feature repeated in a row: its last value wins
    mask_t = torch.from_numpy(mask).to(device)
    table_t = torch.from_numpy(table).to(device=device, dtype=dtype)
    sites = {
        path: SitePlan(
            mask=mask_t[:, off : off + width],
            values=table_t[:, off : off + width],
            feature_dim=dim,
            max_col=int(features.max()),
        )
        for (path, dim, width, _, features, _), off in zip(laid, offsets, strict=False)
    }
    return BatchPlan(batch_size=batch, sites=sites)


def _site_triples(
    interventions: Sequence[Intervention],
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per site: (row, feature, value) of every row's forcing, as three flat arrays.

    One array conversion per site, not per (row, site): a grid batch holds ~10^5 forced
    features in ~10^3 (row, site) pairs.
    """
    per_site: dict[str, tuple[list[int], list, list]] = {}
    for row, intervention in enumerate(interventions):
        for path, (features, values) in intervention.items():
            if len(features) != len(values):
                raise SteeringError(
                    f"values must match features in length for site {path!r} (row {row}), got "
                    f"{len(values)} values for {len(features)} features; pass one value per feature"
                )
            rows, feats, vals = per_site.setdefault(path, ([], [], []))
            rows.append(row), feats.append(features), vals.append(values)
    return {
        path: (
            np.repeat(np.asarray(rows, dtype=np.int64), [len(f) for f in feats]),
            _flat(feats, np.int64),
            _flat(vals, np.float64),
        )
        for path, (rows, feats, vals) in per_site.items()
    }


def _flat(parts: list, dtype: type) -> np.ndarray:
    """The parts (lists or arrays) end to end, as one flat array of ``dtype``."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False)
    return np.fromiter(chain.from_iterable(parts), dtype=dtype, count=sum(map(len, parts)))


def _checked_width(module: nn.Module, path: str, features: np.ndarray) -> int:
    """The plan's width for ``module``: its declared width, else the largest feature + 1 (the
    hook pads to the output's width); raises for a feature outside the declared width."""
    width = declared_width(module)
    low, high = int(features.min()), int(features.max())
    if low < 0 or (width is not None and high >= width):
        raise SteeringError(
            f"feature of site {path!r} must be in [0, {width}), got {low if low < 0 else high}; "
            "check the unit index table against this model"
        )
    return high + 1 if width is None else width


def _apply(plan: SitePlan, batch: int, path: str, out: torch.Tensor) -> torch.Tensor:
    """``out`` with the planned features replaced row by row (out of place, one op)."""
    if out.shape[0] != batch:
        raise SteeringError(
            f"batch size at site {path!r} must be {batch} (the planned rows), got "
            f"{out.shape[0]}; plan one intervention per row of the generate call"
        )
    dim = plan.feature_dim % out.ndim
    if plan.max_col >= out.shape[dim]:
        raise SteeringError(
            f"feature of site {path!r} must be < {out.shape[dim]}, got {plan.max_col}; "
            "check the unit index table against this model"
        )
    mask, values = plan.fitted(out, dim)
    return torch.where(mask, values, out)


def _hook(plan: SitePlan, batch: int, path: str):  # noqa: ANN202 - a torch forward hook
    def hook(module: nn.Module, args: tuple, out: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(out, tuple):
            return (_apply(plan, batch, path, out[0]), *out[1:])
        return _apply(plan, batch, path, out)

    return hook


@contextmanager
def forcing(model: nn.Module, plan: BatchPlan) -> Iterator[BatchPlan]:
    """Hook every planned site for the duration of the block; hooks go in ``finally``.

    Example::

        plan = plan_batch(model, [NO_FORCING, {"text_decoder.layers.0.ffn.fc1": ([3], [2.5])}])
        with forcing(model, plan):
            out = model.generate(...)  # row 0 unforced, row 1 forced
    """
    handles = []
    try:
        for path, site in plan.sites.items():
            module = _resolve(model, path)
            handles.append(module.register_forward_hook(_hook(site, plan.batch_size, path)))
        yield plan
    finally:
        for handle in handles:
            handle.remove()


def _unwrap(loaded_or_model: LoadedModel | nn.Module) -> nn.Module:
    return loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model


def _is_decoder_only(plan: BatchPlan, decoder: str = "text_decoder.") -> bool:
    return all(path.startswith(decoder) for path in plan.sites)


def generate_forced(
    loaded_or_model: LoadedModel | SeamlessM4Tv2Model,
    batch: Mapping[str, torch.Tensor],
    tgt_lang: str | Sequence[str],
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int,
    rows: Sequence[int] | None = None,
    speech_frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy text generation with one intervention (and target language) per row.

    Args:
        loaded_or_model: a ``SeamlessM4Tv2Model`` (or :class:`LoadedModel`) in eval mode.
        batch: ``input_ids`` or ``input_features``, plus ``attention_mask``: the distinct inputs.
        tgt_lang: output language code, or one per row.
        interventions: one per generated row.
        max_new_tokens: decoding budget (reference: 128).
        rows: which input of ``batch`` each generated row reads (default: row i reads input
            i). With only decoder sites forced, each distinct input is encoded once and its
            encoder output shared by its rows (many grid cells x one input).
        speech_frames: ``ModelBatch.speech_frames`` of a ``speech_last_frame="keep"`` batch
            (each input's lone-run width, see :func:`crossmodal.model.inputs.padding_guard`).

    Returns:
        ``[rows, 2 + n_generated]`` sequences ``[</s>, lang_tag, tok1, ...]``, 0-padded
        after EOS: what ``model.generate`` (greedy, text only) returns.
    """
    model = _unwrap(loaded_or_model)
    n_inputs = next(iter(batch.values())).shape[0]
    index = list(range(n_inputs)) if rows is None else [int(r) for r in rows]
    if len(index) != len(interventions) or (index and not 0 <= min(index) <= max(index) < n_inputs):
        raise SteeringError(
            f"rows must name one input in [0, {n_inputs}) per intervention "
            f"({len(interventions)}), got {len(index)} rows; pass rows=None or one index per row"
        )
    plan = plan_batch(model, interventions)
    take = torch.tensor(index, dtype=torch.long)
    speech = batch.get("input_features") is not None
    guard = padding_guard if speech and batch.get("attention_mask") is not None else _no_guard
    with forcing(model, plan), torch.inference_mode():
        if _is_decoder_only(plan):
            with guard(model, batch.get("attention_mask"), speech_frames):
                hidden, mask = encode(model, batch)
            dev = hidden.device
            take = take.to(dev)
            shared = (
                hidden.index_select(0, take),
                None if mask is None else mask.index_select(0, take),
            )
            out = greedy_generate(model, {}, tgt_lang, max_new_tokens, encoder_outputs=shared)
        else:
            rows_batch = {k: v.index_select(0, take.to(v.device)) for k, v in batch.items()}
            frames = None if speech_frames is None else speech_frames[take.cpu()]
            with guard(model, rows_batch.get("attention_mask"), frames):
                encoded = encode(model, rows_batch)
            out = greedy_generate(model, {}, tgt_lang, max_new_tokens, encoder_outputs=encoded)
    return out.sequences


@contextmanager
def _no_guard(
    model: nn.Module, attention_mask: torch.Tensor | None, frames: torch.Tensor | None = None
) -> Iterator[None]:
    yield
