"""The greedy fast path gives exactly HF ``generate``'s sequences.

Tricky cases: padded text and speech batches of mixed lengths; rows that emit EOS at
different steps (later rows fed pad); every row finishing before ``max_new_tokens`` (early
exit, shorter width) and some rows reaching it; ``min_new_tokens``; one target language per
row; ``sync_every > 1`` (loop runs past the last EOS, output trimmed to HF's width); forward
hooks that edit module outputs per row (steering) and a ``text_decoder`` pre-hook reading the
``cache`` kwarg (the capture step counter); encoder outputs reused; refused configs.

The organism tests cover text and speech, x2en and en2x. A random tiny model repeats one token forever, so :func:`lively_model` rescales its decoder
and gives EOS a logit that fires for some rows and steps: each test asserts its premise
(rows finish at different steps, ...) so a change of weights cannot make it vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crossmodal.model.fastgen import CACHE_KWARG, encode, greedy_generate, hf_generate
from crossmodal.model.load import LoadedModel, build_random_model, feature_extractor, load_model

EOS = 3


def lively_model() -> LoadedModel:
    loaded = build_random_model("tiny", seed=1)
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name.startswith(("text_decoder", "lm_head", "shared")):
                p.normal_(0, 0.3, generator=gen)
        model.text_decoder.layer_norm.bias.zero_()
        model.text_decoder.layer_norm.bias[0] = 1.5
        model.lm_head.weight[EOS, 0] = 3.0
    return loaded


@pytest.fixture(scope="module")
def lively() -> LoadedModel:
    return lively_model()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from 2 threads and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_batch(rows: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, 7), generator=gen)
    ids[1, 4:] = 0
    ids[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def speech_batch(seconds=(0.5, 1.0, 0.3, 0.8)) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(int(16_000 * s)).astype(np.float32) for s in seconds]
    feats = feature_extractor()(audio, sampling_rate=16_000, return_tensors="pt", padding=True)
    return {"input_features": feats["input_features"], "attention_mask": feats["attention_mask"]}


def eos_steps(seqs: torch.Tensor) -> list[int | None]:
    """Per row, the generation step (1-based) of its first EOS, or None."""
    out = []
    for row in seqs[:, 2:]:
        hit = (row == EOS).nonzero().flatten()
        out.append(int(hit[0]) + 1 if hit.numel() else None)
    return out


def test_text_rows_finish_at_different_steps_and_max_reached(lively):
    batch = text_batch()
    hf = hf_generate(lively, batch, "deu", 10)
    fast = greedy_generate(lively, batch, "deu", 10)
    steps = eos_steps(hf)
    assert len({s for s in steps if s is not None}) >= 2  # rows end at different steps
    assert None in steps and hf.shape[1] == 12  # some rows reach max_new_tokens
    assert torch.equal(fast.sequences, hf)
    # padded after EOS exactly as HF
    for row, s in zip(fast.sequences, steps, strict=True):
        if s is not None:
            assert (row[2 + s :] == 0).all()


def test_early_exit_when_every_row_has_eos(lively):
    hf_all = hf_generate(lively, text_batch(), "deu", 10)
    done = [i for i, s in enumerate(eos_steps(hf_all)) if s is not None]
    batch = {k: v[done] for k, v in text_batch().items()}
    hf = hf_generate(lively, batch, "deu", 10)
    fast = greedy_generate(lively, batch, "deu", 10)
    assert hf.shape[1] < 12 and len(set(eos_steps(hf))) >= 2
    assert torch.equal(fast.sequences, hf)
    assert fast.steps_run == hf.shape[1] - 2


@pytest.mark.parametrize("sync_every", [3, 100])
def test_sync_every_trims_to_hf_width(lively, sync_every):
    batch = {k: v[[0, 2, 4]] for k, v in text_batch().items()}
    hf = hf_generate(lively, batch, "deu", 10)
    fast = greedy_generate(lively, batch, "deu", 10, sync_every=sync_every)
    assert torch.equal(fast.sequences, hf)
    assert fast.steps_run >= hf.shape[1] - 2


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (``.item()``, ``bool(t)``,
    ``int(t)``): a sync per call on CUDA, recorded here on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make_batch", [text_batch, speech_batch])
def test_decode_reads_the_device_only_every_sync_every_steps(lively, make_batch):
    """Padded batches (the cross-attention mask is needed): the host reads grow by one per
    ``sync_every`` steps, not by one per step (HF's decoder reads the mask at every step)."""
    batch = make_batch()
    assert (batch["attention_mask"] == 0).any()
    enc = encode(lively, batch)
    reads = {}
    for steps in (8, 16):
        with HostReads() as spy:
            out = greedy_generate(lively, batch, "deu", steps, min_new_tokens=steps,
                                  encoder_outputs=enc, sync_every=4)  # fmt: skip
        assert out.steps_run == steps
        reads[steps] = spy.count
    assert reads[16] - reads[8] == 16 // 4 - 8 // 4


def test_speech_mixed_lengths(lively):
    batch = speech_batch()
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()
    for lang in ("deu", "jpn"):
        hf = hf_generate(lively, batch, lang, 12)
        fast = greedy_generate(lively, batch, lang, 12)
        assert torch.equal(fast.sequences, hf)
    hidden, mask = encode(lively, batch)
    assert mask is not None and mask.shape == hidden.shape[:2]
    assert torch.equal(fast.encoder_hidden_states, hidden)


def test_min_new_tokens_and_per_row_languages(lively):
    batch = text_batch()
    hf = hf_generate(lively, batch, "deu", 8, min_new_tokens=8)
    assert eos_steps(hf) == [None] * 8 and hf.shape[1] == 10
    assert torch.equal(greedy_generate(lively, batch, "deu", 8, min_new_tokens=8).sequences, hf)
    langs = ["deu", "fra", "jpn", "eng", "spa", "cmn", "deu", "fra"]
    hf = hf_generate(lively, batch, langs, 9)
    fast = greedy_generate(lively, batch, langs, 9)
    assert len(set(hf[:, 1].tolist())) == 6
    assert torch.equal(fast.sequences, hf)


def test_encoder_outputs_reused(lively):
    batch = text_batch()
    enc = encode(lively, batch)
    assert torch.equal(enc[0], lively.model.text_encoder(**batch)[0])
    out = greedy_generate(lively, batch, "deu", 10, encoder_outputs=enc)
    assert out.encoder_hidden_states is enc[0]
    assert torch.equal(out.sequences, hf_generate(lively, batch, "deu", 10))


def _editing_hook(rows: list[int], feature: int, value: float):
    def hook(module, args, out):
        out = out.clone()
        out[rows, ..., feature] = value
        return out

    return hook


def test_identical_under_output_editing_hooks(lively):
    model = lively.model
    batch = text_batch()
    plain = hf_generate(lively, batch, "deu", 10)
    sites = [
        (model.text_decoder.layers[0].ffn.fc1, _editing_hook([1, 4, 5], 7, 4.0)),
        (model.text_decoder.layers[1].self_attn.out_proj, _editing_hook([0, 6], 3, -3.0)),
        (model.text_decoder.layer_norm, _editing_hook([2, 4], 0, -2.0)),  # no EOS for them
        (model.text_decoder.layer_norm, _editing_hook([1, 7], 0, 3.0)),  # early EOS
    ]
    handles = [m.register_forward_hook(h) for m, h in sites]
    try:
        hf = hf_generate(lively, batch, "deu", 10)
        fast = greedy_generate(lively, batch, "deu", 10)
    finally:
        for h in handles:
            h.remove()
    assert eos_steps(hf) != eos_steps(plain)  # the hooks do change the output
    assert torch.equal(fast.sequences, hf)


def test_decoder_pre_hook_sees_same_steps(lively):
    """A capture-style step counter reads the cache kwarg and the input length."""
    seen: dict[str, list[tuple[int, int]]] = {"hf": [], "fast": []}
    key = ["hf"]

    def pre(module, args, kwargs):
        seen[key[0]].append((kwargs[CACHE_KWARG].get_seq_length(), kwargs["input_ids"].shape[1]))

    handle = lively.model.text_decoder.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        batch = text_batch()
        hf_generate(lively, batch, "deu", 6)
        key[0] = "fast"
        greedy_generate(lively, batch, "deu", 6)
    finally:
        handle.remove()
    assert seen["hf"] == seen["fast"] == [(0, 2)] + [(k, 1) for k in range(2, 7)]


def test_bad_arguments(lively):
    batch = text_batch()
    with pytest.raises(ValueError, match="tgt_lang must be one of"):
        greedy_generate(lively, batch, "xxx", 4)
    with pytest.raises(ValueError, match="tgt_lang must be one of"):
        greedy_generate(lively, batch, ["deu", "fra"], 4)
    with pytest.raises(ValueError, match="batch must be one of"):
        greedy_generate(lively, {"attention_mask": batch["attention_mask"]}, "deu", 4)
    with pytest.raises(ValueError, match="min_new_tokens must be one of"):
        greedy_generate(lively, batch, "deu", 4, min_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens must be one of"):
        greedy_generate(lively, batch, "deu", 0)
    with pytest.raises(ValueError, match="loaded_or_model must be one of"):
        greedy_generate(torch.nn.Linear(2, 2), batch, "deu", 4)


def test_argmax_equals_torch_on_ties_nan_inf_and_strided_logits():
    from crossmodal.model.fastgen import _argmax

    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, 3, 3, 2], [nan, 5, nan, 1], [1, inf, inf, 0], [-inf] * 4])
    strided = torch.randn(64, 2, 1507, generator=torch.Generator().manual_seed(0))[:, -1]
    for logits in (x, x.double(), strided, x.half()):
        assert torch.equal(_argmax(logits), logits.argmax(dim=-1))


