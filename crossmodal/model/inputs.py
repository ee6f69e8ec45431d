"""Records -> one padded model batch for one input modality, and what its padding means.

Speech goes through the SeamlessM4T feature extractor (16 kHz only), text through the
tokenizer with the records' source language. Both are validated here, once, with one-line
errors, so the capture and steering engines can assume a well-formed :class:`ModelBatch`.
Models without a processor (random weights) take speech through the stock feature extractor
and text as token ids (:func:`batch_from_token_ids`).

Padding: :class:`FrameMasks` gives masks of the real positions at every resolution a module
output can have (input tokens or frames, frames after each speech-adapter sub-sampling), and
:func:`padding_guard` stops HF's speech adapter from reading padded frames, so that a padded
batch gives each example the values it gets alone.

The last speech frame (:data:`SPEECH_LAST_FRAME`): the feature extractor stacks pairs of
filterbank frames; for an odd number of them the last stacked frame holds one real and one
padded frame, and its attention mask marks it as padding. Run alone (batch 1) the model's
adapter convolution still reads that frame. ``drop`` (the default) treats it as the padding
the mask says it is, as a lone run of the row cut to its mask does; ``keep`` reproduces the
model's own batch-1 run on the feature extractor's output (the reference study's runs) exactly
(docs/method.md, "Differences from the reference implementation").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from crossmodal.data.languages import validate_language
from crossmodal.data.records import TARGET_SAMPLING_RATE, Record
from crossmodal.model.load import LoadedModel, feature_extractor

MODALITIES = ("speech", "text")
SPEECH_LAST_FRAME = ("drop", "keep")
"""What the adapter reads of a half-padded last speech frame (module docstring)."""
FBANK_WINDOW, FBANK_HOP = 400, 160
"""SeamlessM4T feature extractor's filterbank window and hop in samples (16 kHz, no centring)."""
_Hook = Callable[[nn.Module, tuple, Tensor], Tensor]
_LANG_TOKEN = re.compile(r"^__([A-Za-z]{3}(?:_[A-Za-z]+)?)__$")


