"""Per-step capture: one teacher-forced decoder pass gives every step's unit values.

For a batch of ONE (task, modality, language) condition, :meth:`Capturer.run`:
  1. encodes once (speech or text encoder), with the encoder-family hooks and, for speech,
     the padding guard (last invariant);
  2. greedy-generates from that encoder output with no hooks attached (HF ``generate`` or
     :mod:`crossmodal.model.fastgen`), text only, ``num_beams=1``;
  3. runs ``text_decoder`` ONCE, teacher-forced, over ``sequences[:, :T]`` with hooks that
     reduce each output ``[batch, position, feature]`` at once to ``[batch, step, feature]``
     and write it into a preallocated float32 buffer ``[batch, step, unit]`` per pooling.

Invariants (tested in tests/test_capture.py against :mod:`crossmodal.model.reference`):
  * step ``t`` is decoder position ``t``: input ``sequences[:, t]``, predicting
    ``sequences[:, t + 1]``, the t-th generated token after ``[</s>, lang_tag]``.
    ``prefix_mean`` is the mean over positions ``0..t`` (the reference study's value), ``last``
    the value at position ``t``. The decoder is causal, so the teacher-forced pass equals the
    per-step states of generation and the per-prefix re-runs of the reference procedure.
  * row ``b`` contributes to step ``t`` only if its output had not ended before ``t``: no EOS
    (or pad) among its first ``t - 1`` generated tokens, and ``t <= generated length`` (a row
    cut by ``max_new_tokens`` also ends). Left-out rows are NaN in ``buffers``, absent from
    ``values`` and counted in ``n_ended``.
  * cross-attention ``k_proj``/``v_proj`` run on encoder frames: their value is the mean over
    the row's real (sub-sampled, for speech) frames, the same for every step and pooling, as
    is every encoder-family value (mean over real input positions). Sites of the encoder the
    batch does not use stay NaN.
  * every decoder site fires exactly once in the replay and every site of the used encoder
    exactly as often as the index says (the adapter GLU twice); anything else raises.
  * hooks live only inside :func:`attached`, which removes them in ``finally``: after a run or
    an exception the model has no hook left. No state survives a run.
  * values are float32 whatever the model dtype: prefix sums in fp16/bf16 lose digits.
  * speech batches run (encoder, generation and replay) under
    :func:`crossmodal.model.inputs.padding_guard` (HF's speech adapter otherwise reads padded
    frames), so batched values equal unbatched ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from crossmodal.data.languages import validate_language
from crossmodal.model.inputs import FrameMasks, ModelBatch, padding_guard, speech_lengths
from crossmodal.model.load import LoadedModel
from crossmodal.model.units import Site, UnitIndex

POOLINGS = ("prefix_mean", "last")
REFERENCE_STEPS = (1, 6, 11)
GENERATORS = ("auto", "hf", "fast")
Hook = Callable[[nn.Module, tuple, Tensor], Tensor | None]


@contextmanager
def attached(hooks: Iterable[tuple[nn.Module, Hook]]) -> Iterator[None]:
    """Register forward hooks for the duration of the block; always remove them."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_steps(steps: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique non-negative steps.

    Raises:
        ValueError: empty, negative, non-integer or repeated steps.
    """
    out = tuple(steps)
    if not out or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in out):
        raise ValueError(f"steps must be one of [non-empty ints >= 0], got {out!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"steps must be one of [distinct ints], got {out!r}; drop the repeats")
    return tuple(sorted(out))


def end_token_ids(model: nn.Module) -> list[int]:
    """Tokens that end an output: the generation config's EOS ids and pad."""
    gc = model.generation_config
    eos = gc.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return [*ids, gc.pad_token_id]


def step_validity(sequences: Tensor, steps: Sequence[int], end_ids: Sequence[int]) -> Tensor:
    """``[batch, step]`` bool: may row ``b`` contribute to step ``t`` (see module invariants)?"""
    gen = sequences[:, 2:]
    ends = torch.isin(gen, torch.as_tensor(list(end_ids), device=gen.device))
    n_gen = gen.shape[1]
    first_end = torch.where(ends.any(dim=1), ends.int().argmax(dim=1), n_gen)
    t = torch.as_tensor(list(steps), device=gen.device)
    return (t[None, :] - 1 <= first_end[:, None]) & (t[None, :] <= n_gen)


