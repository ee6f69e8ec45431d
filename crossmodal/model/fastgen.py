"""Greedy text generation for SeamlessM4T v2, faster than HF ``generate``, same tokens.

Why: collect and steer spend most of their time in greedy decoding, and HF ``generate`` on
``SeamlessM4Tv2Model`` always asks for ``output_hidden_states`` and ``output_scores`` (a float32
copy of ``[batch, vocab]`` logits kept for every step), builds logits processors and stopping
criteria, and waits for the device once per step. This loop does only what greedy needs:

  * the encoder runs once, and its output and attention mask are returned, so the capture
    engine's teacher-forced pass can reuse them instead of re-encoding;
  * each step calls the ``model.text_decoder`` *module* (so forward hooks and pre-hooks on it
    and on every submodule fire, with the same ``cache`` kwarg HF passes) and ``model.lm_head``;
  * tokens are written into a preallocated ``[batch, 2 + max_new_tokens]`` buffer;
  * the "every row has emitted EOS" test reads the device only every ``sync_every`` steps
    (default 1 on CPU, 8 on CUDA, where it lets the host queue work ahead of the GPU);
  * the cross-attention mask is made once per batch: the decoder would make it at every
    step, and with SDPA read ``encoder_attention_mask.all()`` from the device to do so, one
    host sync per step (the only other one; ``tests/test_fastgen.py`` counts them).

Invariants (tested against HF ``generate`` in tests/test_fastgen.py):
  * sequences are ``[decoder_start, lang_tag, tok1, ...]``, rows that emitted EOS are padded
    with ``pad_token_id`` (the decoder is fed pad for them, exactly as HF does), and the width
    is ``2 + the step at which the last row emitted EOS`` (or ``2 + max_new_tokens``), also
    when ``sync_every > 1`` made the loop run past that step;
  * ``min_new_tokens`` bans EOS before that many tokens, as HF's MinNewTokensLengthLogitsProcessor;
  * step 0 feeds ``[decoder_start, lang_tag]`` and applies ``lm_head`` to both positions, as HF.
With a :class:`CompiledStep` the same loop runs its one-token steps compiled, on static
caches (CUDA graphs on CUDA): the GPU check's compiled variant, not used by collect or steer.
Hooks on the top-level model (``model.forward``) do not fire: hook submodules instead.
Generation configs that add other logits processors (repetition penalty, n-gram bans, forced
tokens, ...) are refused, because their output would differ from plain greedy.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import SeamlessM4Tv2Model
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticLayer
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import SeamlessM4Tv2Decoder

from crossmodal.model.load import LoadedModel

# Generation-config fields that add a logits processor changing greedy argmax, with the value
# that means "off". ``min_new_tokens`` is supported natively and is not listed.
_OFF = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "min_length": (None, 0),
    "num_beams": (None, 1),
    "do_sample": (None, False),
    "guidance_scale": (None, 1.0),
}


# transformers 5.x renamed the decoder's ``past_key_values`` kwarg to ``cache`` (5.24 has both,
# older 5.x only the first); pass the name this version's decoder declares, as generate does.
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(SeamlessM4Tv2Decoder.forward).parameters
    else "past_key_values"
)


@dataclass(frozen=True)
class GreedyOutput:
    """What :func:`greedy_generate` returns; encoder tensors are reused by the capture pass.

    Attributes:
        sequences: ``[batch, 2 + steps]`` int64, ``[decoder_start, lang_tag, tok1, ...]``.
        encoder_hidden_states: ``[batch, frame, hidden]`` encoder output the decoder attended to.
        encoder_attention_mask: ``[batch, frame]`` (subsampled for speech) or ``None``.
        steps_run: decoder calls made (>= ``sequences.shape[1] - 2`` when ``sync_every > 1``).
        cross_cache: the decoder's cross-attention keys and values (``k_proj``/``v_proj`` of
            the encoder output, per layer ``[batch, heads, frame, head_dim]``), computed once
            at step 0; the capture's replay reuses them instead of projecting the frames again.
    """

    sequences: Tensor
    encoder_hidden_states: Tensor
    encoder_attention_mask: Tensor | None
    steps_run: int
    cross_cache: DynamicCache | None = None


def _unwrap(loaded_or_model: LoadedModel | SeamlessM4Tv2Model) -> SeamlessM4Tv2Model:
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    if not isinstance(model, SeamlessM4Tv2Model):
        raise ValueError(
            f"loaded_or_model must be one of [LoadedModel, SeamlessM4Tv2Model], got "
            f"{type(model).__name__!r}; load it with crossmodal.model.load.load_model"
        )
    return model


def _check_greedy_config(model: SeamlessM4Tv2Model) -> list[int]:
    """EOS ids of a generation config that plain greedy reproduces; refuse anything else."""
    gc = model.generation_config
    for name, off in _OFF.items():
        value = getattr(gc, name, None)
        if value not in off:
            raise ValueError(
                f"generation_config.{name} must be one of {list(off)}, got {value!r}; "
                "the fast path is plain greedy: use HF generate for this config"
            )
    eos = gc.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids or gc.pad_token_id is None or gc.decoder_start_token_id is None:
        raise ValueError(
            "generation_config must be one of [eos, pad and decoder_start token ids set], got "
            f"eos={eos!r}, pad={gc.pad_token_id!r}, start={gc.decoder_start_token_id!r}; "
            "assign a GenerationConfig like crossmodal.model.load.build_random_model does"
        )
    return eos_ids


def is_plain_greedy(loaded_or_model: LoadedModel | SeamlessM4Tv2Model) -> bool:
    """Whether the fast path reproduces this model's ``generate`` (its config is plain greedy)."""
    try:
        _check_greedy_config(_unwrap(loaded_or_model))
    except ValueError:
        return False
    return True


