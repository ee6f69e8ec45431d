"""Loading SeamlessM4T v2: from a hub id, a local directory, the organism, or random weights.

Every model, from the 2.3B-parameter ``facebook/seamless-m4t-v2-large`` to the model
organism, goes through :func:`load_model`, so what is tested on the organism is the code
path the real model takes. :func:`build_random_model` makes randomly initialised models
(tiny ones for unit tests, the real large shapes for GPU benchmarks) with no weights;
``random:<size>`` sources and random-model directories (:func:`write_random_model_dir`: a
config, a processor and a seed, no weights) load them through :func:`load_model`, so the
pipeline runs at the real shapes without the 2.3B real weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    SeamlessM4TFeatureExtractor,
    SeamlessM4TProcessor,
    SeamlessM4Tv2Config,
    SeamlessM4Tv2Model,
)

from crossmodal.store.location import copy_command, is_url

REFERENCE_MODEL = "facebook/seamless-m4t-v2-large"
ORGANISM = "organism"
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
RANDOM_PREFIX = "random:"
RANDOM_MARKER = "random_weights.json"
"""In a model directory instead of weights: ``{"seed": int}``; the weights are drawn on load."""


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message is one line naming the source."""


@dataclass
class LoadedModel:
    """A SeamlessM4T v2 model in eval mode with what is needed to feed it and cite it.

    Attributes:
        model: the ``SeamlessM4Tv2Model`` (eval mode, no gradients).
        processor: tokenizer + feature extractor, or ``None`` for random-weight models.
        source: what the user asked for (hub id, directory, ``organism``, ``random:<size>``).
        revision: the hub commit or a local description, for provenance.
        lang_to_code_id: output language code -> decoder language-tag token id.
    """

    model: SeamlessM4Tv2Model
    processor: SeamlessM4TProcessor | None
    source: str
    revision: str
    lang_to_code_id: dict[str, int] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def writable_languages(self) -> tuple[str, ...]:
        """Languages the text decoder can write (its ``tgt_lang`` tags)."""
        return tuple(sorted(self.lang_to_code_id))

    def provenance(self) -> dict[str, Any]:
        return {
            "model_source": self.source,
            "model_revision": self.revision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
        }


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means the first GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on Ampere or newer GPUs, fp16 on older GPUs, fp32 on CPU.

    Raises:
        ValueError: for a name outside :data:`DTYPES`, or bf16 on a GPU without it.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"dtype must be one of ['auto', 'float16', 'float32'] on {name} (no bf16: "
            "compute capability < 8.0), got 'bfloat16'; use dtype: auto (fp16 there)"
        )
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(
            f"model directory {str(path)!r} does not exist; pass a hub id such as "
            f"{REFERENCE_MODEL!r}, an existing directory, or {ORGANISM!r}"
        )
    check_model_files(str(path), {p.name for p in path.iterdir() if p.is_file()})


def check_model_files(where: str, names: set[str]) -> None:
    """The files a model directory (local, or the top-level objects at a URL) must hold.

    Raises:
        ModelLoadError: one line naming ``where`` and every missing file.
    """
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & {*_WEIGHT_FILES, RANDOM_MARKER}:
        missing.append("weights (" + " or ".join(_WEIGHT_FILES[::2]) + ")")
    # transformers 5 saves the feature extractor inside processor_config.json; 4.x wrote
    # preprocessor_config.json (the hub's seamless-m4t-v2-large still has the latter).
    if not names & set(_PROCESSOR_FILES):
        missing.append("processor config (" + " or ".join(_PROCESSOR_FILES) + ")")
    if not names & set(_TOKENIZER_FILES):
        missing.append("tokenizer (" + " or ".join(_TOKENIZER_FILES) + ")")
    if missing:
        raise ModelLoadError(
            f"model directory {where!r} is incomplete: missing {', '.join(missing)}; "
            "save it with model.save_pretrained() and processor.save_pretrained()"
            + (f" and upload it ({copy_command(where)})" if is_url(where) else "")
        )


def _is_weights(name: str) -> bool:
    """A weight file (shards included): left out of :func:`model_files`' copy."""
    return name.endswith((".safetensors", ".bin")) or name in _WEIGHT_FILES