def generated_tokens(sequences: Tensor, end_ids: Sequence[int]) -> list[list[int]]:
    """Each row's generated tokens before its first EOS/pad."""
    out = []
    for row in sequences[:, 2:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in end_ids), len(row))
        out.append(row[:cut])
    return out


class _Values(Mapping):
    """``values[(pooling, step)] -> [rows, unit]``: a lazy view of the buffers."""

    def __init__(self, result: CaptureResult) -> None:
        self._r = result

    def __getitem__(self, key: tuple[str, int]) -> Tensor:
        pooling, step = key
        si = self._r.steps.index(step)
        return self._r.buffers[pooling][self._r.rows[step], si]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((p, t) for p in self._r.poolings for t in self._r.steps)

    def __len__(self) -> int:
        return len(self._r.poolings) * len(self._r.steps)


@dataclass
class CaptureResult:
    """What one :meth:`Capturer.run` gives.

    Attributes:
        index: the unit index (columns of every value tensor).
        steps, poolings: as requested.
        sequences: ``[batch, 2 + n]`` generated ids ``[</s>, lang, tok1, ...]``, pad after EOS.
        tokens: generated ids per row, before EOS.
        decode: turns ``tokens`` into :attr:`texts` (decoded on first access: collect keeps
            only a few, and decoding every batch costs ~1% of a small model's capture).
        buffers: pooling -> ``[batch, step, unit]`` float32 on the model's device, NaN where a
            row is left out of a step (and on the unused encoder's sites).
        valid: ``[batch, step]`` bool, rows that contribute to each step.
        ids, languages: of the batch rows.
    """

    index: UnitIndex
    steps: tuple[int, ...]
    poolings: tuple[str, ...]
    sequences: Tensor
    tokens: list[list[int]]
    decode: Callable[[list[list[int]]], list[str]] = field(repr=False)
    buffers: dict[str, Tensor]
    valid: Tensor
    ids: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    rows: dict[int, Tensor] = field(init=False)
    n_ended: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        # one device -> host copy, not two syncs per step (nonzero and the count, on a GPU)
        valid, dev = self.valid.cpu(), self.valid.device
        self.rows = {t: valid[:, i].nonzero().flatten().to(dev) for i, t in enumerate(self.steps)}
        self.n_ended = {t: int((~valid[:, i]).sum()) for i, t in enumerate(self.steps)}

    @cached_property
    def texts(self) -> list[str]:
        """Decoded generations (special tokens stripped); without a processor the token ids
        joined by spaces."""
        return self.decode(self.tokens)

    @property
    def values(self) -> Mapping[tuple[str, int], Tensor]:
        """``values[(pooling, step)]``: ``[rows[step], unit]`` float32."""
        return _Values(self)