def lang_tag_ids(
    model: SeamlessM4Tv2Model, tgt_lang: str | Sequence[str], batch_size: int
) -> Tensor:
    """Decoder language-tag ids ``[batch]`` for one code (``deu``, ``__deu__``) or one per row."""
    table = getattr(model.generation_config, "text_decoder_lang_to_code_id", None) or {}
    codes = [tgt_lang] * batch_size if isinstance(tgt_lang, str) else list(tgt_lang)
    if len(codes) != batch_size:
        raise ValueError(
            f"tgt_lang must be one of [a code, {batch_size} codes (one per row)], got "
            f"{len(codes)} codes; pass one target language per row"
        )
    for code in codes:
        if code.replace("__", "") not in table:
            raise ValueError(
                f"tgt_lang must be one of {sorted(table)}, got {code!r}; pick a language the "
                "text decoder can write"
            )
    return torch.tensor([int(table[c.replace("__", "")]) for c in codes], dtype=torch.long)


def _encoder_inputs(batch: Mapping[str, Tensor]) -> tuple[str, Tensor, Tensor | None]:
    keys = [k for k in ("input_ids", "input_features") if batch.get(k) is not None]
    if len(keys) != 1:
        raise ValueError(
            f"batch must be one of [input_ids xor input_features (+ attention_mask)], got keys "
            f"{sorted(batch)!r}; pass the processor's output for one modality"
        )
    return keys[0], batch[keys[0]], batch.get("attention_mask")