def synced_model_dir(url: str, *, weights: bool = True) -> Path:
    """The local copy of the model directory at ``url`` (crossmodal/store/inputs.py: synced
    once per node into the cache, downloaded again when an object changes); without
    ``weights``, only its configs and processor (what the driver's checks and the planner
    read, a few MB of a 9 GB model).

    Raises:
        ModelLoadError: no objects under ``url``, or files a model directory needs missing.
        LocationError: an unreachable endpoint, a missing bucket or denied credentials.
    """
    from crossmodal.store.inputs import list_folder, sync_folder

    objects = list_folder(url, role="model")
    if not objects:
        raise ModelLoadError(
            f"model directory {url!r} does not exist (no objects under it); upload it "
            f"({copy_command(url)}) or fix the URL"
        )
    check_model_files(url, {o.name for o in objects if "/" not in o.name})
    keep = None if weights else (lambda name: not _is_weights(name))
    return sync_folder(url, objects, keep=keep, role="model")


def model_files(source: str) -> Path | None:
    """A local directory holding ``source``'s configs and processor (weights maybe not): its
    own path, the organism's, a URL's synced copy without weights; None for a hub id or
    ``random:<size>``."""
    if source.startswith(RANDOM_PREFIX):
        return None
    if is_url(source):
        return synced_model_dir(source, weights=False)
    return _model_path(source)


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else with a path shape is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _model_path(text: str) -> Path | None:
    """The directory a source names, or ``None`` for a hub id."""
    if text == ORGANISM:
        from crossmodal.organism import organism_path

        return organism_path()
    if is_url(text):
        return synced_model_dir(text)
    if Path(text).expanduser().exists() or _looks_like_path(text):
        return Path(text).expanduser()
    return None


def load_model(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
) -> LoadedModel:
    """Load SeamlessM4T v2 from a hub id, a local directory, ``"organism"`` or ``random:<size>``.

    Args:
        source: ``"facebook/seamless-m4t-v2-large"`` (or any hub id), a directory written by
            ``save_pretrained`` or :func:`write_random_model_dir`, ``"organism"`` for the
            shipped model organism, or ``"random:tiny"`` / ``"random:large"``.
        device: ``None`` picks a GPU when available.
        dtype: ``auto`` (see :func:`resolve_dtype`) or a dtype name.
        revision: hub revision (branch, tag or commit); ignored for directories.

    Raises:
        ModelLoadError: one line naming the source and what is wrong with it.
    """
    text = str(source)
    if text.startswith(RANDOM_PREFIX):
        return build_random_model(text.removeprefix(RANDOM_PREFIX), device=device, dtype=dtype)
    path = _model_path(text)
    if path is not None:
        _check_model_dir(path)
        if (path / RANDOM_MARKER).is_file():
            return _load_random_dir(path, device=device, dtype=dtype, source=text)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    where = str(path) if path is not None else text
    try:
        model = SeamlessM4Tv2Model.from_pretrained(where, revision=revision, dtype=torch_dtype)
        processor = SeamlessM4TProcessor.from_pretrained(where, revision=revision)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load model {text!r}: {first}; without hub access pass a local directory"
        ) from err
    model = _prepare(model.to(dev))
    commit = getattr(model.config, "_commit_hash", None)
    rev = commit or revision or _local_revision(text, path)
    loaded = LoadedModel(
        model=model,
        processor=processor,
        source=text,
        revision=rev,
        lang_to_code_id=dict(model.generation_config.text_decoder_lang_to_code_id or {}),
    )
    check_vocabulary(loaded)
    return loaded


def _local_revision(text: str, path: Path | None) -> str:
    """A directory's provenance: its path; a URL's: the URL and its cache key (the digest of
    every object's ETag, crossmodal/store/inputs.py)."""
    if path is None:
        return "unknown"
    if is_url(text):
        return f"{text}#{path.name.rsplit('-', 1)[-1]}"
    return "local:" + str(path.resolve())