class _Recorder:
    """One run's hook state: how often each module fired, and the reduction kernels."""

    def __init__(self, buffers: dict[str, Tensor], steps: Sequence[int]) -> None:
        self.buffers = buffers
        self.dev = next(iter(buffers.values())).device
        self.steps = torch.as_tensor(list(steps), device=self.dev)
        self.calls: dict[str, int] = {}
        self.positions: Tensor | None = None  # decoder position gathered for each step
        self.bounds: list[int] = []  # positions[j] + 1, as Python ints
        self.masks = FrameMasks(self.dev)
        self.fns: dict[str, Hook] = {}  # module path -> its hook, to feed it a cached output

    def hooks(
        self, modules: Mapping[str, nn.Module], sites: Sequence[Site]
    ) -> list[tuple[nn.Module, Hook]]:
        """One hook per module; a module that runs k times per pass owns k sites, in order.

        ``modules``: ``dict(model.named_modules())`` (walking the model costs ~0.5 ms).
        """
        by_module: dict[str, list[Site]] = {}
        for site in sites:
            by_module.setdefault(site.module_path, []).append(site)
        self.fns.update({path: self._hook(path, calls) for path, calls in by_module.items()})
        return [(modules[path], self.fns[path]) for path in by_module]

    def feed(self, path: str, out: Tensor) -> None:
        """Record ``out`` as an output of ``path``, as if the module had run (when hooked)."""
        if path in self.fns:
            self.fns[path](None, (), out)

    def _hook(self, path: str, calls: list[Site]) -> Hook:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            n = self.calls.get(path, 0)
            if n >= len(calls):
                raise RuntimeError(
                    f"module {path!r} ran {n + 1} times in one pass, expected {len(calls)}; "
                    "the capture assumes a fixed number of calls per forward"
                )
            self.calls[path] = n + 1
            self._reduce(calls[n], out)

        return hook

    def check_fired(self, sites: Sequence[Site], what: str) -> None:
        """Raise unless every site fired exactly once in this pass (e.g. a skipped layer)."""
        expected: dict[str, int] = {}
        for site in sites:
            expected[site.module_path] = expected.get(site.module_path, 0) + 1
        wrong = [p for p, n in expected.items() if self.calls.get(p, 0) != n]
        if wrong:
            raise RuntimeError(
                f"{len(wrong)} modules did not run as expected in the {what} pass, e.g. "
                f"{wrong[:3]}; put the model in eval mode (LayerDrop skips layers in train mode)"
            )

    def _write_every_step(self, site: Site, value: Tensor) -> None:
        sl = slice(site.offset, site.offset + site.n_features)
        for buf in self.buffers.values():
            buf[:, :, sl] = value[:, None, :]

    def _reduce(self, site: Site, out: Tensor) -> None:
        x = out.float()
        if site.channels_first:
            x = x.transpose(1, 2)
        if site.positions == "decoder":
            # Written straight into the buffers (no temporaries): ``last`` gathers the steps'
            # positions; ``prefix_mean`` holds prefix *sums* until the run divides them.
            sl = slice(site.offset, site.offset + site.n_features)
            if "last" in self.buffers:
                torch.index_select(x, 1, self.positions, out=self.buffers["last"][:, :, sl])
            if "prefix_mean" in self.buffers:
                buf = self.buffers["prefix_mean"]
                for j, end in enumerate(self.bounds):
                    torch.sum(x[:, :end], dim=1, out=buf[:, j, sl])
            return
        mask = self.masks.get(site.positions, site.subsample, x.shape[1], site.name)
        mean = (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1)[:, None]
        self._write_every_step(site, mean)


