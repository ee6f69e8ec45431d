"""Smoke tests of ``crossmodal bench`` (not timed: they check fields, not speed).

The end-to-end run happens in a subprocess where ``ray``, ``zarr`` and ``click`` cannot be
imported, because the benchmark must run on a GPU machine that has only torch, transformers
and numpy (marked integration: interpreter start plus two cells take ~15 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from crossmodal.bench import (
    GOALS,
    GPU_DEFAULTS,
    BenchConfig,
    bench_cell,
    bench_reducer,
    format_row,
    format_table,
)

SMOKE = textwrap.dedent(
    """
    import sys
    for name in ("ray", "zarr", "click", "numba"):  # the GPU box has none of these
        sys.modules[name] = None  # import of these now raises ImportError
    from crossmodal.bench import main
    main(sys.argv[1:])
    absent = {"ray", "zarr", "click", "numba"}
    assert not absent & {m for m, v in sys.modules.items() if v is not None}
    """
)


RATIOS = (
    "bare_eps",
    "fast_eps",
    "capture_hf_eps",
    "capture_fast_eps",
    "reference_eps",
    "steer_hf_eps",
    "steer_fast_eps",
    "capture_hf_ratio",
    "capture_fast_ratio",
    "capture_fast_vs_reference",
    "capture_hf_vs_reference",
    "steer_hf_ratio",
    "steer_fast_ratio",
)


def check_cell(cell: dict, batch: int, kernel: str = "numba") -> None:
    for key in RATIOS:
        assert isinstance(cell[key], float) and math.isfinite(cell[key]) and cell[key] > 0, key
    assert cell["fast_identical"] is True and cell["steer_fast_identical"] is True
    steps = {f"prefix_mean@{s}": batch * 2 for s in (1, 6, 11)}  # warm-up + 1 timed round
    assert cell["stats_count"] == steps and cell["stats_kernel"] == kernel
    assert cell["stats_torch_ms"] > 0 and ("stats_numba_ms" in cell) == (kernel == "numba")
    assert cell["reference_examples"] == 1 and cell["n_examples"] == batch
    assert cell["replay_tokens_equal"] is True and cell["replay_ok"] is True
    assert 0 <= cell["replay_max_rel_diff"] <= cell["replay_tol"]
    assert cell["peak_memory_gib"] > 0 and cell["fast_speedup"] > 0


def test_one_cell_in_process(tiny_model):
    cfg = BenchConfig(
        model="tiny",
        n_batches=1,
        repeats=1,
        reference_examples=1,
        max_new_tokens=12,
        text_tokens=6,
        steer_units=20,
        n_bins=16,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy cores are several times slower
    try:
        cell = bench_cell(tiny_model, "text", 2, cfg)
    finally:
        torch.set_num_threads(threads)
    check_cell(cell, 2)
    # tiny decoder, per layer: 8 attention projections + 3 norms + fc2 of width 64, fc1 128
    assert cell["n_units"] == 2 * (12 * 64 + 128) + 64
    assert format_row(cell).split()[:2] == ["text", "2"]


@pytest.mark.integration
def test_bench_runs_without_ray_zarr_click(tmp_path):
    out = tmp_path / "results.json"
    args = [
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--batch-sizes",
        "2",
        "--n-batches",
        "1",
        "--repeats",
        "1",
        "--reference-examples",
        "1",
        "--max-new-tokens",
        "12",
        "--speech-seconds",
        "1",
        "--text-tokens",
        "6",
        "--steer-units",
        "20",
        "--reducer-units",
        "600",
        "--reducer-chunk",
        "400",
        "--reducer-groups",
        "1",
        "--n-bins",
        "16",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SMOKE, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "tiny" and result["machine"]["cores"] >= 1
    assert result["model"]["model_source"] == "random:tiny"
    assert [(c["modality"], c["batch_size"]) for c in result["cells"]] == [
        ("speech", 2),
        ("text", 2),
    ]
    for cell in result["cells"]:
        check_cell(cell, 2, kernel="torch")  # numba blocked: the statistics' torch path
    red = result["reducer"]
    assert (red["units"], red["conditions"], red["chunk_units"]) == (600, 5, 400)
    assert red["finalize_s"] > 0 and red["peak_rss_gib"] > 0
    assert "reducer: 600 units x 5 conditions" in proc.stdout


def test_reducer_alone_and_table():
    cfg = BenchConfig(
        reducer_units=300, reducer_chunk=128, reducer_groups=2, reducer_languages=3, n_bins=8
    )
    red = bench_reducer(cfg)
    assert red["conditions"] == 6 and red["finalize_s"] > 0
    assert "300 units x 6 conditions" in format_table({"cells": [], "reducer": red})


def test_bad_config():
    with pytest.raises(ValueError, match="max_new_tokens must be one of"):
        BenchConfig(max_new_tokens=8)
    with pytest.raises(ValueError, match="modalities must be one of"):
        BenchConfig(modalities=("video",))


def _flag(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value).lower()


@pytest.mark.integration
def test_gpu_check_code_path_on_cpu(tmp_path):
    """The GPU check's options (bf16, speech 10 s and text, no reducer, the time limit) with
    a tiny model, two small batch sizes and one round on CPU: the command's code path runs
    end to end without ray, zarr, click or numba, writes the JSON and prints the goals."""
    out = tmp_path / "gpu-check.json"
    options = {**GPU_DEFAULTS, "model": "tiny", "batch_sizes": (2, 3), "max_new_tokens": 12}
    options.update(repeats=1, reference_examples=1, steer_units=20, n_bins=16, threads=1)
    args = [f"--{k.replace('_', '-')}={_flag(v)}" for k, v in options.items()]
    args += ["--device", "cpu", "--n-batches", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SMOKE, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["dtype"] == "bfloat16" and result["config"]["speech_seconds"] == 10.0
    assert result["model"]["dtype"] == "bfloat16" and "reducer" not in result
    assert [(c["modality"], c["batch_size"]) for c in result["cells"]] == [
        ("speech", 2),
        ("speech", 3),
        ("text", 2),
        ("text", 3),
    ]
    for cell in result["cells"]:
        assert cell["fast_identical"] is True and cell["steer_fast_identical"] is True
        assert cell["replay_tokens_equal"] is True
        assert cell["replay_max_rel_diff"] <= cell["replay_tol"] == 5e-2
        assert cell["peak_memory_kind"] == "process peak RSS"
    for cell in result["cells"]:  # the compiled fast path at the largest batch size only
        assert ("compiled_ratio" in cell) == (cell["batch_size"] == 3), cell
        assert "compiled_error" not in cell
    compiled = [c for c in result["cells"] if c["batch_size"] == 3]
    assert all(
        c["compiled_ratio"] > 0 and isinstance(c["compiled_identical"], bool) for c in compiled
    )
    # one graph for the whole step (the first compiled cell makes it; the second may reuse
    # it), and the compiling call's seconds
    assert compiled[0]["compiled_graphs"] == 1 and compiled[1]["compiled_graphs"] <= 1
    assert all(c["compile_s"] > 0 for c in compiled)
    assert set(result["goals"]) == {"speech@3", "text@3"}
    assert {k for k, *_ in GOALS} == set(result["goals"]["text@3"])
    assert "goal text@3: capture_fast_ratio" in proc.stdout
    assert "goal text@3: compiled_ratio" in proc.stdout


def test_time_limit_skips_the_remaining_cells(tiny_model, monkeypatch):
    import crossmodal.bench as bench

    monkeypatch.setattr(bench, "load", lambda cfg: tiny_model)
    monkeypatch.setattr(bench, "bench_cell", lambda *a: pytest.fail("a cell ran"))
    cfg = BenchConfig(model="tiny", reducer=False, modalities=("text",), time_limit_s=1e-9)
    result = bench.run_bench(cfg)
    assert result["cells"] == [
        {"modality": "text", "batch_size": b, "skipped": "time limit"} for b in (8, 32)
    ]
    assert result["goals"] == {}


def test_a_failed_cell_is_recorded_and_the_rest_still_run(tiny_model, monkeypatch, tmp_path):
    """The GPU check runs once: an error in one cell (out of memory at batch 8 here) is
    that cell's ``error`` line, the other cells run, the goals skip it, the JSON is written
    after every cell, and the command exits with 1."""
    import crossmodal.bench as bench

    out = tmp_path / "check.json"
    seen = []  # the JSON's cells as each cell starts
    measured = {"bare_eps": 1.0, **{key: 1.0 for key, *_ in GOALS}}

    def cell(loaded, modality, batch_size, cfg):  # noqa: ANN001, ANN202
        seen.append(json.loads(out.read_text())["cells"] if out.exists() else None)
        if batch_size == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return {"modality": modality, "batch_size": batch_size, **measured}

    monkeypatch.setattr(bench, "load", lambda cfg: tiny_model)
    monkeypatch.setattr(bench, "bench_cell", cell)
    args = ["--model", "tiny", "--modalities", "text", "--batch-sizes", "4,8", "--reducer"]
    assert bench.main([*args, "false", "--out", str(out)]) == 1
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert seen == [None, [{"modality": "text", "batch_size": 4, **measured}]]
    result = json.loads(out.read_text())
    assert result["finished"] is True
    assert result["cells"][1] == {"modality": "text", "batch_size": 8, "error": error}
    assert set(result["goals"]) == {"text@4"}  # the largest batch that ran
    assert format_row(result["cells"][1]).endswith(error)


def test_a_failed_compile_costs_only_the_compiled_variant(tiny_model, monkeypatch):
    import crossmodal.bench as bench

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("inductor: no working C++ compiler\nmore")

    monkeypatch.setattr(bench.fastgen, "CompiledStep", refuse)
    cfg = BenchConfig(
        model="tiny", n_batches=1, repeats=1, reference_examples=1, max_new_tokens=12,
        text_tokens=6, steer_units=20, n_bins=16, batch_sizes=(2,), compile=True,
    )  # fmt: skip
    cell = bench_cell(tiny_model, "text", 2, cfg)
    check_cell(cell, 2)
    assert cell["compiled_error"] == "RuntimeError: inductor: no working C++ compiler"
    assert not {"compiled_ratio", "compiled_identical", "compile_s", "compiled_graphs"} & set(cell)
    assert format_row(cell).endswith("compiled: RuntimeError: inductor: no working C++ compiler")