def encode(
    loaded_or_model: LoadedModel | SeamlessM4Tv2Model, batch: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Run the text or speech encoder once, as HF ``generate`` does.

    Returns:
        ``(encoder_hidden_states [batch, frame, hidden], encoder_attention_mask [batch, frame])``;
        for speech the mask is subsampled to encoder frames, as ``SeamlessM4Tv2Model.forward``.
    """
    model = _unwrap(loaded_or_model)
    key, inputs, mask = _encoder_inputs(batch)
    dev = model.device
    mask = None if mask is None else mask.to(dev)
    with torch.no_grad():
        if key == "input_ids":
            hidden = model.text_encoder(input_ids=inputs.to(dev), attention_mask=mask)[0]
            return hidden, mask
        feats = inputs.to(device=dev, dtype=model.dtype)
        hidden = model.speech_encoder(input_features=feats, attention_mask=mask)[0]
        if mask is None:
            return hidden, None
        lengths = model._compute_sub_sample_lengths_from_attention_mask(mask).to(hidden.device)
        frames = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        enc_mask = hidden.new_ones(hidden.shape[:2]).masked_fill(frames >= lengths[:, None], 0)
        return hidden, enc_mask


def _check_lengths(max_new_tokens: int, min_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be one of [>= 1], got {max_new_tokens!r}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be one of [0..{max_new_tokens}], got {min_new_tokens!r}"
        )


def greedy_generate(
    loaded_or_model: LoadedModel | SeamlessM4Tv2Model,
    batch: Mapping[str, Tensor],
    tgt_lang: str | Sequence[str],
    max_new_tokens: int,
    *,
    min_new_tokens: int | None = None,
    encoder_outputs: tuple[Tensor, Tensor | None] | None = None,
    sync_every: int | None = None,
    compiled: CompiledStep | None = None,
) -> GreedyOutput:
    """Greedy-decode text; the same sequences as ``model.generate(..., generate_speech=False)``.

    Args:
        loaded_or_model: a :class:`LoadedModel` or a ``SeamlessM4Tv2Model`` in eval mode.
        batch: ``input_ids`` or ``input_features``, plus ``attention_mask`` (padded batches).
        tgt_lang: output language code (``deu``), or one code per row.
        max_new_tokens: most generated tokens after ``[decoder_start, lang_tag]``.
        min_new_tokens: EOS is banned before this many tokens (benchmarks set it to
            ``max_new_tokens`` so every row runs every step); ``None``: the generation
            config's ``min_new_tokens``, as HF ``generate``.
        encoder_outputs: ``(hidden, mask)`` from :func:`encode`, to skip the encoder.
        sync_every: read "all rows finished" from the device every this many steps.
        compiled: a :class:`CompiledStep` to decode the one-token steps with (bare
            decoding: the GPU check); the output then has no ``cross_cache``.

    Raises:
        ValueError: bad sizes, unknown ``tgt_lang``, or a non-greedy generation config.
    """
    model = _unwrap(loaded_or_model)
    if min_new_tokens is None:
        min_new_tokens = model.generation_config.min_new_tokens or 0
    _check_lengths(max_new_tokens, min_new_tokens)
    eos_ids = _check_greedy_config(model)
    hidden, enc_mask = encode(model, batch) if encoder_outputs is None else encoder_outputs
    dev = hidden.device
    tags = lang_tag_ids(model, tgt_lang, hidden.shape[0]).to(dev)
    if sync_every is None:
        sync_every = 8 if dev.type == "cuda" else 1
    if sync_every < 1:
        raise ValueError(f"sync_every must be one of [>= 1], got {sync_every!r}")
    gc = model.generation_config
    eos = torch.tensor(eos_ids, device=dev)
    with torch.no_grad():
        tokens, steps, cache = _decode(
            model,
            hidden,
            enc_mask,
            tags,
            start=gc.decoder_start_token_id,
            pad=gc.pad_token_id,
            eos=eos,
            max_new=max_new_tokens,
            min_new=min_new_tokens,
            sync_every=sync_every,
            compiled=compiled,
        )
        width = _trimmed_width(tokens, eos, max_new_tokens)
    return GreedyOutput(tokens[:, :width].clone(), hidden, enc_mask, steps, cache)


def _decode(
    model: SeamlessM4Tv2Model,
    hidden: Tensor,
    enc_mask: Tensor | None,
    tags: Tensor,
    start: int,
    pad: int,
    eos: Tensor,
    max_new: int,
    min_new: int,
    sync_every: int,
    compiled: CompiledStep | None = None,
) -> tuple[Tensor, int, DynamicCache | None]:
    """The decode loop: ``tokens [batch, 2 + max_new]`` (pad after the last step run), the
    steps run and the cross-attention cache (``None`` with ``compiled``)."""
    batch = hidden.shape[0]
    dec, head = model.text_decoder, model.lm_head
    tokens = torch.full((batch, 2 + max_new), pad, dtype=torch.long, device=hidden.device)
    tokens[:, 0], tokens[:, 1] = start, tags
    unfinished = torch.ones(batch, dtype=torch.bool, device=hidden.device)
    pad_t = torch.tensor(pad, dtype=torch.long, device=hidden.device)
    # config-free caches: no sliding-window layers here, and building them from the config
    # deep-copies it (~2 ms per call)
    if compiled is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    else:
        cache = compiled.cache(hidden, 2 + max_new)
    cross_masks = {q: _cross_attention_mask(dec, hidden, enc_mask, q) for q in (2, 1)}
    step_input = tokens[:, :2]
    for step in range(max_new):
        cross_mask = cross_masks[step_input.shape[1]]
        if compiled is None or step == 0:
            logits = _next_logits(dec, head, step_input, hidden, cross_mask, cache)
        else:
            logits = compiled.step(step_input, hidden, cross_mask, cache)
        if step < min_new:
            logits = logits.index_fill(1, eos, float("-inf"))
        nxt = torch.where(unfinished, _argmax(logits), pad_t)
        tokens[:, 2 + step] = nxt
        unfinished &= ~torch.isin(nxt, eos)
        if (step + 1) % sync_every == 0 and not bool(unfinished.any()):
            break
        step_input = tokens[:, 2 + step : 3 + step]
    return tokens, step + 1, None if compiled is not None else cache.cross_attention_cache


def _next_logits(
    dec: SeamlessM4Tv2Decoder,
    head: torch.nn.Module,
    step_input: Tensor,
    hidden: Tensor,
    cross_mask: Tensor | None,
    cache: EncoderDecoderCache,
) -> Tensor:
    """One decoder call on ``step_input`` (extending ``cache``): the last position's logits."""
    out = dec(
        input_ids=step_input,
        encoder_hidden_states=hidden,
        encoder_attention_mask=cross_mask,
        use_cache=True,
        **{CACHE_KWARG: cache},
    )
    return head(out[0])[:, -1]


def _one_token_logits(
    dec: SeamlessM4Tv2Decoder,
    head: torch.nn.Module,
    step_input: Tensor,
    hidden: Tensor,
    cross_mask: Tensor | None,
    cache: EncoderDecoderCache,
) -> Tensor:
    """:func:`_next_logits` with the decoder's forward written out from its own modules, in
    its order: what :class:`CompiledStep` compiles.

    Why: the forward itself traces as one graph only from transformers 5.24. Before (5.17
    is the GPU image's version), its position table checks on the host a length that a
    static cache keeps on the device, and its output-capturing wrapper iterates a dict,
    which dynamo cannot trace: 13 graphs for the organism's step instead of 1, and at 24
    layers dynamo's recompile limit sends attention back to eager. Here the table is read
    without the check (:meth:`CompiledStep.cache` grows it beforehand) and the wrapper,
    which only collects outputs nobody asked for, is skipped. The cache and masks go in
    positionally: their keyword is ``cache`` or ``past_key_values`` depending on the version.
    Equal to :func:`_next_logits` bit for bit (tests/test_fastgen.py).
    """
    embeds = dec.embed_tokens(step_input)
    self_mask = create_causal_mask(dec.config, embeds, None, cache)
    table = dec.embed_positions
    ids = table.create_position_ids_from_input_ids(
        step_input, table.padding_idx, cache.get_seq_length()
    )
    positions = table.weights.index_select(0, ids.view(-1)).view(*step_input.shape, -1)
    h = embeds + positions.to(embeds.device)
    h = torch.nn.functional.dropout(h, p=dec.dropout, training=dec.training)
    for layer in dec.layers:
        h = layer(h, self_mask, hidden, cross_mask, cache, True)
    return head(dec.layer_norm(h))[:, -1]


class CompiledStep:
    """The one-token decode step under ``torch.compile``, with static caches.

    Why: on a GPU a decode step of the real model is launch-bound (each layer's kernels are
    launched from Python at every step); CUDA graphs replay a step's kernels as one launch,
    which ``torch.compile(mode="reduce-overhead")`` records (the default on CUDA; elsewhere
    ``"default"``). Graphs replay into fixed addresses, so the caches here persist per input
    shape and are reset in place for each batch: the self-attention cache holds
    ``length`` positions (transformers' ``StaticLayer``: its length is a device tensor, so
    one graph serves every step) and the cross-attention keys and values, filled by each
    batch's first (eager) step, are static buffers too. One compile with dynamic shapes
    serves every (batch, frames, length) (about 20 s on CPU for the organism; on CUDA each
    new shape records its graph); static shapes would compile again for each. Fused kernels
    may round differently from eager: ``crossmodal bench`` reports whether the tokens are
    the same. The step runs on a hook-free view of the decoder (:func:`_without_hooks`),
    written out so that it traces as one graph on transformers 5.17 (the GPU image's) as on
    5.24 (:func:`_one_token_logits`). Tested on CPU (inductor); the CUDA-graph mode has not
    run on a GPU yet (docs/benchmarks.md, "The GPU check").
    """

    def __init__(self, loaded_or_model: LoadedModel | SeamlessM4Tv2Model, mode: str | None = None):
        self.model = _unwrap(loaded_or_model)
        self.mode = mode or ("reduce-overhead" if self.model.device.type == "cuda" else "default")
        self.decoder = _without_hooks(self.model.text_decoder)
        self.head = _without_hooks(self.model.lm_head)
        self.function = torch.compile(_one_token_logits, mode=self.mode, dynamic=True)
        self._caches: dict[tuple[int, ...], EncoderDecoderCache] = {}

    def step(
        self, step_input: Tensor, hidden: Tensor, cross_mask: Tensor | None, cache: Cache
    ) -> Tensor:
        """One compiled one-token step (after the eager first step filled ``cache``).

        ``step_input`` goes in as a fresh tensor: the loop's is a column of its token buffer,
        whose storage offset (2 at the first compiled step) dynamo's duck sizing would tie
        to any size that happens to be equal (2 rows), and the next step would compile again.
        """
        step_input = step_input.clone()
        return self.function(self.decoder, self.head, step_input, hidden, cross_mask, cache)

    def cache(self, hidden: Tensor, length: int) -> EncoderDecoderCache:
        """The reset caches for a batch of ``hidden [batch, frames, width]`` and ``length``
        decoder positions."""
        key = (*hidden.shape[:2], length)
        # the position table grows here, eagerly, if ``length`` needs it: the compiled step
        # reads it without the decoder's check (positional arguments: the last one's name
        # changed between versions)
        table = self.decoder.embed_positions  # its buffers are the model's
        table(torch.ones((1, 1), dtype=torch.long, device=hidden.device), None, length)
        if key not in self._caches:
            n = len(self.model.text_decoder.layers)
            self._caches[key] = EncoderDecoderCache(
                Cache(layers=[StaticLayer(max_cache_len=length) for _ in range(n)]),
                Cache(layers=[StaticLayer(max_cache_len=hidden.shape[1]) for _ in range(n)]),
            )
        cache = self._caches[key]
        cache.reset()
        return cache


def _without_hooks(module: torch.nn.Module) -> torch.nn.Module:
    """A view of ``module``'s tree: the same parameters and buffers, no forward hooks.

    Why: HF ``generate`` installs output-capturing hooks on the decoder's layers and
    attention modules (idle unless outputs are asked for). They read a ``ContextVar``, which
    dynamo cannot trace (5.24 works around it inside the decoder's forward wrapper, which
    :func:`_one_token_logits` skips): each would split the compiled step's graph. The
    compiled step is bare decoding, so it runs on this view, where no hook of the model
    fires.
    """
    view = copy.copy(module)
    view.__dict__["_forward_hooks"] = OrderedDict()
    view.__dict__["_forward_pre_hooks"] = OrderedDict()
    view.__dict__["_modules"] = {
        name: None if child is None else _without_hooks(child)
        for name, child in module._modules.items()
    }
    return view


def _cross_attention_mask(
    dec: SeamlessM4Tv2Decoder, hidden: Tensor, enc_mask: Tensor | None, q_length: int
) -> Tensor | None:
    """The decoder's cross-attention mask for ``q_length`` query positions, made once per
    batch with the decoder's own function: the same mask (or ``None`` when SDPA needs none)
    that the decoder would make from ``enc_mask`` at every step, reading ``enc_mask.all()``
    from the device each time. The decoder passes a prepared 4D mask (or ``None``) through."""
    if enc_mask is None:
        return None
    return create_bidirectional_mask(
        config=dec.config,
        inputs_embeds=hidden.new_zeros((hidden.shape[0], q_length, 1)),  # shape, dtype, device
        attention_mask=enc_mask,
        encoder_hidden_states=hidden,
    )


def _argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)``; on CPU float32/64 by numpy, 7x faster at ``[32, 1507]`` (first
    maximum, NaN counted as the maximum: the same index as torch)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(dim=-1)


