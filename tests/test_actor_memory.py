"""The planner knows the accelerator's memory, and refuses before any actor starts.

Issue 17, item 3 and "bad input": ``collect --dry-run`` prints one ``memory`` line per plan
(weights + runtime + KV cache at the batch size + activations of the longest input the bounds
allow + capture buffers + the larger of a work unit's statistics and a pilot job's values,
and whether it fits); ``run_collect`` refuses, in one line with the numbers and the fixes, a
plan that cannot fit, bf16 on a GPU without it, and a model directory whose tokenizer or
language tags the model's vocabulary cannot hold: before the store or any actor exists. The
GPU cases run on CPU with ``torch.cuda`` answering as a GPU would (no GPU was lent).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crossmodal.collect.config import load_config
from crossmodal.collect.driver import run_collect
from crossmodal.collect.plan import (
    actor_memory,
    build_plan,
    family_sizes,
    memory_budget,
    model_config,
    unit_index,
)
from crossmodal.model.load import ModelLoadError, write_random_model_dir
from crossmodal.model.memory import HEADROOM, RUNTIME_BYTES
from crossmodal.schemas import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"decoder_layers": 2, "encoder_layers": 1, "speech_encoder_layers": 1}


def _raw(name: str, tmp_path: Path, **over) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    raw["output"] = str(tmp_path / "out.zarr")
    raw.update(over)
    return raw


def _refused(raw: dict, error: type[Exception], match: str) -> str:
    """``run_collect`` raises ``error`` in one line; no store, no actor (Ray never started)."""
    import ray

    with pytest.raises(error, match=match) as e:
        run_collect(load_config(raw), progress=False, echo=lambda _: None)
    assert "\n" not in str(e.value)
    assert not Path(raw["output"]).exists() and not ray.is_initialized()
    return str(e.value)


@pytest.fixture
def gpu(monkeypatch):
    """``torch.cuda`` answering as one GPU would: ``gpu(name, GB, capability)``."""

    def fake(name: str, gb: float, capability: tuple[int, int]) -> None:
        props = SimpleNamespace(name=name, total_memory=int(gb * 1e9))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: capability[0] >= 8)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)

    return fake


def test_dry_run_prints_the_actor_memory_and_the_organism_fits(tmp_path) -> None:
    lines: list[str] = []
    run_collect(load_config(_raw("organism.yaml", tmp_path)), dry_run=True, echo=lines.append)
    memory = [x for x in "\n".join(lines).splitlines() if x.startswith("  memory")]
    assert len(memory) == 1
    for part in ("weights", "runtime 0.60", "KV cache", "(batch 16)", "activations", "statistics"):
        assert part in memory[0]
    config = load_config(_raw("organism.yaml", tmp_path))
    plan = build_plan(config)
    estimate = actor_memory(plan, family_sizes(unit_index(config)))
    assert estimate.total < 3.1e9 and estimate.runtime == RUNTIME_BYTES  # 60 s audio at batch 16
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = memory_budget(config)
    assert budget.available == int(physical / 2 * HEADROOM)  # two actors share the machine
    fits = estimate.total <= budget.available
    assert ("fits <=" in memory[0]) == fits and ("DOES NOT FIT" in memory[0]) == (not fits)


def test_a_plan_that_cannot_fit_is_refused_before_any_actor(tmp_path) -> None:
    raw = _raw("organism.yaml", tmp_path)
    raw["actors"] = {**raw["actors"], "count": 100_000}  # 0.25 MB of this machine per actor
    line = _refused(raw, ValueError, r"actor memory must be one of \[<= 0\.0 GB on the CPU")
    assert "/ 100000 actor(s)), 80% of it], got 3.0 GB = weights" in line
    assert "use a smaller batch_size, fewer poolings or steps per run" in line
    assert "a smaller pilot_size, or fewer actors per GPU or machine" in line


def test_random_large_plans_without_weights(tmp_path) -> None:
    raw = _raw("large-shapes.yaml", tmp_path, model="random:large")
    raw["data"] = {**raw["data"], "max_audio_seconds": 10}
    config = load_config(raw)
    assert model_config(config).vocab_size == 256_102
    lines: list[str] = []
    run_collect(config, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "decoder 492,544" in text
    assert "weights 9.2 + runtime 0.60" in text and "statistics 6.18" in text
    estimate = actor_memory(build_plan(config), {"decoder": 492_544})
    # 9.2 + 0.6 + 6.2 + one batch of 1,000-character texts (their KV cache, 1.8 GB, outweighs
    # the 10 s audio's)
    assert 18.0e9 < estimate.total < 19.0e9 and estimate.modality == "text"


def test_random_sizes_unknown_is_one_line(tmp_path) -> None:
    raw = _raw("large-shapes.yaml", tmp_path, model="random:huge")
    with pytest.raises(ConfigError, match=r"model: must be one of \['random:large', 'random:t"):
        load_config(raw)
    tiny = load_config(_raw("large-shapes.yaml", tmp_path, model="random:tiny"))
    assert model_config(tiny).vocab_size == 128
    with pytest.raises(ValueError, match=r"got 'random:huge'; use one of them") as e:
        model_config(SimpleNamespace(model="random:huge"))
    assert "\n" not in str(e.value)


def test_random_sources_have_their_language_tags(tmp_path) -> None:
    """The targets check of the driver reads random models' tags from crossmodal.model.load."""
    from crossmodal.collect.driver import _language_table
    from crossmodal.model.load import build_random_model
    from crossmodal.model.processor import language_ids

    tiny = load_config(_raw("organism.yaml", tmp_path, model="random:tiny"))
    assert _language_table(tiny) == build_random_model("tiny").lang_to_code_id
    assert _language_table(tiny)["eng"] == 122  # the last 6 of 128 ids
    large = load_config(_raw("organism.yaml", tmp_path, model="random:large"))
    assert _language_table(large) == language_ids()


