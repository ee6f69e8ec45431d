"""Multi-task training of the organism on CPU: text and speech translation, and ASR.

Every step trains one text batch and one speech batch through the real model components
(``text_encoder`` / ``speech_encoder`` -> ``text_decoder`` -> ``lm_head``), with the decoder
prefix ``[</s>, __tgt__]`` that ``generate(tgt_lang=...)`` uses. The speech encoder also gets
an auxiliary CTC loss (see :func:`_ctc_loss`). Text batches are half
x2en, half en2x; speech batches mix asr, x2en and en2x (see :meth:`_Sampler.speech`).

Determinism: one seeded numpy generator draws every batch, torch is seeded and set to
deterministic algorithms with a fixed thread count, so a seed gives the same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SeamlessM4Tv2Model

from crossmodal.organism.grammar import ORGANISM_LANGUAGES

IGNORE = -100
EOS, PAD, DECODER_START = 3, 0, 3
CTC_BLANK = 1  # <unk>: never a target, so free to serve as the CTC blank


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the shipped organism)."""

    steps: int = 3000
    batch_text: int = 32
    batch_speech: int = 48
    lr: float = 3e-3
    warmup: int = 150
    hold: float = 0.6  # share of the steps at full learning rate before the cosine decay
    weight_decay: float = 0.01
    clip: float = 1.0
    log_every: int = 250
    ctc_weight: float = 0.5