def check_vocabulary(loaded: LoadedModel) -> None:
    """The processor's tokens and the language tags must be ids of the model's vocabulary.

    Raises:
        ModelLoadError: one line with both sizes and the fix.
    """
    tokens = len(loaded.processor.tokenizer) if loaded.processor is not None else 0
    tags = max(loaded.lang_to_code_id.values(), default=-1) + 1
    check_vocabulary_sizes(loaded.source, loaded.model.config.vocab_size, tokens, tags)


def check_vocabulary_sizes(source: str, vocab: int, tokens: int, tags: int) -> None:
    """Refuse a tokenizer of ``tokens`` ids or language tags up to id ``tags - 1`` that a
    model of ``vocab`` ids cannot embed (the check of :func:`check_vocabulary`, from sizes).

    Raises:
        ModelLoadError: one line with the three sizes and the fix.
    """
    if tokens > vocab or tags > vocab:
        raise ModelLoadError(
            f"model {source!r} has a {vocab}-token vocabulary but its tokenizer has "
            f"{tokens} tokens and its language tags reach id {tags - 1}; save the model's own "
            "processor (processor.save_pretrained) into the directory"
        )


def _prepare(model: SeamlessM4Tv2Model) -> SeamlessM4Tv2Model:
    """Eval mode always: in train mode dropout and LayerDrop silently skip decoder layers."""
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_config(**overrides: Any) -> SeamlessM4Tv2Config:
    """A ~0.6M-parameter config with every v2 component, for fast tests on CPU."""
    params: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        encoder_layers=2,
        decoder_layers=2,
        speech_encoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        speech_encoder_intermediate_size=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        speech_encoder_attention_heads=4,
        conv_depthwise_kernel_size=5,
        adaptor_kernel_size=8,
        adaptor_stride=8,
        t2u_encoder_layers=1,
        t2u_decoder_layers=1,
        t2u_encoder_ffn_dim=64,
        t2u_decoder_ffn_dim=64,
        t2u_encoder_attention_heads=2,
        t2u_decoder_attention_heads=2,
        t2u_vocab_size=64,
        char_vocab_size=64,
        t2u_variance_predictor_embed_dim=64,
        t2u_variance_predictor_hidden_dim=32,
        unit_hifi_gan_vocab_size=64,
        unit_embed_dim=32,
        lang_embed_dim=16,
        spkr_embed_dim=16,
        upsample_initial_channel=32,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        vocoder_num_langs=4,
        vocoder_num_spkrs=2,
        max_position_embeddings=512,
        t2u_max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        speech_encoder_layerdrop=0.0,
        speech_encoder_dropout=0.0,
        adaptor_dropout=0.0,
    )
    params.update(overrides)
    return SeamlessM4Tv2Config(**params)


def large_config(**overrides: Any) -> SeamlessM4Tv2Config:
    """The shapes of ``facebook/seamless-m4t-v2-large`` (the config defaults), eval-ready."""
    params: dict[str, Any] = dict(
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, speech_encoder_layerdrop=0.0
    )
    params.update(overrides)
    return SeamlessM4Tv2Config(**params)


RANDOM_SIZES = {"tiny": tiny_config, "large": large_config}


def _random_generation_config(
    config: SeamlessM4Tv2Config, lang_ids: dict[str, int], max_new_tokens: int
) -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=max_new_tokens,
        text_decoder_lang_to_code_id=lang_ids,
    )


