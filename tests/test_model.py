"""Model loading: dtype policy, clear errors, random builders with the real large shapes."""

from __future__ import annotations

import json

import pytest
import torch

from crossmodal.model.load import (
    REFERENCE_MODEL,
    ModelLoadError,
    build_random_model,
    load_model,
    resolve_device,
    resolve_dtype,
)


def test_dtype_auto_is_fp32_on_cpu() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) is torch.float16


def test_dtype_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of .*'float32'.*got 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_device_default_is_cpu_without_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_missing_directory_is_one_clear_line(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(str(missing))
    assert "\n" not in str(err.value) and str(missing) in str(err.value)


def test_incomplete_directory_names_missing_files(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "seamless_m4t_v2"}))
    with pytest.raises(ModelLoadError, match="incomplete: missing weights") as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "processor config" in message and "tokenizer" in message and "\n" not in message


def test_unreachable_hub_id_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match=r"could not load model 'facebook/seamless-m4t-v2-large'"
    ) as err:
        load_model(REFERENCE_MODEL)
    assert "\n" not in str(err.value)


def test_random_tiny_model_generates_in_eval_mode(tiny_model) -> None:
    model = tiny_model.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    out = model.generate(
        input_ids=torch.tensor([[5, 6, 7, 3]]),
        tgt_lang="deu",
        generate_speech=False,
        max_new_tokens=4,
    )
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences[0, 0].item() == 3
    assert sequences[0, 1].item() == tiny_model.lang_to_code_id["deu"]


def test_random_large_model_has_reference_shapes() -> None:
    """The benchmark model: real v2-large decoder shapes, built on the meta device (no memory)."""
    loaded = build_random_model("large", device="meta")
    decoder = loaded.model.text_decoder
    assert len(decoder.layers) == 24
    assert decoder.layers[0].ffn.fc1.out_features == 8192
    assert decoder.layers[0].self_attn.q_proj.out_features == 1024
    assert loaded.model.config.vocab_size == 256102
    assert 2.2e9 < loaded.provenance()["n_parameters"] < 2.4e9


def test_random_model_rejects_unknown_size() -> None:
    with pytest.raises(ValueError, match="size must be one of \\['large', 'tiny'\\], got 'huge'"):
        build_random_model("huge")


def test_random_sources_load_through_load_model() -> None:
    loaded = load_model("random:tiny", device="cpu", dtype="float32")
    assert loaded.source == "random:tiny" and loaded.processor is None
    with pytest.raises(ValueError, match="size must be one of"):
        load_model("random:huge")


def test_random_large_has_the_real_language_tag_ids_without_a_processor() -> None:
    loaded = build_random_model("large", device="meta", processor=False)
    assert loaded.processor is None
    assert loaded.lang_to_code_id["eng"] == 256022 and len(loaded.lang_to_code_id) == 98
    assert loaded.model.generation_config.text_decoder_lang_to_code_id["spa"] == 256081


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match=r"on Tesla V100 \(no bf16") as err:
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert "\n" not in str(err.value)


def test_a_random_model_is_built_without_transformers_warnings() -> None:
    """Building from a config made transformers warn about ``layer_idx`` in every actor of a
    random-weight run (a line per actor in a run that should print none); the warning
    level is restored afterwards."""
    import subprocess
    import sys

    code = (
        "from transformers.utils import logging as l\n"
        "from crossmodal.model.load import build_random_model\n"
        "build_random_model('tiny')\n"
        "print('verbosity', l.get_verbosity())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "layer_idx" not in out.stderr, out.stderr
    assert "verbosity 30" in out.stdout  # WARNING, transformers' default, restored