@dataclass
class TrainData:
    """Tokenised text and speech features of the training sentences.

    Attributes:
        tokens: ``{lang: [token ids of sentence i]}`` without special tokens.
        features: ``{lang: [float16 features (frames, 160) of sentence i]}``.
        lang_ids: ``{lang: id of its __lang__ token}``.
    """

    tokens: dict[str, list[list[int]]]
    features: dict[str, list[np.ndarray]]
    lang_ids: dict[str, int]

    @property
    def n_text(self) -> int:
        return len(next(iter(self.tokens.values())))

    @property
    def n_speech(self) -> int:
        """Speech exists for the first ``n_speech`` sentences (synthesis is the costly part)."""
        return len(next(iter(self.features.values())))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _targets(
    data: TrainData, idx: list[int], langs: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs ``[</s>, __tgt__, w1..wn]`` and labels ``[-, w1..wn, </s>]``."""
    seqs = [data.tokens[lang][i] for i, lang in zip(idx, langs, strict=True)]
    inputs = [[DECODER_START, data.lang_ids[lang], *s] for s, lang in zip(seqs, langs, strict=True)]
    labels = [[IGNORE, *s, EOS] for s in seqs]
    return _pad(inputs, PAD), _pad(labels, IGNORE)


def _text_inputs(
    data: TrainData, idx: list[int], langs: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs as the processor makes them: ``[__src__, w1..wn, </s>]``."""
    rows = [
        [data.lang_ids[lang], *data.tokens[lang][i], EOS]
        for i, lang in zip(idx, langs, strict=True)
    ]
    ids = _pad(rows, PAD)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        mask[r, : len(row)] = 1
    return ids, mask


def _speech_inputs(
    data: TrainData, idx: list[int], langs: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    feats = [data.features[lang][i] for i, lang in zip(idx, langs, strict=True)]
    width = max(f.shape[0] for f in feats)
    out = np.zeros((len(feats), width, feats[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(feats), width), dtype=np.int64)
    for r, f in enumerate(feats):
        out[r, : f.shape[0]] = f
        mask[r, : f.shape[0]] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def _decode_loss(
    model: SeamlessM4Tv2Model,
    encoded: torch.Tensor,
    enc_mask: torch.Tensor,
    dec_in: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    hidden = model.text_decoder(
        input_ids=dec_in,
        encoder_hidden_states=encoded,
        encoder_attention_mask=enc_mask,
        use_cache=False,
    ).last_hidden_state
    logits = model.lm_head(hidden)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def _speech_encode(
    model: SeamlessM4Tv2Model, feats: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = model.speech_encoder(input_features=feats, attention_mask=mask).last_hidden_state
    lengths = model._compute_sub_sample_lengths_from_attention_mask(mask)
    positions = torch.arange(encoded.shape[1])[None, :]
    return encoded, (positions < lengths[:, None]).long()


def _ctc_loss(
    model: SeamlessM4Tv2Model,
    encoded: torch.Tensor,
    enc_mask: torch.Tensor,
    targets: list[list[int]],
) -> torch.Tensor:
    """CTC of the speech encoder output, read through the (tied) ``lm_head``, against the transcript.

    An auxiliary loss for training only, with no extra parameters: it gives the speech
    encoder a direct, monotonic word-recognition signal, without which attention-based
    speech training sits on a long plateau.
    """
    # The embeddings are read, not trained, here: CTC must not pull the text side around.
    logits = F.linear(encoded, model.lm_head.weight.detach())
    log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)  # (frame, batch, vocab)
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long)
    target_lengths = torch.tensor([len(row) for row in targets], dtype=torch.long)
    return F.ctc_loss(
        log_probs, flat, enc_mask.sum(1), target_lengths, blank=CTC_BLANK, zero_infinity=True
    )


class _Sampler:
    """Draws the sentences, languages and tasks of each batch from one seeded generator."""

    def __init__(self, data: TrainData, seed: int):
        self.rng = np.random.default_rng([seed, 7])
        self.n_text, self.n_speech = data.n_text, data.n_speech
        self.others = [lang for lang in ORGANISM_LANGUAGES if lang != "eng"]

    def _sentences(self, k: int, n: int) -> list[int]:
        return [int(i) for i in self.rng.integers(n, size=k)]

    def _other(self) -> str:
        return self.others[int(self.rng.integers(len(self.others)))]

    def text(self, k: int) -> tuple[list[int], list[str], list[str]]:
        """Half x2en (X -> eng), half en2x (eng -> X)."""
        idx, src, tgt = self._sentences(k, self.n_text), [], []
        for r in range(k):
            x = self._other()
            src.append(x if r % 2 == 0 else "eng")
            tgt.append("eng" if r % 2 == 0 else x)
        return idx, src, tgt

    def speech(self, k: int) -> tuple[list[int], list[str], list[str]]:
        """One target per clip, each of the 16 speech conditions ~6% of clips (ASR eng 10%).

        English clips (40%) are translated (en2x) three times in four, other clips (60%)
        are translated to English (x2en) or transcribed (asr) half and half.
        """
        idx, src, tgt = self._sentences(k, self.n_speech), [], []
        for _ in range(k):
            lang = "eng" if self.rng.random() < 0.4 else self._other()
            translate = self.rng.random() < (0.75 if lang == "eng" else 0.5)
            src.append(lang)
            tgt.append((self._other() if lang == "eng" else "eng") if translate else lang)
        return idx, src, tgt


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        decay_start = max(cfg.warmup, int(cfg.hold * cfg.steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, cfg.steps - decay_start)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(
    model: SeamlessM4Tv2Model,
    data: TrainData,
    cfg: TrainConfig,
    seed: int,
    log: Callable[[str], None] | None = print,
    monitor: Callable[[int, SeamlessM4Tv2Model], None] | None = None,
) -> list[list[float]]:
    """Train ``model`` in place; returns the (text, speech, ctc) losses of every step.

    Only the text/speech encoders, the text decoder and the shared embeddings are trained;
    the (unused) speech-generation modules keep their initial weights. The model is left
    in eval mode.
    """
    torch.manual_seed(seed)
    sampler = _Sampler(data, seed)
    params = [p for n, p in model.named_parameters() if not n.startswith(("t2u_model", "vocoder"))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        idx, src, tgt = sampler.text(cfg.batch_text)
        ids, mask = _text_inputs(data, idx, src)
        encoded = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        loss_text = _decode_loss(model, encoded, mask, *_targets(data, idx, tgt))

        idx, src, tgt = sampler.speech(cfg.batch_speech)
        encoded, enc_mask = _speech_encode(model, *_speech_inputs(data, idx, src))
        loss_speech = _decode_loss(model, encoded, enc_mask, *_targets(data, idx, tgt))
        transcripts = [data.tokens[lang][i] for i, lang in zip(idx, src, strict=True)]
        loss_ctc = (
            _ctc_loss(model, encoded, enc_mask, transcripts)
            if cfg.ctc_weight > 0
            else torch.zeros(())
        )

        loss = loss_text + loss_speech + cfg.ctc_weight * loss_ctc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        losses.append([float(x.detach()) for x in (loss_text, loss_speech, loss_ctc)])
        if (step + 1) % cfg.log_every == 0:
            if log is not None:
                text, speech, ctc = np.mean(losses[-cfg.log_every :], axis=0)
                log(
                    f"step {step + 1}/{cfg.steps} loss text {text:.3f} speech {speech:.3f} "
                    f"ctc {ctc:.3f} ({time.perf_counter() - start:.0f} s)"
                )
            if monitor is not None:
                model.eval()
                monitor(step + 1, model)
                model.train()
    model.eval()
    return losses