@contextmanager
def quiet_construction() -> Iterator[None]:
    """Build a model from its config without transformers' construction warnings: a
    SeamlessM4T v2 built from a config warns (at WARNING) that its decoder attention lacks
    ``layer_idx``, a warning about code paths ``generate`` does not take; loading a
    checkpoint does not print it, so a random-weight model's actors stay as quiet."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _random_model(
    config: SeamlessM4Tv2Config, seed: int, device: torch.device, dtype: torch.dtype
) -> SeamlessM4Tv2Model:
    """Weights drawn from ``seed``: the same on every call with the same config and device."""
    torch.manual_seed(seed)
    with torch.device(device), quiet_construction():
        return _prepare(SeamlessM4Tv2Model(config).to(dtype))


def build_random_model(
    size: str = "tiny",
    *,
    languages: Sequence[str] = ("eng", "deu", "spa", "fra", "jpn", "cmn"),
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "auto",
    max_new_tokens: int = 32,
    processor: bool = True,
) -> LoadedModel:
    """A randomly initialised SeamlessM4T v2 (no weights needed) ready for ``generate``.

    ``size="tiny"``: language tags take the last ids of the vocabulary and the processor is
    ``None`` (feed ``input_ids`` or features from :class:`SeamlessM4TFeatureExtractor`).
    ``size="large"`` has the real large shapes (~2.3B parameters) and the real-vocabulary
    processor of :mod:`crossmodal.model.processor` (built once into its cache; needs
    sentencepiece): every language tag of the real model at its real id; ``languages`` is
    ignored. ``processor=False`` skips the processor (the real tag ids stay): the GPU
    benchmark feeds token ids and features and runs with torch, transformers and numpy only.

    Raises:
        ValueError: for an unknown size.
    """
    if size not in RANDOM_SIZES:
        raise ValueError(f"size must be one of {sorted(RANDOM_SIZES)}, got {size!r}")
    config = RANDOM_SIZES[size]()
    dev = resolve_device(device)
    model = _random_model(config, seed, dev, resolve_dtype(dtype, dev))
    built = None
    if size == "large":
        from crossmodal.model.processor import language_ids, real_vocab_processor

        built = real_vocab_processor() if processor else None
        lang_ids = language_ids()
    else:
        first = config.vocab_size - len(languages)
        lang_ids = {lang: first + i for i, lang in enumerate(languages)}
    model.generation_config = _random_generation_config(config, lang_ids, max_new_tokens)
    return LoadedModel(
        model=model,
        processor=built,
        source=f"{RANDOM_PREFIX}{size}",
        revision=f"seed={seed}",
        lang_to_code_id=lang_ids,
    )


def write_random_model_dir(
    out_dir: str | os.PathLike[str], *, seed: int = 0, **overrides: Any
) -> Path:
    """A model directory with the real large shapes and random weights drawn on load.

    It holds ``config.json`` (:func:`large_config` with ``overrides``, e.g. fewer layers),
    ``generation_config.json`` with the real language-tag ids, the real-vocabulary processor
    and :data:`RANDOM_MARKER` instead of weights: a few MB instead of 9 GB, and every
    pipeline stage that reads a model directory (planner, language check, actors) reads it
    as it reads a real one. Weights are drawn on the CPU from ``seed``, so every actor of a
    run holds the same model.
    """
    from crossmodal.model.processor import language_ids, processor_dir

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = large_config(**overrides)
    config.save_pretrained(str(out))
    _random_generation_config(config, language_ids(), 256).save_pretrained(str(out))
    for item in processor_dir().iterdir():
        if item.is_file() and not item.name.startswith("real_vocab"):
            (out / item.name).write_bytes(item.read_bytes())
    (out / RANDOM_MARKER).write_text(json.dumps({"seed": seed}) + "\n")
    return out


def _load_random_dir(
    path: Path,
    *,
    device: str | torch.device | None,
    dtype: str | torch.dtype,
    source: str | None = None,
) -> LoadedModel:
    config = SeamlessM4Tv2Config.from_pretrained(str(path))
    seed = int(json.loads((path / RANDOM_MARKER).read_text())["seed"])
    dev = resolve_device(device)
    model = _random_model(config, seed, torch.device("cpu"), resolve_dtype(dtype, dev))
    model.generation_config = GenerationConfig.from_pretrained(str(path))
    loaded = LoadedModel(
        model=model.to(dev),
        processor=SeamlessM4TProcessor.from_pretrained(str(path)),
        source=str(path) if source is None or not is_url(source) else source,
        revision=f"random:seed={seed}",
        lang_to_code_id=dict(model.generation_config.text_decoder_lang_to_code_id or {}),
    )
    check_vocabulary(loaded)
    return loaded


def feature_extractor() -> SeamlessM4TFeatureExtractor:
    """The real feature extractor with its defaults (16 kHz, 80 mel bins, stride 2)."""
    return SeamlessM4TFeatureExtractor()
