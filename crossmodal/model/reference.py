"""The reference study's procedures, kept slow and simple on purpose.

:func:`reference_capture` does what the reference code's capture does (docs/method.md,
"Generation steps and the per-example value"): batch size 1, greedy ``model.generate``, then
ONE teacher-forced run of the whole model PER STEP on the prefix ``seq[:, :t + 1]``, every
unit's output copied to host memory (numpy), and the per-step value taken there:
``prefix_mean`` (mean over the t + 1 prefix positions) and ``last`` (position t).
Encoder-side values (cross-attention ``k_proj``/``v_proj`` included) are means over ALL
positions of the lone run, as the reference's mean pooling takes them: with the row cut to its
mask (``ModelBatch.row``) that is its real positions; a speech row built with
``speech_last_frame="keep"`` keeps its half-padded last frame and every frame the adapter
makes of it, as the reference's runs do. It checks :mod:`crossmodal.model.capture` (tests)
and is the baseline of the benchmark; nothing here is shared with the capture engine except
the unit index (the address scheme).

The reference code's input and example handling that crossmodal does NOT follow
(docs/method.md, "Differences from the reference implementation"), each as an explicit
function for :mod:`crossmodal.reduce.reference_diff` to measure:

* :func:`reference_text_batch`: text tokenized with the tokenizer's default source-language
  tag (not the records' language) and padded to :data:`REFERENCE_TEXT_WIDTH` positions;
* :func:`kv_means_over`: cross-attention ``k_proj``/``v_proj`` means over a given number of
  encoder positions per row (all 256 for the padded text, padding included);
* :func:`speech_key_lengths` and :func:`length_majority_filter`: the pooled length the
  reference's transpose heuristic gives each speech-encoder output, and its reader's
  length-majority filter, which drops examples silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from crossmodal.data.records import Record
from crossmodal.model.capture import POOLINGS, REFERENCE_STEPS, attached, check_steps, end_token_ids
from crossmodal.model.inputs import ModelBatch, make_batch
from crossmodal.model.load import LoadedModel
from crossmodal.model.units import Site, UnitIndex

REFERENCE_TEXT_WIDTH = 256
"""Positions the reference pads every text input to."""
MAJORITY_SHARE = 0.90
"""The reference reader keeps a key only if this share of examples has its majority length."""
_KEY_KINDS = ("Linear", "Conv1d", "LayerNorm", "Embedding", "GLU")
_SKIPPED_KEYS = ("self_attn.distance_embedding", "feature_projection")


@dataclass
class ReferenceResult:
    """Per-example results of the reference procedure.

    Attributes:
        index: the unit index (columns of every value array).
        steps: as requested.
        sequences: each example's generated ids ``[</s>, lang, tok1, ...]`` (no padding).
        values: ``(pooling, step) -> [rows, unit]`` float64.
        rows: step -> example indices that contribute to it.
        n_ended: step -> examples left out of it.
    """

    index: UnitIndex
    steps: tuple[int, ...]
    sequences: list[np.ndarray]
    values: dict[tuple[str, int], np.ndarray]
    rows: dict[int, list[int]]
    n_ended: dict[int, int]


def reference_valid(sequence: np.ndarray, step: int, end_ids: Iterable[int]) -> bool:
    """Did generation compute the decoder state of ``step`` for this (unpadded) sequence?

    The state at position ``t`` predicts ``sequence[t + 1]``: it exists if that token was
    generated and no earlier generated token (``sequence[2:t + 1]``) ended the output.
    """
    ends = set(end_ids)
    if step + 1 >= len(sequence):
        return False
    return all(int(tok) not in ends for tok in sequence[2 : step + 1])


def _copying_hooks(model: nn.Module, index: UnitIndex, store: dict[str, np.ndarray]) -> list:
    """Hooks that copy every site's output to host memory (``store[site name]``)."""
    modules = dict(model.named_modules())
    by_module: dict[str, list[Site]] = {}
    for site in index.sites:
        by_module.setdefault(site.module_path, []).append(site)

    def make(calls: list[Site]) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            n = sum(1 for s in calls if s.name in store)
            array = out.detach().float().cpu().numpy()
            store[calls[n].name] = array.swapaxes(1, 2) if calls[n].channels_first else array

        return hook

    return [(modules[path], make(calls)) for path, calls in by_module.items()]