def test_refuses_non_greedy_config():
    loaded = build_random_model("tiny", seed=0)
    loaded.model.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="generation_config.repetition_penalty must be one of"):
        greedy_generate(loaded, text_batch(), "deu", 4)


@pytest.fixture(scope="module")
def organism(shipped_organism) -> LoadedModel:
    return load_model("organism", device="cpu")


@pytest.mark.parametrize(
    ("modality", "src", "tgt"),
    [
        ("text", "deu", "eng"),
        ("speech", "deu", "eng"),
        ("text", "eng", "jpn"),
        ("speech", "eng", "fra"),
    ],
)
def test_organism_identical_to_hf(organism, modality, src, tgt):
    from crossmodal.model.inputs import make_batch
    from crossmodal.organism import organism_corpus

    records = organism_corpus("test", languages=[src], n_sentences=8)
    batch = make_batch(records, modality, organism).model_kwargs(organism.device, organism.dtype)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # mixed lengths
    hf = hf_generate(organism, batch, tgt, 40)
    fast = greedy_generate(organism, batch, tgt, 40)
    assert len({s for s in eos_steps(hf)}) >= 2 and None not in eos_steps(hf)
    assert torch.equal(fast.sequences, hf)
    short = hf_generate(organism, batch, tgt, 3)  # max_new_tokens reached by every row
    assert None in eos_steps(short)
    assert torch.equal(greedy_generate(organism, batch, tgt, 3).sequences, short)