def test_vocabulary_the_model_cannot_hold_is_refused_before_actors(tmp_path) -> None:
    model = write_random_model_dir(tmp_path / "m", **{**SMALL, "vocab_size": 1000})
    raw = _raw("large-shapes.yaml", tmp_path, model=str(model))
    raw["data"] = {**raw["data"], "max_audio_seconds": 10}
    line = _refused(raw, ModelLoadError, r"has a 1000-token vocabulary but its tokenizer has")
    assert "256099 tokens and its language tags reach id 256098" in line


def test_bf16_on_a_gpu_without_it_is_refused_before_actors(tmp_path, gpu) -> None:
    gpu("Tesla V100-SXM2-16GB", 16, (7, 0))
    raw = _raw("organism.yaml", tmp_path, dtype="bfloat16")
    raw["actors"] = {**raw["actors"], "num_gpus": 1}
    line = _refused(raw, ValueError, r"dtype must be one of \['auto', 'float16', 'float32'\]")
    assert "on Tesla V100-SXM2-16GB (no bf16" in line and "use dtype: auto" in line


def test_gpu_memory_is_the_budget(tmp_path, gpu) -> None:
    """The reference plan in bf16 fits an 80 GB H100 (31.6 GB: the exact values of its 1,024
    pilot examples of a task, 16.1 GB with two copies of one (step, pooling), outweigh the
    6.2 GB of statistics) and not a 24 GB card."""
    config = load_config(_raw("reference.yaml", tmp_path))
    plan = build_plan(config)
    gpu("NVIDIA H100 80GB HBM3", 80, (9, 0))
    estimate = actor_memory(plan, {"decoder": 492_544})
    assert estimate.weights < 4.7e9 and estimate.runtime == 0  # bf16 on the GPU
    assert estimate.pilot == 1024 * 492_544 * (6 + 2) * 4 > estimate.statistics
    assert memory_budget(config).available == int(80e9 * HEADROOM) > estimate.total
    gpu("NVIDIA A10", 24, (8, 6))
    budget = memory_budget(config)
    with pytest.raises(ValueError, match=r"\[<= 19\.2 GB on NVIDIA A10 \(1 x 24\.0 GB\), 80%"):
        estimate.check(budget.available, budget.where)
    half = load_config(
        {**config.to_dict(), "actors": {**config.to_dict()["actors"], "num_gpus": 0.5}}
    )
    assert memory_budget(half).available == int(12e9 * HEADROOM)  # two actors share the GPU