@dataclass(frozen=True)
class ModelBatch:
    """Padded encoder inputs for one modality.

    Attributes:
        modality: ``speech`` or ``text``.
        inputs: ``input_features [batch, frame, 160]`` or ``input_ids [batch, token]``.
        attention_mask: ``[batch, frame|token]``, 1 on real positions.
        ids: record ids, one per row.
        languages: record (source) languages, one per row.
        speech_frames: speech only, with ``speech_last_frame="keep"``: per row the frames a
            batch-1 run of the row has (its feature extractor output's width), which the
            adapter convolution reads; ``None``: the mask's real frames (``drop``).
    """

    modality: str
    inputs: Tensor
    attention_mask: Tensor
    ids: tuple[str, ...]
    languages: tuple[str, ...]
    speech_frames: Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def input_name(self) -> str:
        return "input_features" if self.modality == "speech" else "input_ids"

    def model_kwargs(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """``{input_features|input_ids, attention_mask}`` on ``device`` (features in ``dtype``)."""
        x = self.inputs.to(device, dtype) if self.modality == "speech" else self.inputs.to(device)
        return {self.input_name: x, "attention_mask": self.attention_mask.to(device)}

    def row(self, i: int) -> ModelBatch:
        """Example ``i`` alone, with its padding cut off (what a batch-size-1 run sees): cut
        to its real positions, or with ``speech_frames`` to the width the feature extractor
        gives the row alone (its last frame then stays, marked as padding)."""
        keep = self.speech_frames is not None
        n = int(self.speech_frames[i] if keep else self.attention_mask[i].sum())
        return ModelBatch(
            self.modality,
            self.inputs[i : i + 1, :n],
            self.attention_mask[i : i + 1, :n],
            self.ids[i : i + 1],
            self.languages[i : i + 1],
            self.speech_frames[i : i + 1] if keep else None,
        )


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")


def _check_audio(records: Sequence[Record]) -> list[np.ndarray]:
    waves = []
    for r in records:
        if r.audio is None:
            raise ValueError(
                f"audio must be one of [a mono waveform], got None for record {r.id!r}; "
                "load audio for speech batches or use modality='text'"
            )
        if r.sampling_rate != TARGET_SAMPLING_RATE:
            raise ValueError(
                f"sampling_rate must be one of [{TARGET_SAMPLING_RATE}], got {r.sampling_rate!r} "
                f"for record {r.id!r}; resample with crossmodal.data.audio.resample"
            )
        wave = np.asarray(r.audio, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(
                f"audio must be one of [non-empty 1-D waveform], got shape {wave.shape} for "
                f"record {r.id!r}; convert to mono with crossmodal.data.audio.to_mono"
            )
        waves.append(wave)
    return waves


def tokenizer_languages(tokenizer: object) -> tuple[str, ...]:
    """Language codes the tokenizer has a ``__xxx__`` token for."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    return tuple(sorted(m.group(1) for t in vocab if (m := _LANG_TOKEN.match(t))))


def _check_text_language(records: Sequence[Record], tokenizer: object) -> str:
    langs = sorted({r.language for r in records})
    if len(langs) != 1:
        raise ValueError(
            f"language must be one of [a single source language per text batch], got {langs}; "
            "split the records by language"
        )
    code = langs[0]
    token_id = tokenizer.convert_tokens_to_ids(f"__{code}__")  # type: ignore[attr-defined]
    if token_id is None or token_id == tokenizer.unk_token_id:  # type: ignore[attr-defined]
        validate_language(code, tokenizer_languages(tokenizer), what="language")
    return code


def speech_frames(n_samples: Sequence[int], stride: int = 2) -> Tensor:
    """Stacked feature frames the SeamlessM4T feature extractor gives each waveform ALONE.

    ``1 + (n - 400) // 160`` filterbank frames (no centring), padded to a multiple of
    ``stride`` and stacked by ``stride``: ``ceil(frames / stride)``. Its attention mask has
    ``frames // stride`` ones, so for an odd frame count the last stacked frame is marked as
    padding although half of it is real.
    """
    frames = [max(0, 1 + (int(n) - FBANK_WINDOW) // FBANK_HOP) for n in n_samples]
    return torch.tensor([-(-f // stride) for f in frames], dtype=torch.long)


def _check_last_frame(speech_last_frame: str) -> None:
    if speech_last_frame not in SPEECH_LAST_FRAME:
        raise ValueError(
            f"speech_last_frame must be one of {list(SPEECH_LAST_FRAME)}, got {speech_last_frame!r}"
        )


def make_batch(
    records: Sequence[Record],
    modality: str,
    loaded: LoadedModel,
    *,
    speech_last_frame: str = "drop",
) -> ModelBatch:
    """Pad ``records`` into one batch for ``modality``, through ``loaded``'s processor.

    ``speech_last_frame``: ``drop`` or ``keep`` the half-padded last speech frame (module
    docstring); ``keep`` sets :attr:`ModelBatch.speech_frames`.

    Raises:
        ValueError: empty records, unknown modality, missing audio, a sampling rate other
            than 16 kHz, mixed or unknown text languages, text without a processor, an
            unknown ``speech_last_frame``.
    """
    _check_modality(modality)
    _check_last_frame(speech_last_frame)
    if not records:
        raise ValueError("records must be one of [a non-empty sequence], got []")
    ids = tuple(r.id for r in records)
    langs = tuple(r.language for r in records)
    if modality == "speech":
        waves = _check_audio(records)
        if loaded.processor is not None:
            out = loaded.processor(
                audio=waves, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="pt", padding=True
            )
        else:
            out = feature_extractor()(
                waves, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="pt", padding=True
            )
        frames = None
        if speech_last_frame == "keep":
            extractor = loaded.processor.feature_extractor if loaded.processor else None
            stride = (extractor or feature_extractor()).stride
            frames = speech_frames([w.size for w in waves], stride)
        return ModelBatch(
            "speech", out["input_features"], out["attention_mask"], ids, langs, frames
        )
    if loaded.processor is None:
        raise ValueError(
            f"processor must be one of [a SeamlessM4TProcessor], got None for {loaded.source!r}; "
            "tokenize yourself and use crossmodal.model.inputs.batch_from_token_ids"
        )
    code = _check_text_language(records, loaded.processor.tokenizer)
    out = loaded.processor(
        text=[r.text for r in records], src_lang=code, return_tensors="pt", padding=True
    )
    return ModelBatch("text", out["input_ids"], out["attention_mask"], ids, langs)


def batch_from_token_ids(
    token_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    ids: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
) -> ModelBatch:
    """A right-padded text batch from token id lists (for models without a tokenizer).

    Raises:
        ValueError: an empty list, or an empty row.
    """
    if not token_ids or any(len(row) == 0 for row in token_ids):
        raise ValueError(
            f"token_ids must be one of [non-empty lists of non-empty rows], got {token_ids!r}"
        )
    width = max(len(row) for row in token_ids)
    inputs = torch.full((len(token_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, row in enumerate(token_ids):
        inputs[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    n = len(token_ids)
    return ModelBatch(
        "text",
        inputs,
        mask,
        tuple(ids) if ids is not None else tuple(str(i) for i in range(n)),
        tuple(languages) if languages is not None else ("",) * n,
    )


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    adapter = getattr(model.speech_encoder, "adapter", None)
    return [] if adapter is None else list(adapter.layers)


def _conv_length(lengths: Tensor, conv: nn.Conv1d) -> Tensor:
    """Output length of ``conv`` on inputs of ``lengths`` frames (PyTorch's formula)."""
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    return torch.floor((lengths + 2 * p - k) / s) + 1


def speech_lengths(
    model: nn.Module, attention_mask: Tensor, frames: Tensor | None = None
) -> list[Tensor]:
    """Frames per row (on the host) the adapter reads after 0, 1, ... sub-samplings.

    A row's frame count at each level is what the adapter's strided convolution gives on that
    row alone: from its real frames (the mask's ones), or from ``frames`` (the width of a lone
    run that keeps its last, half-padded frame). HF's
    ``_compute_sub_sample_lengths_from_attention_mask`` pads by ``kernel // 2`` where the
    convolution pads by ``stride // 2``: the same for the real model (kernel = stride = 8),
    one frame too many when kernel > stride (e.g. an organism with kernel 4, stride 2).
    """
    start = attention_mask.detach().cpu().sum(dim=1) if frames is None else frames.cpu()
    lengths = [start.double()]
    for layer in _adapter_layers(model):
        lengths.append(_conv_length(lengths[-1], layer.residual_conv))
    return lengths


def hf_attention_lengths(model: nn.Module, attention_mask: Tensor, frames: Tensor) -> list[Tensor]:
    """Per level, the real frames HF's masks give a lone run of width ``frames`` (host).

    Every adapter layer and the model apply HF's formula once to the input mask (its real
    frames), and ``_compute_new_attention_mask`` clips it to the layer's width: level 0 is
    the mask's ones, level k >= 1 ``min(formula(ones), width_k)``.
    """
    ones = attention_mask.detach().cpu().sum(dim=1).double()
    widths = speech_lengths(model, attention_mask, frames)
    out = [ones]
    for level, layer in enumerate(_adapter_layers(model), start=1):
        conv = layer.residual_conv
        k, s = conv.kernel_size[0], conv.stride[0]
        formula = torch.floor((ones + 2 * (k // 2) - k) / s) + 1
        out.append(torch.minimum(formula, widths[level]))
    return out


def last_frame_reaches_decoder(model: nn.Module, attention_mask: Tensor, frames: Tensor) -> Tensor:
    """bool ``[row]``: does ``keep`` change what the decoder sees for this row?

    Only when the row's last frame is half-padded (``frames`` > its mask's ones) AND the
    adapter's last attended output frame covers it: output ``j`` of the first adapter
    convolution reads input frames ``j*stride - padding .. + kernel - 1``, and only the
    first :func:`hf_attention_lengths` outputs are attended. Otherwise the extra frame
    feeds only masked positions. Models without an adapter: every half-padded row.
    """
    ones = attention_mask.detach().cpu().sum(dim=1)
    half = frames.cpu() > ones
    layers = _adapter_layers(model)
    if not layers:
        return half
    conv = layers[0].residual_conv
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    attended = hf_attention_lengths(model, attention_mask, frames)[1].long()
    return half & ((attended - 1) * s - p + k - 1 >= ones)


class FrameMasks:
    """``[batch, position]`` float masks of real positions, built once per (kind, level, width).

    ``sources[kind]`` holds one full mask, or host lengths per sub-sampling level; a length
    past the output's width is clipped, as HF's ``_compute_new_attention_mask`` does.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sources: dict[str, list[Tensor]] = {}
        self._cache: dict[tuple[str, int, int], Tensor] = {}

    def get(self, kind: str, level: int, width: int, what: str) -> Tensor:
        key = (kind, level, width)
        if key not in self._cache:
            src = self.sources[kind][level]
            if src.dim() == 2:
                mask = src.to(self.device, torch.float32)
            else:
                mask = (torch.arange(width)[None, :] < src[:, None]).float().to(self.device)
            if mask.shape[1] != width:
                raise RuntimeError(f"{what} has {width} positions, its mask {mask.shape[1]}")
            self._cache[key] = mask
        return self._cache[key]


@contextmanager
def padding_guard(
    model: nn.Module, attention_mask: Tensor, frames: Tensor | None = None
) -> Iterator[None]:
    """Make each example of a padded speech batch see what it sees alone, inside the block.

    Why: the adapter's strided convolutions (kernel 8, stride 8, padding 4 in the real model)
    reach up to 4 frames past a row's last real frame, and HF feeds them the layer-normed
    padding, so an example's encoder output in a padded batch differs from the same example
    alone. The guard (1) zeroes those frames, the zeros a lone example gets from the
    convolution's own padding, and (2) has the adapter's self-attention and the decoder's
    cross-attention masked with :func:`speech_lengths` (the frames a lone run has) instead of
    HF's formula (which differs when kernel != stride). Hooks and overrides are removed in
    ``finally``. ``frames`` (:attr:`ModelBatch.speech_frames`, ``keep``): each row reads up to
    its lone run's width (its half-padded last frame included) and is masked as HF masks that
    lone run (:func:`hf_attention_lengths`): what the model gives it alone, exactly.
    """
    masks = FrameMasks(attention_mask.device)
    masks.sources["speech"] = speech_lengths(model, attention_mask, frames)
    attend = masks.sources["speech"]
    if frames is not None:
        attend = hf_attention_lengths(model, attention_mask, frames)

    def guard(level: int) -> _Hook:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            keep = masks.get("speech", level, out.shape[1], "adapter input")
            return out * keep[..., None].to(out.dtype)

        return hook

    def lengths_at(level: int) -> Callable[[Tensor], Tensor]:
        on_device = attend[level].to(attention_mask.device)

        def sub_sample_lengths(mask: Tensor) -> Tensor:
            if mask is attention_mask:
                return on_device
            return speech_lengths(model, mask)[level].to(mask.device)

        return sub_sample_lengths

    # HF computes sub-sampled lengths in each adapter layer (its self-attention mask) and in the
    # model (the decoder's cross-attention mask), each from the input mask: override them all.
    layers = _adapter_layers(model)
    overridden = [(layer, lengths_at(k + 1)) for k, layer in enumerate(layers)]
    overridden.append((model, lengths_at(len(layers))))
    name = "_compute_sub_sample_lengths_from_attention_mask"
    handles = []
    try:
        for level, layer in enumerate(layers):
            for norm in (layer.residual_layer_norm, layer.self_attn_layer_norm):
                handles.append(norm.register_forward_hook(guard(level)))
        for owner, fn in overridden:
            setattr(owner, name, fn)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, _ in overridden:
            owner.__dict__.pop(name, None)