@pytest.mark.integration
@pytest.mark.parametrize("modality", ["text", "speech"])
def test_the_compiled_steps_function_equals_the_decoder_call(organism, modality):
    """What :class:`CompiledStep` compiles (the decoder's forward written out from its
    modules, so that it traces as one graph on transformers before 5.24 too), run eagerly
    on the same static caches as the decoder call: the same logits bit for bit at every
    one-token step, for a padded batch whose rows end at different steps."""
    from crossmodal.model import fastgen
    from crossmodal.model.inputs import make_batch
    from crossmodal.organism import organism_corpus

    src = "deu" if modality == "text" else "eng"
    records = organism_corpus("test", languages=[src], n_sentences=8)
    batch = make_batch(records, modality, organism).model_kwargs("cpu", organism.dtype)
    logits, sequences = {}, {}
    for fn in (fastgen._next_logits, fastgen._one_token_logits):
        step, seen = fastgen.CompiledStep(organism), []
        step.function = lambda *a, fn=fn, seen=seen: seen.append(fn(*a)) or seen[-1]  # eager
        sequences[fn] = greedy_generate(organism, batch, "fra", 30, compiled=step).sequences
        logits[fn] = seen
    assert torch.equal(sequences[fastgen._next_logits], hf_generate(organism, batch, "fra", 30))
    assert len(set(eos_steps(sequences[fastgen._next_logits]))) >= 2
    assert torch.equal(sequences[fastgen._one_token_logits], sequences[fastgen._next_logits])
    pairs = zip(logits[fastgen._next_logits], logits[fastgen._one_token_logits], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs) and len(logits[fastgen._next_logits]) >= 10
    view, model = step.decoder, organism.model.text_decoder  # no copies of the weights
    assert all(a is b for a, b in zip(view.parameters(), model.parameters(), strict=True))


