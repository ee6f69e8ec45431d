"""Build the model organism from scratch: corpus -> tokenizer -> features -> training -> directory.

``build_organism(out_dir, seed)`` writes an ordinary Hugging Face model directory that
``SeamlessM4Tv2Model.from_pretrained`` and ``SeamlessM4TProcessor.from_pretrained`` load
with no extra set-up. The same seed (and thread count) gives bit-identical weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    SeamlessM4TProcessor,
    SeamlessM4Tv2Config,
    SeamlessM4Tv2Model,
)

from crossmodal.data.records import TARGET_SAMPLING_RATE
from crossmodal.organism.corpus import audio_seed
from crossmodal.organism.features import FastFeatureExtractor
from crossmodal.organism.grammar import ORGANISM_LANGUAGES, draw_sentence, lexicon, render
from crossmodal.organism.speech import synthesize
from crossmodal.organism.tokenizer import (
    SPM_FILE,
    build_processor,
    check_single_pieces,
    language_tokens,
    train_sentencepiece,
)
from crossmodal.organism.training import TrainConfig, TrainData, train

LEXICON_FILE = "organism_lexicon.json"
BUILD_FILE = "organism_build.json"
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class ModelShape:
    """The organism's size: one hidden width for every component, as in SeamlessM4T v2."""

    hidden: int = 96
    heads: int = 4
    text_encoder_layers: int = 2
    speech_encoder_layers: int = 1
    decoder_layers: int = 3
    ffn: int = 192
    decoder_ffn: int = 384
    adaptor_kernel: int = 2  # = stride, as the model's mask arithmetic assumes (v2-large: 8, 8)
    adaptor_stride: int = 2
    conv_kernel: int = 15


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on besides the seed."""

    n_train_sentences: int = 4000
    n_speech_sentences: int = 2000
    shape: ModelShape = field(default_factory=ModelShape)
    train: TrainConfig = field(default_factory=TrainConfig)
    threads: int = 1  # on a shared CPU, 2 torch threads spin-wait and run ~5x slower
    workers: int = 2  # processes synthesising speech


def model_config(vocab_size: int, shape: ModelShape) -> SeamlessM4Tv2Config:
    """A small SeamlessM4T v2 config; dropout and LayerDrop off so eval is deterministic."""
    h = shape.hidden
    return SeamlessM4Tv2Config(
        vocab_size=vocab_size,
        hidden_size=h,
        encoder_layers=shape.text_encoder_layers,
        decoder_layers=shape.decoder_layers,
        speech_encoder_layers=shape.speech_encoder_layers,
        encoder_ffn_dim=shape.ffn,
        decoder_ffn_dim=shape.decoder_ffn,
        speech_encoder_intermediate_size=shape.ffn,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        speech_encoder_attention_heads=shape.heads,
        conv_depthwise_kernel_size=shape.conv_kernel,
        adaptor_kernel_size=shape.adaptor_kernel,
        adaptor_stride=shape.adaptor_stride,
        max_position_embeddings=256,
        # speech generation is never used: keep those modules as small as they can be
        t2u_encoder_layers=0,
        t2u_decoder_layers=0,
        t2u_encoder_ffn_dim=32,
        t2u_decoder_ffn_dim=32,
        t2u_encoder_attention_heads=2,
        t2u_decoder_attention_heads=2,
        t2u_vocab_size=32,
        char_vocab_size=32,
        t2u_variance_predictor_embed_dim=h,
        t2u_variance_predictor_hidden_dim=16,
        t2u_max_position_embeddings=64,
        unit_hifi_gan_vocab_size=32,
        unit_embed_dim=16,
        lang_embed_dim=8,
        spkr_embed_dim=8,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        vocoder_num_langs=len(ORGANISM_LANGUAGES),
        vocoder_num_spkrs=1,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        speech_encoder_layerdrop=0.0,
        speech_encoder_dropout=0.0,
        adaptor_dropout=0.0,
        var_pred_dropout=0.0,
    )


def _features_chunk(args: tuple[int, int, int, str]) -> list[np.ndarray]:
    """Features of sentences [start, stop) of the train split in one language (a worker task)."""
    seed, start, stop, lang = args
    extractor = FastFeatureExtractor()
    out = []
    for index in range(start, stop):
        words = render(draw_sentence("train", index, seed), lang)
        wave = synthesize(words, lang, audio_seed(seed, "train", index, lang))
        feats = extractor(wave, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="np")
        out.append(feats["input_features"][0].astype(np.float16))
    return out


def _speech_features(n: int, seed: int, workers: int) -> dict[str, list[np.ndarray]]:
    chunk = 250
    tasks = [
        (seed, s, min(s + chunk, n), lang)
        for lang in ORGANISM_LANGUAGES
        for s in range(0, n, chunk)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_features_chunk, tasks))
    else:
        results = [_features_chunk(t) for t in tasks]
    features: dict[str, list[np.ndarray]] = {lang: [] for lang in ORGANISM_LANGUAGES}
    for (_, _, _, lang), feats in zip(tasks, results, strict=True):
        features[lang].extend(feats)
    return features


def _init_embeddings(model: SeamlessM4Tv2Model, seed: int) -> None:
    """Draw the tied embeddings with std ``hidden**-0.5`` instead of 0.02.

    ``lm_head`` shares them, so at 0.02 every logit starts near 0 and grows slowly: the
    loss then sits on a long plateau. At ``hidden**-0.5`` logits can be sharp from the start.
    """
    weight = model.shared.weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.normal_(0.0, weight.shape[1] ** -0.5, generator=generator)
        weight[model.config.pad_token_id].zero_()


def _generation_config(lang_ids: dict[str, int]) -> GenerationConfig:
    # An explicit config: one derived from the model config loses the language map on save.
    return GenerationConfig(
        decoder_start_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=1,
        do_sample=False,
        text_decoder_lang_to_code_id=lang_ids,
    )


def prepare_data(
    out_dir: Path, seed: int, cfg: BuildConfig, say: Callable[[str], None]
) -> tuple[SeamlessM4TProcessor, TrainData]:
    """Train the tokenizer into ``out_dir``; tokenise the training text, synthesise its speech."""
    sentences = [draw_sentence("train", i, seed) for i in range(cfg.n_train_sentences)]
    texts = {lang: [" ".join(render(s, lang)) for s in sentences] for lang in ORGANISM_LANGUAGES}
    train_sentencepiece([t for lang in ORGANISM_LANGUAGES for t in texts[lang]], out_dir)
    processor = build_processor(out_dir)
    tokenizer = processor.tokenizer
    check_single_pieces(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(language_tokens())
    lang_ids = dict(zip(ORGANISM_LANGUAGES, ids, strict=True))
    tokens = {lang: tokenizer(texts[lang], add_special_tokens=False)["input_ids"] for lang in texts}
    say(f"tokenizer: {len(tokenizer)} tokens")
    features = _speech_features(cfg.n_speech_sentences, seed, cfg.workers)
    return processor, TrainData(tokens, features, lang_ids)


def build_organism(
    out_dir: Path,
    seed: int = 0,
    config: BuildConfig | None = None,
    log: Callable[[str], None] | None = print,
    monitor: Callable[[int, SeamlessM4Tv2Model, SeamlessM4TProcessor], None] | None = None,
) -> Path:
    """Build the model organism into ``out_dir`` (created; existing files are overwritten).

    Args:
        out_dir: directory to write (config, weights, tokenizer, processor, lexicon).
        seed: corpus, initialisation and batch-order seed.
        config: sizes and training settings; default: the shipped organism.
        log: progress printer (``None`` for silence).
        monitor: called as ``monitor(step, model, processor)`` every ``log_every`` steps.

    Returns:
        ``out_dir``.
    """
    cfg = config or BuildConfig()
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)

    processor, data = prepare_data(out_dir, seed, cfg, say)
    say(
        f"data: {len(processor.tokenizer)} tokens, {6 * data.n_speech} clips ({time.perf_counter() - start:.0f} s)"
    )

    torch.manual_seed(seed)
    model = SeamlessM4Tv2Model(model_config(len(processor.tokenizer), cfg.shape))
    _init_embeddings(model, seed)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters")
    model.generation_config = _generation_config(data.lang_ids)
    watch = None if monitor is None else (lambda step, m: monitor(step, m, processor))
    losses = train(model, data, cfg.train, seed, log, watch)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / LEXICON_FILE).write_text(json.dumps(lexicon(), ensure_ascii=False, indent=1))
    info = {
        "seed": seed,
        "config": asdict(cfg),
        "n_parameters": n_params,
        "final_losses": np.mean(losses[-50:], axis=0).round(4).tolist() if losses else None,
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "spm_file": SPM_FILE,
    }
    (out_dir / BUILD_FILE).write_text(json.dumps(info, indent=1))
    say(f"saved to {out_dir} ({info['build_seconds']} s)")
    return out_dir


__all__ = ["BuildConfig", "ModelShape", "build_organism", "model_config"]
