"""Per-actor memory of a collect run: weights, KV cache, activations, capture buffers, statistics.

An actor holds one model and, while it runs a work unit, that unit's running statistics: for
every (step, pooling) a ``[unit, n_bins + 2]`` int32 histogram, four float64 moments per unit
and the ``[unit, n_bins + 1]`` float32 bin edges. At SeamlessM4T v2 large's 492,544 decoder
units and 256 bins that is 1.02 GB per (step, pooling), 6.1 GB for steps 1/6/11 x both
poolings, next to 4.6 GB of bf16 weights (9.2 GB in fp32). The batch adds the KV cache
(self-attention over the generated tokens, cross-attention over the source positions), the
largest encoder activation, the logits and the capture buffers.

:func:`estimate_actor_memory` adds these up from the model config alone (the meta device:
nothing is allocated); :meth:`ActorMemory.check` is the one-line refusal with the numbers
and the fixes. Estimates are upper bounds of what the tensors need, plus the process's own
footprint (:data:`RUNTIME_BYTES`), not of allocator slack: the planner keeps
:data:`HEADROOM` of the memory for that (docs/benchmarks.md, "Real shapes on CPU").

A pilot job holds, instead of statistics, the exact float32 values of its examples at every
(step, pooling) until it chooses the edges: ``examples x units x (steps x poolings + 2) x 4``
bytes, two copies of one (step, pooling) while its edges are chosen (16.1 GB for the
reference config's 1,024 pilot examples of one task at 492,544 units), so the actor's peak is
the larger of the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch
from transformers import SeamlessM4Tv2Config

FBANK_FRAMES_PER_SECOND = 100  # 10 ms hop of the feature extractor
GB = 1e9
RUNTIME_BYTES = 600_000_000
"""Resident memory of an actor process before the model: Python, torch, transformers, zarr,
ray and crossmodal imported (measured 0.56 GB on CPU, docs/benchmarks.md)."""
HEADROOM = 0.8
"""Fraction of the memory a plan may use. The 6-layer real-shape run's actor peaked at 11.3 GB
against a 9.0 GB estimate of its tensors (1.26x; 1.18x with :data:`RUNTIME_BYTES`): memory
freed while drawing the weights but kept by the allocator. 0.8 leaves that 25% (and the
CUDA context and caching allocator's slack on a GPU, not measured here)."""


@dataclass(frozen=True)
class ActorMemory:
    """Bytes one actor needs, by part (see the module docstring)."""

    weights: int
    kv_cache: int
    activations: int
    capture: int
    statistics: int
    batch_size: int
    pilot: int = 0  # exact pilot values of the largest pilot job (see the module docstring)
    runtime: int = 0  # the process before the model (RUNTIME_BYTES on CPU)
    modality: str = ""  # the modality whose inputs give this estimate

    @property
    def total(self) -> int:
        """Weights, runtime and one batch, plus the larger of a work unit's statistics and
        a pilot job's values (an actor runs one job at a time)."""
        batch = self.kv_cache + self.activations + self.capture
        return self.weights + self.runtime + batch + max(self.statistics, self.pilot)

    def describe(self) -> str:
        """``"15.6 GB = weights 9.2 + KV cache 0.1 (batch 9) + ..."`` in GB."""
        runtime = f" + runtime {self.runtime / GB:.2f}" if self.runtime else ""
        pilot = f" (or pilot values {self.pilot / GB:.2f}, the larger counts)" if self.pilot else ""
        return (
            f"{self.total / GB:.1f} GB = weights {self.weights / GB:.1f}{runtime} + KV cache "
            f"{self.kv_cache / GB:.2f} (batch {self.batch_size}) + activations "
            f"{self.activations / GB:.2f} + capture buffers {self.capture / GB:.2f} + "
            f"statistics {self.statistics / GB:.2f}{pilot}"
        )

    def check(self, available: int, where: str) -> None:
        """Refuse a plan that cannot fit ``available`` bytes on ``where`` (one line).

        Raises:
            ValueError: naming every part and the fixes.
        """
        if self.total > available:
            raise ValueError(
                f"actor memory must be one of [<= {available / GB:.1f} GB on {where}], got "
                f"{self.describe()}; use a smaller batch_size, fewer poolings or steps per "
                "run (the statistics scale with steps x poolings x units x bins), a lower "
                "data.max_audio_seconds or data.max_text_chars (the longest batch), a smaller "
                "pilot_size, or fewer actors per GPU or machine (every actor holds all units)"
            )


@cache
def n_parameters(config_json: str) -> int:
    """Parameters of the model a config describes, counted on the meta device."""
    from transformers import SeamlessM4Tv2Model

    from crossmodal.model.load import quiet_construction

    config = SeamlessM4Tv2Config.from_dict(json.loads(config_json))
    with torch.device("meta"), quiet_construction():
        model = SeamlessM4Tv2Model(config)
    return sum(p.numel() for p in model.parameters())


def source_positions(config: SeamlessM4Tv2Config, modality: str, length: float) -> int:
    """Encoder positions the decoder attends to: ``length`` tokens, or seconds of speech
    (100 fbank frames/s, stacked by the feature extractor's stride 2, then the adaptor's
    stride)."""
    if modality == "text":
        return int(length)
    frames = int(length * FBANK_FRAMES_PER_SECOND) // 2
    return -(-frames // config.adaptor_stride)


def _activations(
    config: SeamlessM4Tv2Config, modality: str, length: float, batch: int, width: int
) -> int:
    """The largest single encoder temporary (FFN input or attention scores) and the logits."""
    if modality == "speech":
        frames = int(length * FBANK_FRAMES_PER_SECOND) // 2
        heads = config.speech_encoder_attention_heads
        ffn = frames * config.speech_encoder_intermediate_size
        scores = heads * frames * frames
    else:
        ffn = int(length) * config.encoder_ffn_dim
        scores = config.encoder_attention_heads * int(length) ** 2
    logits = config.vocab_size * 4  # float32 per row
    return batch * (max(ffn, scores) * width + logits)


def estimate_actor_memory(
    config: SeamlessM4Tv2Config,
    *,
    dtype: torch.dtype,
    batch_size: int,
    max_new_tokens: int,
    modality: str,
    source_length: float,
    n_units: int,
    n_steps: int,
    n_poolings: int,
    n_bins: int,
    pilot_values: int = 0,
    runtime: int = 0,
) -> ActorMemory:
    """Bytes one actor needs for ``batch_size`` examples of ``modality`` (``source_length``:
    tokens for text, seconds for speech) and one work unit's statistics; ``pilot_values``:
    bytes of the largest pilot job's exact values, ``runtime``: the process itself."""
    width = torch.empty(0, dtype=dtype).element_size()
    positions = source_positions(config, modality, source_length)
    kv_per_row = 2 * config.decoder_layers * config.hidden_size * width
    kv = batch_size * kv_per_row * (max_new_tokens + 2 + positions)
    cells = n_steps * n_poolings * n_units
    return ActorMemory(
        weights=n_parameters(config.to_json_string()) * width,
        kv_cache=kv,
        activations=_activations(config, modality, source_length, batch_size, width),
        capture=n_poolings * batch_size * n_steps * n_units * 4,
        statistics=cells * ((n_bins + 2) * 4 + 4 * 8 + (n_bins + 1) * 4),
        batch_size=batch_size,
        pilot=pilot_values,
        runtime=runtime,
        modality=modality,
    )