def test_compiled_step_grows_the_position_table_first(organism):
    """The compiled step reads the sinusoidal position table without the decoder's size
    check, so :meth:`CompiledStep.cache` grows it beforehand: 300 forced steps (past the
    organism's 256 positions) give HF's tokens."""
    from crossmodal.model.fastgen import CompiledStep

    table = organism.model.text_decoder.embed_positions
    assert table.weights.shape[0] < 2 + 300 + table.padding_idx
    batch = text_batch(rows=4)
    step = CompiledStep(organism)
    out = greedy_generate(organism, batch, "fra", 300, min_new_tokens=300, compiled=step)
    assert out.sequences.shape == (4, 302)
    assert table.weights.shape[0] >= 2 + 300 + table.padding_idx
    assert torch.equal(out.sequences, hf_generate(organism, batch, "fra", 300, min_new_tokens=300))


def test_compiled_step_compiles_once_for_two_rows(organism):
    """Two rows: the first compiled step's token column sits at storage offset 2 of the
    loop's buffer, and dynamo's duck sizing would tie that offset to the batch size of 2;
    the step gets a fresh tensor, so the next steps reuse the first graph."""
    from torch._dynamo.utils import counters

    from crossmodal.model.fastgen import CompiledStep

    batch = {k: v[:2] for k, v in text_batch().items()}
    torch._dynamo.reset()  # no graph of an earlier test serves this one
    before = counters["stats"]["unique_graphs"]
    out = greedy_generate(
        organism, batch, "fra", 12, min_new_tokens=12, compiled=CompiledStep(organism)
    )
    assert counters["stats"]["unique_graphs"] == before + 1
    assert torch.equal(out.sequences, hf_generate(organism, batch, "fra", 12, min_new_tokens=12))


def test_compiled_step_gives_hf_tokens_and_compiles_once(organism):
    """The compiled fast path (static caches, the one-token step under torch.compile, CPU
    inductor here) on the organism: HF's sequences for padded text and speech batches whose
    rows end at different steps; one compile (dynamic shapes) serves both shapes and every
    later batch, each shape's caches reused (reset in place)."""
    from torch._dynamo.utils import counters

    from crossmodal.model.fastgen import CompiledStep
    from crossmodal.model.inputs import make_batch
    from crossmodal.organism import organism_corpus

    step = CompiledStep(organism)
    assert step.mode == "default"  # "reduce-overhead" (CUDA graphs) on CUDA
    torch._dynamo.reset()  # no graph of an earlier test serves this one
    before = counters["stats"]["unique_graphs"]
    graphs = []
    for modality, src in (("text", "deu"), ("speech", "eng")):
        records = organism_corpus("test", languages=[src], n_sentences=8)
        batch = make_batch(records, modality, organism).model_kwargs("cpu", organism.dtype)
        hf = hf_generate(organism, batch, "fra", 30)
        assert len(set(eos_steps(hf))) >= 2  # rows end at different steps
        for _ in range(2):
            out = greedy_generate(organism, batch, "fra", 30, compiled=step)
            assert torch.equal(out.sequences, hf) and out.cross_cache is None
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [before + 1] * 4
    assert len(step._caches) == 2
