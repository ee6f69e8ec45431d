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
and the fixes. Estimates are upper bounds of what the tensors need, not of allocator slack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch
from transformers import SeamlessM4Tv2Config

FBANK_FRAMES_PER_SECOND = 100  # 10 ms hop of the feature extractor
GB = 1e9


@dataclass(frozen=True)
class ActorMemory:
    """Bytes one actor needs, by part (see the module docstring)."""

    weights: int
    kv_cache: int
    activations: int
    capture: int
    statistics: int
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.capture + self.statistics

    def describe(self) -> str:
        """``"15.6 GB = weights 9.2 + KV cache 0.1 (batch 9) + ..."`` in GB."""
        return (
            f"{self.total / GB:.1f} GB = weights {self.weights / GB:.1f} + KV cache "
            f"{self.kv_cache / GB:.2f} (batch {self.batch_size}) + activations "
            f"{self.activations / GB:.2f} + capture buffers {self.capture / GB:.2f} + "
            f"statistics {self.statistics / GB:.2f}"
        )

    def check(self, available: int, where: str) -> None:
        """Refuse a plan that cannot fit ``available`` bytes on ``where`` (one line).

        Raises:
            ValueError: naming every part and the three fixes.
        """
        if self.total > available:
            raise ValueError(
                f"actor memory must be one of [<= {available / GB:.1f} GB on {where}], got "
                f"{self.describe()}; use a smaller batch_size, fewer poolings or steps per "
                "run (the statistics scale with steps x poolings x units x bins), or more "
                "actors with fewer units each"
            )


@cache
def n_parameters(config_json: str) -> int:
    """Parameters of the model a config describes, counted on the meta device."""
    from transformers import SeamlessM4Tv2Model
    from transformers.utils import logging as hf_logging

    config = SeamlessM4Tv2Config.from_dict(json.loads(config_json))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = SeamlessM4Tv2Model(config)
    finally:
        hf_logging.set_verbosity(verbosity)
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
) -> ActorMemory:
    """Bytes one actor needs for ``batch_size`` examples of ``modality`` (``source_length``:
    tokens for text, seconds for speech) and one work unit's statistics."""
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
    )
