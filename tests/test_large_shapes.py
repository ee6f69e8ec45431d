"""Real shapes end to end, reduced to the CI budget.

The real-vocabulary processor (unit tests, fast once cached): 256,000 sentencepiece pieces
plus the fairseq specials, the 98 language tags at SeamlessM4T v2 large's ids, a model
directory with random weights drawn on load that every stage reads like a real checkpoint,
the one-line refusal of a processor whose vocabulary the model cannot hold, and the
per-actor memory estimate at the real shapes.

The integration test runs configs/large-shapes.yaml's config (eng + deu + spa; x2en and
en2x in speech and text, asr; 3 examples per language; steps 1/6/11; 12 new tokens; 256
bins; both poolings; the decoder family) through collect (in-process, no Ray) and reduce
(in-process Ray, with the exact pass) on a model with the real vocabulary (256,102 ids,
real language tags, real embedding and lm_head sizes) and the real width of every layer
(20,480 decoder units per layer: hidden 1024, FFN 8192, 16 heads), but 2 decoder layers,
1 text and 1 speech encoder layer and 1-layer t2u instead of 24/24/24/6.
It checks the store's shapes at the real unit count per layer and the real vocabulary, and
goes through the driver's checks before actors (language tags, vocabulary from the
directory's files, per-actor memory: 6.7 GB estimated here). It takes about 4 minutes on
2 quiet cores (226 s; profiled: collect 135 s, most of it the 256,102-way logits of every
decode step; reduce 118 s, exact pass 48 s, selectivity 40 s) and 7 under load. It is not
cut further: the time is in the real vocabulary and the 33 examples, not in the layers.
The planner's memory estimate and refusals at the real shapes (no weights) are in
tests/test_actor_memory.py.

Only the documented full run (configs/pipeline-large-shapes.yaml: configs/large-shapes.yaml
as shipped, then reduce, steer and report; run on 2026-12-06, measured in docs/benchmarks.md,
"Real shapes on CPU, the GPU check, bf16") covers the 24 decoder layers: 492,544 units, 6.2 GB
of statistics and edges per work unit, 2.3B weights per actor, the store's size against the
dry run's estimate, the exact pass and steering at that unit count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from helpers import local_collect

from crossmodal.model.load import ModelLoadError, load_model, write_random_model_dir
from crossmodal.model.processor import (
    LANGUAGE_TAG_START,
    SEAMLESS_TEXT_LANGUAGES,
    SPM_PIECES,
    VOCAB_SIZE,
    language_ids,
    real_vocab_processor,
)

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "decoder_layers": 2,
    "encoder_layers": 1,
    "speech_encoder_layers": 1,
    "t2u_encoder_layers": 1,
    "t2u_decoder_layers": 1,
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return real_vocab_processor()


def test_processor_has_the_real_vocabulary_and_language_ids(processor) -> None:
    tok = processor.tokenizer
    assert len(tok) == SPM_PIECES + 1 + len(SEAMLESS_TEXT_LANGUAGES) <= VOCAB_SIZE
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = language_ids()
    assert ids["eng"] == 256022 and ids["deu"] == 256020 and ids["spa"] == 256081
    assert min(ids.values()) == LANGUAGE_TAG_START and max(ids.values()) == 256098
    for lang, want in ids.items():
        assert tok.convert_tokens_to_ids(f"__{lang}__") == want
    encoded = tok("pod kungthoo shirid", src_lang="deu")["input_ids"]
    assert encoded[0] == ids["deu"] and encoded[-1] == 3 and len(encoded) > 3
    assert all(4 <= i <= SPM_PIECES for i in encoded[1:-1])


# fmt: off
CONVERSION_ORDER = [
    "afr", "amh", "arb", "ary", "arz", "asm", "azj", "bel", "ben", "bos", "bul", "cat", "ceb",
    "ces", "ckb", "cmn", "cmn_Hant", "cym", "dan", "deu", "ell", "eng", "est", "eus", "fin",
    "fra", "fuv", "gaz", "gle", "glg", "guj", "heb", "hin", "hrv", "hun", "hye", "ibo", "ind",
    "isl", "ita", "jav", "jpn", "kan", "kat", "kaz", "khk", "khm", "kir", "kor", "lao", "lit",
    "lug", "luo", "lvs", "mai", "mal", "mar", "mkd", "mlt", "mni", "mya", "nld", "nno", "nob",
    "npi", "nya", "ory", "pan", "pbt", "pes", "pol", "por", "ron", "rus", "sat", "slk", "slv",
    "sna", "snd", "som", "spa", "srp", "swe", "swh", "tam", "tel", "tgk", "tgl", "tha", "tur",
    "ukr", "urd", "uzn", "vie", "yor", "yue", "zlm", "zul",
]
# fmt: on
"""``LARGE_SUPPORTED_LANGUAGES`` of transformers' conversion script for the checkpoint: the
order its tokenizer adds the tags in (docs/benchmarks.md, "The real-vocabulary processor")."""


def test_language_ids_match_the_real_checkpoint() -> None:
    """Every tag id is the conversion script's (one after the sentencepiece vocabulary per
    tag, in its order), and four are what the real ``facebook/seamless-m4t-v2-large`` emits
    in transformers' integration tests: the target tag after the decoder start for eng, swh
    and rus, and the source tag of a French input."""
    ids = language_ids()
    assert ids == {lang: 256_001 + rank for rank, lang in enumerate(CONVERSION_ORDER)}
    assert len(ids) == 98 and max(ids.values()) == 256_098 < VOCAB_SIZE
    assert (ids["eng"], ids["fra"], ids["rus"], ids["swh"]) == (256022, 256026, 256074, 256084)


def test_random_model_directory_loads_like_a_checkpoint(tmp_path) -> None:
    path = write_random_model_dir(tmp_path / "m", seed=3, **SMALL)
    assert not any(path.glob("*.safetensors"))
    assert json.loads((path / "random_weights.json").read_text()) == {"seed": 3}
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["text_decoder_lang_to_code_id"] == language_ids()


def test_processor_larger_than_the_vocabulary_is_one_line(tmp_path) -> None:
    path = write_random_model_dir(tmp_path / "m", **{**SMALL, "vocab_size": 1000})
    with pytest.raises(ModelLoadError, match=r"1000-token vocabulary but its tokenizer has") as e:
        load_model(path, device="cpu", dtype="float32")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.mark.integration
def test_large_shapes_config_collects_and_reduces(
    tmp_path, monkeypatch, processor, ray_session
) -> None:
    from crossmodal.collect.config import load_config
    from crossmodal.collect.plan import unit_index
    from crossmodal.reduce.driver import run_reduce

    model = write_random_model_dir(tmp_path / "random-large-2", **SMALL)
    raw = yaml.safe_load((REPO / "configs" / "large-shapes.yaml").read_text())
    raw.update(model=str(model), output=str(tmp_path / "large.zarr"), batch_size=6)
    index = unit_index(load_config(raw))
    n_units = len(index)
    per_layer = (492_544 - 1024) // 24  # the final layer norm has 1,024 of the 492,544
    assert index.counts("layer") == {0: per_layer, 1: per_layer, None: 1024}

    out = local_collect(monkeypatch, raw)
    assert out["work_units"] == 11 and out["examples"] == 33
    stats = xr.open_zarr(raw["output"], group="stats/decoder", consolidated=False)
    hist = stats["hist"]
    assert dict(hist.sizes) == {
        "task": 3,
        "modality": 2,
        "language": 3,
        "step": 3,
        "pooling": 2,
        "unit": n_units,
        "bin": 256 + 2,
    }
    # every example in every condition the config has, at every step (12 new tokens)
    rows = stats["n_rows"].sel(task="asr", modality="speech")
    assert (rows == 3).all()
    x2en = stats["n_rows"].sel(task="x2en", language=["deu", "spa"])
    assert (x2en == 3).all()
    edges = xr.open_zarr(raw["output"], group="edges/decoder", consolidated=False)["edges"]
    first = edges.sel(task="x2en", modality="text", step=1, pooling="last").values
    assert np.isfinite(first).all() and (np.diff(first, axis=-1) >= 0).all()

    reduced = run_reduce(raw["output"], k=50, scopes=("all",), progress=False, echo=print)
    assert reduced["exact_units"] > 0


def test_actor_memory_at_the_real_shapes() -> None:
    """The numbers the planner needs: 2.3B weights, 6.2 GB of statistics per work unit."""
    import torch

    from crossmodal.model.load import large_config
    from crossmodal.model.memory import estimate_actor_memory, source_positions

    config = large_config()
    assert source_positions(config, "speech", 10.0) == 63  # 500 stacked frames / stride 8
    mem = estimate_actor_memory(
        config,
        dtype=torch.bfloat16,
        batch_size=128,
        max_new_tokens=32,
        modality="speech",
        source_length=10.0,
        n_units=492_544,
        n_steps=3,
        n_poolings=2,
        n_bins=256,
    )
    assert 2.2e9 < mem.weights / 2 < 2.4e9
    assert mem.statistics == 3 * 2 * 492_544 * (258 * 4 + 32 + 257 * 4)
    assert mem.kv_cache == 128 * 2 * 24 * 1024 * 2 * (32 + 2 + 63)
    mem.check(80 * 10**9, "cuda:0")
    with pytest.raises(
        ValueError, match=r"actor memory must be one of \[<= 12.0 GB on cuda:0\]"
    ) as e:
        mem.check(12 * 10**9, "cuda:0")
    assert "statistics 6.18" in str(e.value) and "smaller batch_size" in str(e.value)
    assert "\n" not in str(e.value)