def _site_values(site: Site, array: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """[1, position, feature] -> the two poolings (float64)."""
    x = array[0].astype(np.float64)
    if site.positions != "decoder":  # encoder frames or input positions: mean over all
        mean = x.mean(axis=0)
        return {"prefix_mean": mean, "last": mean}
    return {"prefix_mean": x[: step + 1].mean(axis=0), "last": x[step]}


def reference_capture(
    loaded: LoadedModel,
    batch: ModelBatch,
    tgt_lang: str,
    *,
    families: str | Iterable[str] = ("decoder",),
    steps: Iterable[int] = REFERENCE_STEPS,
    max_new_tokens: int = 32,
) -> ReferenceResult:
    """Run the reference procedure on every example of ``batch``, one at a time."""
    model = loaded.model
    index = UnitIndex.from_model(model, families)
    steps_t = check_steps(steps)
    end_ids = end_token_ids(model)
    dev, dtype = loaded.device, loaded.dtype
    values: dict[tuple[str, int], list[np.ndarray]] = {
        (p, t): [] for p in POOLINGS for t in steps_t
    }
    rows: dict[int, list[int]] = {t: [] for t in steps_t}
    sequences = []
    for i in range(len(batch)):
        kwargs = batch.row(i).model_kwargs(dev, dtype)
        with torch.inference_mode():
            out = model.generate(
                **kwargs,
                tgt_lang=tgt_lang,
                generate_speech=False,
                num_beams=1,
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
        seq = out.sequences[0].cpu().numpy()
        sequences.append(seq)
        for t in steps_t:
            if not reference_valid(seq, t, end_ids):
                continue
            store: dict[str, np.ndarray] = {}
            prefix = torch.as_tensor(seq[None, : t + 1], device=dev)
            with torch.inference_mode(), attached(_copying_hooks(model, index, store)):
                model(**kwargs, decoder_input_ids=prefix, use_cache=False)
            unit_values = {p: np.full(index.n_units, np.nan) for p in POOLINGS}
            for site in index.sites:
                if site.name in store:
                    for p, v in _site_values(site, store[site.name], t).items():
                        unit_values[p][site.offset : site.offset + site.n_features] = v
            for p in POOLINGS:
                values[(p, t)].append(unit_values[p])
            rows[t].append(i)
    stacked = {key: np.stack(v) if v else np.zeros((0, index.n_units)) for key, v in values.items()}
    n_ended = {t: len(batch) - len(rows[t]) for t in steps_t}
    return ReferenceResult(index, steps_t, sequences, stacked, rows, n_ended)


# ------------------------------------------------------------ reference input handling


def default_source_tag(tokenizer: object) -> str:
    """The source-language code a tokenizer uses when none is passed: its configured
    ``src_lang`` (``eng`` for SeamlessM4T v2 and the organism), read from the saved config,
    not the tokenizer's current state (every call with ``src_lang`` changes that)."""
    code = getattr(tokenizer, "init_kwargs", {}).get("src_lang") or "eng"
    return str(code).strip("_")


def reference_text_batch(
    records: Sequence[Record],
    loaded: LoadedModel,
    *,
    default_tag: bool = True,
    pad_to: int | None = REFERENCE_TEXT_WIDTH,
) -> ModelBatch:
    """Text inputs as the reference builds them (each option on its own).

    ``default_tag``: tokenize with the tokenizer's default format, whose source-language tag
    is :func:`default_source_tag` whatever the records' language (``False``: the records'
    language, as :func:`crossmodal.model.inputs.make_batch`). ``pad_to``: pad every row to
    this many positions (``None``: to the longest row). The rows' languages stay the
    records'.

    Raises:
        ValueError: a row longer than ``pad_to`` tokens, mixed languages, no processor.
    """

    base = make_batch(records, "text", loaded)  # validates records, language and processor
    code = default_source_tag(loaded.processor.tokenizer) if default_tag else records[0].language
    padding = (
        {"padding": True} if pad_to is None else {"padding": "max_length", "max_length": pad_to}
    )
    out = loaded.processor(
        text=[r.text for r in records], src_lang=code, return_tensors="pt", **padding
    )
    if pad_to is not None and out["input_ids"].shape[1] != pad_to:
        raise ValueError(
            f"text length must be one of [<= {pad_to} tokens], got {out['input_ids'].shape[1]}; "
            "raise pad_to"
        )
    return ModelBatch("text", out["input_ids"], out["attention_mask"], base.ids, base.languages)


def kv_means_over(
    loaded: LoadedModel, index: UnitIndex, hidden: Tensor, lengths: Tensor
) -> dict[str, np.ndarray]:
    """Each cross-attention ``k_proj``/``v_proj`` site of ``index``: its output on the encoder
    states ``hidden [batch, position, hidden]``, averaged over each row's first
    ``lengths[row]`` positions (whatever the mask says) -> ``[batch, feature]`` float64."""
    modules = dict(loaded.model.named_modules())
    keep = (torch.arange(hidden.shape[1])[None, :] < lengths.cpu()[:, None]).double()
    out = {}
    with torch.inference_mode():
        for site in index.sites:
            if site.positions == "encoder_output":
                x = modules[site.module_path](hidden).double().cpu()
                out[site.name] = ((x * keep[..., None]).sum(1) / keep.sum(1)[:, None]).numpy()
    return out


def pooled_length(shape: Sequence[int]) -> int | None:
    """The length of one speech-encoder output after the reference's pooling: a
    ``[1, A, B]`` output is transposed when A > B, then averaged over axis 1, so its row is
    ``max(A, B)`` long (the feature width only while the output has no more frames than
    features); ``[1, X]`` pools to 1 value; other shapes are not kept (``None``)."""
    if len(shape) == 3:
        return int(max(shape[1], shape[2]))
    return 1 if len(shape) == 2 else None


def speech_key_lengths(loaded: LoadedModel, batch: ModelBatch) -> dict[str, np.ndarray]:
    """Per speech-encoder output the reference keeps (Linear, Conv1d, LayerNorm, Embedding and
    GLU modules, not ``feature_projection`` or ``distance_embedding``), each row's
    :func:`pooled_length`, from a lone run of ``batch.row(i)`` (the last output of a module
    that runs twice, as the reference's dictionary keeps it)."""
    model = loaded.model
    shapes: dict[str, tuple[int, ...]] = {}

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            shapes[name] = tuple(out.shape)

        return hook

    hooks = [
        (m, make(name))
        for name, m in model.speech_encoder.named_modules()
        if type(m).__name__ in _KEY_KINDS and not any(s in name for s in _SKIPPED_KEYS)
    ]
    rows: dict[str, list[int]] = {}
    for i in range(len(batch)):
        shapes.clear()
        kwargs = batch.row(i).model_kwargs(loaded.device, loaded.dtype)
        with torch.inference_mode(), attached(hooks):
            model.speech_encoder(**kwargs)
        for name, shape in shapes.items():
            n = pooled_length(shape)
            if n is not None:
                rows.setdefault(f"speech_encoder.{name}", []).append(n)
    return {k: np.asarray(v) for k, v in rows.items() if len(v) == len(batch)}


@dataclass(frozen=True)
class LengthFilter:
    """What the reference reader's length-majority filter did.

    Attributes:
        kept: bool ``[example]``, the examples it keeps.
        majority: key -> its majority length (the most common one, first seen on ties).
        weak_keys: keys whose majority share is below :data:`MAJORITY_SHARE`: dropped whole
            (their units), while their lengths decide nothing.
    """

    kept: np.ndarray
    majority: dict[str, int]
    weak_keys: tuple[str, ...]


def length_majority_filter(
    lengths: Mapping[str, np.ndarray], share: float = MAJORITY_SHARE
) -> LengthFilter:
    """The reference reader's rule: per key, its most common length over the examples; a key
    whose majority share is >= ``share`` is strong; an example is kept only if every strong
    key has its majority length. Nothing is reported (the reference prints the counts only
    in verbose mode)."""
    n = len(next(iter(lengths.values()))) if lengths else 0
    kept = np.ones(n, dtype=bool)
    majority, weak = {}, []
    for key, values in lengths.items():
        length, count = Counter(values.tolist()).most_common(1)[0]
        majority[key] = int(length)
        if count / len(values) >= share:
            kept &= values == length
        else:
            weak.append(key)
    return LengthFilter(kept, majority, tuple(weak))
