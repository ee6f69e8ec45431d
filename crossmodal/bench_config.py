"""What ``crossmodal bench`` measures and its flags, importable without torch.

:class:`BenchConfig` (one ``--flag`` per field), the CUDA defaults and the help text live
here so that ``crossmodal bench --help`` answers without importing torch or transformers;
the measurements are :mod:`crossmodal.bench`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DECODER_UNITS_LARGE = 24 * 20_480 + 1024  # 492,544 (docs/method.md, "Units")


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures (every field is a ``--flag`` of ``crossmodal bench`` and of
    ``python -m crossmodal.bench``)."""

    model: str = "organism"
    device: str = "cpu"
    dtype: str = "auto"
    batch_sizes: tuple[int, ...] = (8, 32)
    modalities: tuple[str, ...] = ("speech", "text")
    n_batches: int = 2
    max_new_tokens: int = 16
    steps: tuple[int, ...] = (1, 6, 11)
    poolings: tuple[str, ...] = ("prefix_mean",)  # the reference's value; "last" doubles stats
    repeats: int = 3
    reference_examples: int = 4
    speech_seconds: float = 10.0
    text_tokens: int = 32
    steer_units: int = 1000
    tgt_lang: str = "eng"
    compile: bool = False  # the compiled fast path, at the largest batch size (slow to build)
    reducer: bool = True
    reducer_units: int = DECODER_UNITS_LARGE
    reducer_groups: int = 12
    reducer_languages: int = 5
    reducer_examples: int = 350
    reducer_chunk: int = 32_768
    reducer_threads: int = 2
    n_bins: int = 256
    threads: int | None = None
    time_limit_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < max(self.steps) + 1:
            raise ValueError(
                f"max_new_tokens must be one of [>= {max(self.steps) + 1}], got "
                f"{self.max_new_tokens!r}; every measured step needs a generated token"
            )
        if not set(self.modalities) <= {"speech", "text"}:
            raise ValueError(f"modalities must be one of [speech, text], got {self.modalities!r}")


GPU_DEFAULTS = {
    "model": "large",
    "dtype": "bfloat16",
    "batch_sizes": (32, 128),
    "max_new_tokens": 16,
    "repeats": 2,
    "reference_examples": 2,
    "reducer": False,
    "compile": True,
    "time_limit_s": 360.0,
}
"""The GPU check: SeamlessM4T v2 large's shapes (random weights), bf16, speech (10 s) and text,
batch 32 and 128; no cell starts after 6 minutes, so one H100 finishes within 8."""


_PARSE: dict[str, Callable[[str], Any]] = {
    "bool": lambda v: v.lower() in ("1", "true", "yes"),
    "int": int,
    "int | None": int,
    "float": float,
    "float | None": float,
    "tuple[int, ...]": lambda v: tuple(int(x) for x in v.split(",")),
    "tuple[str, ...]": lambda v: tuple(x for x in v.split(",") if x),  # "" -> no model cells
}


HELP = """\
How fast generation, capture, the reference procedure, steering and the reducer run.

For each (modality, batch size), on the same synthetic inputs: bare HF generate, the fast
greedy loop (with an identity check), capture plus statistics updates (HF and fast
generation), the batch-1 reference procedure, and steering (a different forcing per row, HF
and fast). Once: the reducer (AP, AUROC, medians) over synthetic statistics of the real size.
Lists take commas (--batch-sizes 8,32); booleans take true/false.

Per cell also: peak memory and the replay check (batched capture vs the per-prefix
reference within the dtype's tolerance); then the goals at the largest batch size. With
--compile true, the largest batch size also times the fast path with static caches under
torch.compile (CUDA graphs on CUDA), with an identity check.

The GPU check (large random model, bf16, speech 10 s and text, batch sizes 32,128,
16 new tokens, the compiled fast path, no reducer; no cell starts after 6 minutes):
  python -m crossmodal.bench --device cuda --out gpu-check.json
"""


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _flag_help(name: str, default: Any) -> str:
    """``default: X`` (and the CUDA default where it differs) for one :class:`BenchConfig` flag."""
    if name == "device":
        return "default: cuda when available, else cpu"
    if name in GPU_DEFAULTS:
        return f"default: {_show(default)} (on CUDA: {_show(GPU_DEFAULTS[name])})"
    return f"default: {_show(default)}"
