"""Shared fixtures. No hub and no Ray auth in tests (platform.md)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from crossmodal.model import LoadedModel, build_random_model  # noqa: E402

# Unit tests run tiny models: one thread avoids oversubscription on small CI machines
# (2 cores), where two threads per test process made tiny-model tests up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """A random tiny SeamlessM4T v2 (about 0.6M parameters), eval mode, six language tags."""
    torch.manual_seed(0)
    return build_random_model("tiny", seed=0)