def _trimmed_width(tokens: Tensor, eos: Tensor, max_new: int) -> int:
    """HF's width: 2 + the step at which the last row emitted its first EOS, else the max."""
    gen = tokens[:, 2:]
    is_eos = torch.isin(gen, eos)
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.int().argmax(dim=1) + 1, max_new)
    return 2 + int(first.max())


def hf_generate(
    loaded_or_model: LoadedModel | SeamlessM4Tv2Model,
    batch: Mapping[str, Tensor],
    tgt_lang: str | Sequence[str],
    max_new_tokens: int,
    *,
    min_new_tokens: int | None = None,
) -> Tensor:
    """The baseline: HF ``generate`` (greedy, text only); returns ``sequences``."""
    model = _unwrap(loaded_or_model)
    key, inputs, mask = _encoder_inputs(batch)
    dev = model.device
    kwargs = {key: inputs.to(dev) if key == "input_ids" else inputs.to(dev, model.dtype)}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(dev)
    # one tag per row goes in as decoder_input_ids; generate prepends decoder_start
    kwargs["decoder_input_ids"] = lang_tag_ids(model, tgt_lang, inputs.shape[0]).to(dev)[:, None]
    out = model.generate(
        **kwargs,
        generate_speech=False,
        num_beams=1,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        **({} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}),
    )
    return out.sequences