class Capturer:
    """Captures unit values per generation step for batches of one condition.

    Example::

        cap = Capturer(loaded, families=("decoder",), steps=(1, 6, 11), max_new_tokens=32)
        res = cap.run(make_batch(records, "speech", loaded), tgt_lang="eng")
        res.values[("prefix_mean", 6)]   # [rows valid at step 6, cap.index.n_units]
    """

    def __init__(
        self,
        loaded: LoadedModel,
        families: str | Iterable[str] = ("decoder",),
        steps: Iterable[int] = REFERENCE_STEPS,
        poolings: Iterable[str] = POOLINGS,
        max_new_tokens: int | None = None,
        *,
        generator: str = "auto",
        pad_guard: bool = True,
    ) -> None:
        """Args:
            loaded: the model (eval mode) and its processor.
            families: unit families (see :mod:`crossmodal.model.units`).
            steps: generation steps to capture (any ints >= 0; a step past every output
                is simply empty).
            poolings: subset of :data:`POOLINGS`.
            max_new_tokens: generation limit; default the model's generation config.
            generator: ``fast`` (:mod:`crossmodal.model.fastgen`: the same tokens as ``generate``,
                with less per-step overhead), ``hf`` (``model.generate``, which also keeps
                every step's ``[batch, vocab]`` scores), or ``auto``: ``fast`` when the
                model's generation config is plain greedy, else ``hf``.
            pad_guard: zero padded frames before the speech adapter (module docstring).

        Raises:
            ValueError: for any invalid argument, or a model in train mode.
        """
        if loaded.model.training:
            raise ValueError(
                "model.training must be one of [False], got True; call model.eval() "
                "(dropout and LayerDrop change and skip units in train mode)"
            )
        self.loaded = loaded
        self.index = UnitIndex.from_model(loaded.model, families)
        self.steps = check_steps(steps)
        pools = tuple(poolings)
        if not pools or any(p not in POOLINGS for p in pools) or len(set(pools)) != len(pools):
            raise ValueError(f"poolings must be one of subsets of {list(POOLINGS)}, got {pools!r}")
        self.poolings = tuple(p for p in POOLINGS if p in pools)
        default = loaded.model.generation_config.max_new_tokens or 128
        limit = default if max_new_tokens is None else max_new_tokens
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_new_tokens must be one of [ints >= 1], got {limit!r}")
        self.max_new_tokens = limit
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {list(GENERATORS)}, got {generator!r}")
        if generator == "auto":
            from crossmodal.model.fastgen import is_plain_greedy

            generator = "fast" if is_plain_greedy(loaded) else "hf"
        self.generator = generator
        self.pad_guard = pad_guard
        self.reuse_cross_kv = True  # False: the replay projects the encoder frames again
        self._counts: Tensor | None = None
        self._modules = dict(loaded.model.named_modules())

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def run(self, batch: ModelBatch, tgt_lang: str) -> CaptureResult:
        """Generate greedily for ``batch`` into ``tgt_lang``, then capture every step.

        Raises:
            ValueError: unknown ``tgt_lang``.
        """
        validate_language(tgt_lang, self.loaded.lang_to_code_id, what="tgt_lang")
        return self._capture(batch, lambda kw, hid, mask: self._generate(kw, hid, mask, tgt_lang))

    def replay(self, batch: ModelBatch, sequences: Tensor) -> CaptureResult:
        """Capture given ``sequences`` (``[batch, 2 + n]``, as ``run`` would generate them)."""
        return self._capture(batch, lambda kw, hid, mask: (sequences.to(hid.device), None))

    def _capture(self, batch: ModelBatch, make_sequences: Callable) -> CaptureResult:
        model, dev = self.model, self.loaded.device
        kwargs = batch.model_kwargs(dev, self.loaded.dtype)
        shape = (len(batch), len(self.steps), self.index.n_units)
        buffers = {p: torch.full(shape, float("nan"), device=dev) for p in self.poolings}
        rec = _Recorder(buffers, self.steps)
        enc_sites = [s for s in self.index.sites if s.positions == batch.modality]
        dec_sites = [s for s in self.index.sites if s.component == "text_decoder"]
        speech = batch.modality == "speech"
        guard = (
            padding_guard(model, kwargs["attention_mask"], batch.speech_frames)
            if speech and self.pad_guard
            else None
        )
        with torch.inference_mode(), guard or nullcontext():
            with attached(rec.hooks(self._modules, enc_sites)):
                hidden, enc_mask = self._encode(batch, kwargs, rec)
            rec.check_fired(enc_sites, "encoder")
            sequences, cross_cache = make_sequences(kwargs, hidden, enc_mask)
            end_ids = end_token_ids(model)
            valid = step_validity(sequences, self.steps, end_ids)
            with attached(rec.hooks(self._modules, dec_sites)):
                self._replay(sequences, hidden, enc_mask, rec, cross_cache)
            rec.check_fired(dec_sites, "decoder")
            if "prefix_mean" in buffers:  # prefix sums -> means (other columns: / 1)
                buffers["prefix_mean"].div_(self._prefix_counts(dev))
            if not bool(valid.all()):
                for buf in buffers.values():
                    buf.masked_fill_(~valid[:, :, None], float("nan"))
        tokens = generated_tokens(sequences, end_ids)
        return CaptureResult(
            index=self.index,
            steps=self.steps,
            poolings=self.poolings,
            sequences=sequences,
            tokens=tokens,
            decode=self._texts,
            buffers=buffers,
            valid=valid,
            ids=batch.ids,
            languages=batch.languages,
        )

    def _prefix_counts(self, device: torch.device) -> Tensor:
        """``[1, step, unit]``: positions in each step's prefix on decoder-position columns, 1
        on the others (step-independent means); cached per device."""
        if self._counts is None or self._counts.device != device:
            counts = torch.ones(1, len(self.steps), self.index.n_units)
            prefix = torch.tensor(self.steps, dtype=torch.float32)[:, None] + 1
            for site in self.index.sites:
                if site.positions == "decoder":
                    counts[0, :, site.offset : site.offset + site.n_features] = prefix
            self._counts = counts.to(device)
        return self._counts

    def _encode(self, batch: ModelBatch, kwargs: dict, rec: _Recorder) -> tuple[Tensor, Tensor]:
        """The one encoder pass: ``(hidden [batch, frame, hidden], decoder-side mask)``."""
        model, mask = self.model, kwargs["attention_mask"]
        if batch.modality == "text":
            rec.masks.sources["text"] = [mask]
            return model.text_encoder(**kwargs).last_hidden_state, mask
        rec.masks.sources["speech"] = speech_lengths(model, mask)
        hidden = model.speech_encoder(**kwargs).last_hidden_state
        # the decoder's frames, as SeamlessM4Tv2Model.forward computes them (the guard's
        # lengths while the padding guard is on)
        lengths = model._compute_sub_sample_lengths_from_attention_mask(mask)
        frames = torch.arange(hidden.shape[1], device=hidden.device)
        return hidden, (frames[None, :] < lengths.to(hidden.device)[:, None]).to(mask.dtype)

    def _generate(
        self, kwargs: dict, hidden: Tensor, enc_mask: Tensor, tgt_lang: str
    ) -> tuple[Tensor, DynamicCache | None]:
        """The generated sequences, and the fast path's cross-attention cache (None for HF)."""
        if self.generator == "fast":
            from crossmodal.model import fastgen

            out = fastgen.greedy_generate(
                self.loaded,
                kwargs,
                tgt_lang,
                self.max_new_tokens,
                encoder_outputs=(hidden, enc_mask),
            )
            return out.sequences, out.cross_cache if self.reuse_cross_kv else None
        out = self.model.generate(
            **kwargs,
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            tgt_lang=tgt_lang,
            generate_speech=False,
            num_beams=1,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
        )
        return out.sequences, None

    def _replay(
        self,
        sequences: Tensor,
        hidden: Tensor,
        enc_mask: Tensor,
        rec: _Recorder,
        cross_cache: DynamicCache | None = None,
    ) -> None:
        """The one teacher-forced decoder pass, over the positions some step needs.

        With ``cross_cache`` (the generation's cross-attention keys and values), the
        cross-attention ``k_proj``/``v_proj`` do not run again: the cached projections go to
        their hooks instead (the same tensors, laid out as the modules return them).
        """
        width = min(sequences.shape[1] - 1, max(self.steps) + 1)
        rec.positions = rec.steps.clamp(max=width - 1)
        rec.bounds = [min(t, width - 1) + 1 for t in self.steps]
        rec.masks.sources["encoder_output"] = [enc_mask]
        kwargs = {"use_cache": False}
        if cross_cache is not None:
            from crossmodal.model.fastgen import CACHE_KWARG

            cache = EncoderDecoderCache(DynamicCache(), cross_cache)
            kwargs = {"use_cache": True, CACHE_KWARG: cache}
        self.model.text_decoder(
            input_ids=sequences[:, :width],
            encoder_hidden_states=hidden,
            encoder_attention_mask=enc_mask,
            **kwargs,
        )
        if cross_cache is None:
            return
        for i, layer in enumerate(cross_cache.layers):
            for proj, cached in (("k_proj", layer.keys), ("v_proj", layer.values)):
                out = cached.transpose(1, 2).reshape(*cached.shape[::2], -1)  # [b, frame, hidden]
                rec.feed(f"text_decoder.layers.{i}.cross_attention.{proj}", out)

    def _texts(self, tokens: list[list[int]]) -> list[str]:
        if self.loaded.processor is None:
            return [" ".join(map(str, row)) for row in tokens]
        return self.loaded.processor.batch_decode(tokens, skip_special_tokens=True)
