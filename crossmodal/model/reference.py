"""The reference study's capture procedure, kept slow and simple on purpose.

As in the reference code (docs/method.md, "Generation steps and the per-example value"): batch
size 1, greedy ``model.generate``, then ONE teacher-forced run of the whole model PER STEP on
the prefix ``seq[:, :t + 1]``, every unit's output copied to host memory (numpy), and the per-step value taken there: ``prefix_mean``
(mean over the t + 1 prefix positions) and ``last`` (position t). Encoder-side values are means
over all positions: each example runs alone with its padding cut off.

It exists to check :mod:`crossmodal.model.capture` (tests) and as the baseline of the benchmark;
nothing here is shared with the capture engine except the unit index (the address scheme).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from crossmodal.model.capture import POOLINGS, REFERENCE_STEPS, attached, check_steps, end_token_ids
from crossmodal.model.inputs import ModelBatch
from crossmodal.model.load import LoadedModel
from crossmodal.model.units import Site, UnitIndex


@dataclass
class ReferenceResult:
    """Per-example results of the reference procedure.

    Attributes:
        index: the unit index (columns of every value array).
        steps: as requested.
        sequences: each example's generated ids ``[</s>, lang, tok1, ...]`` (no padding).
        values: ``(pooling, step) -> [rows, unit]`` float64.
        rows: step -> example indices that contribute to it.
        n_ended: step -> examples left out of it.
    """

    index: UnitIndex
    steps: tuple[int, ...]
    sequences: list[np.ndarray]
    values: dict[tuple[str, int], np.ndarray]
    rows: dict[int, list[int]]
    n_ended: dict[int, int]


def reference_valid(sequence: np.ndarray, step: int, end_ids: Iterable[int]) -> bool:
    """Did generation compute the decoder state of ``step`` for this (unpadded) sequence?

    The state at position ``t`` predicts ``sequence[t + 1]``: it exists if that token was
    generated and no earlier generated token (``sequence[2:t + 1]``) ended the output.
    """
    ends = set(end_ids)
    if step + 1 >= len(sequence):
        return False
    return all(int(tok) not in ends for tok in sequence[2 : step + 1])


def _copying_hooks(model: nn.Module, index: UnitIndex, store: dict[str, np.ndarray]) -> list:
    """Hooks that copy every site's output to host memory (``store[site name]``)."""
    modules = dict(model.named_modules())
    by_module: dict[str, list[Site]] = {}
    for site in index.sites:
        by_module.setdefault(site.module_path, []).append(site)

    def make(calls: list[Site]) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            n = sum(1 for s in calls if s.name in store)
            array = out.detach().float().cpu().numpy()
            store[calls[n].name] = array.swapaxes(1, 2) if calls[n].channels_first else array

        return hook

    return [(modules[path], make(calls)) for path, calls in by_module.items()]


def _site_values(site: Site, array: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """[1, position, feature] -> the two poolings (float64)."""
    x = array[0].astype(np.float64)
    if site.positions != "decoder":  # encoder frames or input positions: mean over all
        mean = x.mean(axis=0)
        return {"prefix_mean": mean, "last": mean}
    return {"prefix_mean": x[: step + 1].mean(axis=0), "last": x[step]}


def reference_capture(
    loaded: LoadedModel,
    batch: ModelBatch,
    tgt_lang: str,
    *,
    families: str | Iterable[str] = ("decoder",),
    steps: Iterable[int] = REFERENCE_STEPS,
    max_new_tokens: int = 32,
) -> ReferenceResult:
    """Run the reference procedure on every example of ``batch``, one at a time."""
    model = loaded.model
    index = UnitIndex.from_model(model, families)
    steps_t = check_steps(steps)
    end_ids = end_token_ids(model)
    dev, dtype = loaded.device, loaded.dtype
    values: dict[tuple[str, int], list[np.ndarray]] = {
        (p, t): [] for p in POOLINGS for t in steps_t
    }
    rows: dict[int, list[int]] = {t: [] for t in steps_t}
    sequences = []
    for i in range(len(batch)):
        kwargs = batch.row(i).model_kwargs(dev, dtype)
        with torch.inference_mode():
            out = model.generate(
                **kwargs,
                tgt_lang=tgt_lang,
                generate_speech=False,
                num_beams=1,
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
        seq = out.sequences[0].cpu().numpy()
        sequences.append(seq)
        for t in steps_t:
            if not reference_valid(seq, t, end_ids):
                continue
            store: dict[str, np.ndarray] = {}
            prefix = torch.as_tensor(seq[None, : t + 1], device=dev)
            with torch.inference_mode(), attached(_copying_hooks(model, index, store)):
                model(**kwargs, decoder_input_ids=prefix, use_cache=False)
            unit_values = {p: np.full(index.n_units, np.nan) for p in POOLINGS}
            for site in index.sites:
                if site.name in store:
                    for p, v in _site_values(site, store[site.name], t).items():
                        unit_values[p][site.offset : site.offset + site.n_features] = v
            for p in POOLINGS:
                values[(p, t)].append(unit_values[p])
            rows[t].append(i)
    stacked = {key: np.stack(v) if v else np.zeros((0, index.n_units)) for key, v in values.items()}
    n_ended = {t: len(batch) - len(rows[t]) for t in steps_t}
    return ReferenceResult(index, steps_t, sequences, stacked, rows, n_ended)
