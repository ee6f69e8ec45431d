"""The per-step capture engine (crossmodal.model.capture, crossmodal.model.inputs) against the reference.

Tricky cases covered:
  * steps past the end: a row whose output ended (EOS, or pad after EOS in a padded batch)
    before step t is left out of t and counted; a row cut by ``max_new_tokens`` too; a step
    past every output (20 > max_new_tokens) is empty; step 0 (the ``</s>`` position) is valid;
  * a module skipped on some steps: in generation the cross-attention k/v projections run once
    (then come from the KV cache); in the replay and in the per-prefix reference they run once
    per pass and their value (mean over encoder frames) is step-independent. A layer skipped
    by LayerDrop in train mode is detected and refused;
  * padding: mixed-length speech and text batches (encoder side) and rows that end at
    different steps (decoder side) give the values each example gets alone; speech needs the
    padding guard (HF leaks padded frames into the adapter's strided convolution, and with an
    adapter kernel wider than its stride, as in the organism, HF's masks count one frame too
    many);
  * a module that runs twice per forward (the adapter GLU) fills two sites, in call order;
  * hooks are gone after a run and after an exception raised inside a hook.

The model is a random tiny SeamlessM4T v2 with an untied, larger output head and stronger
cross-attention, so that outputs depend on the input and some rows end early.
"""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import (
    GenerationConfig,
    SeamlessM4TProcessor,
    SeamlessM4TTokenizer,
    SeamlessM4Tv2Model,
)

from crossmodal.data.records import Record
from crossmodal.model import capture
from crossmodal.model.capture import Capturer, CaptureResult, step_validity
from crossmodal.model.inputs import ModelBatch, batch_from_token_ids, make_batch
from crossmodal.model.load import (
    LoadedModel,
    build_random_model,
    feature_extractor,
    load_model,
    tiny_config,
)
from crossmodal.model.reference import reference_capture, reference_valid

FAMILIES = ("decoder", "ffn_act", "encoder")
STEPS = (1, 6, 11, 20)  # 20 > MAX_NEW: past the end of every output
MAX_NEW = 14
LANGS = ("eng", "deu", "spa", "fra", "jpn", "cmn")
REL_TOL = 1e-5  # max abs difference / largest activation magnitude


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's 2 cores are shared: one thread keeps these tiny runs fast and stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lively_model(dtype: str = "float32", **config: int) -> LoadedModel:
    """The tiny random model, made input-dependent; ``config`` overrides tiny_config fields."""
    loaded = build_random_model("tiny", languages=LANGS, seed=0)
    if config:  # same recipe as build_random_model, on another config
        torch.manual_seed(0)
        loaded.model = SeamlessM4Tv2Model(tiny_config(**config)).eval().requires_grad_(False)
        loaded.model.generation_config = GenerationConfig(**build_random_model_gc(loaded))
    model = loaded.model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.shared.weight.mul_(10)  # tied token embeddings dominate the position signal
        head = torch.randn(model.lm_head.weight.shape, generator=gen)
        head[0] = 0  # pad (id 0) is never the argmax
        head[3] *= 1.4  # EOS ends some outputs early
        model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)  # untied
        for layer in model.text_decoder.layers:
            layer.cross_attention.v_proj.weight.mul_(10)
            layer.cross_attention.out_proj.weight.mul_(10)
    model.to(getattr(torch, dtype))
    return loaded


def build_random_model_gc(loaded: LoadedModel) -> dict:
    return dict(
        decoder_start_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_new_tokens=32,
        text_decoder_lang_to_code_id=dict(loaded.lang_to_code_id),
    )


@pytest.fixture(scope="module")
def lively() -> LoadedModel:
    return lively_model()


def speech_records(lang: str = "deu") -> list[Record]:
    """Lengths give 49, 27, 37 and 14 feature frames: 49 % 8 and 27 % 8 < 4, so HF's adapter
    convolution reads padded frames for those rows in a padded batch."""
    rng = np.random.default_rng(0)
    return [
        Record(f"s{i}", lang, "", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        for i, n in enumerate((16000, 9000, 12345, 5000))
    ]


def text_batch() -> ModelBatch:
    rng = np.random.default_rng(3)  # three of these rows end before step 6
    rows = [rng.integers(4, 100, size=n).tolist() for n in (9, 5, 12, 7, 3, 8)]
    return batch_from_token_ids(rows, languages=["deu"] * len(rows))


@pytest.fixture(scope="module")
def batches(lively) -> dict[str, ModelBatch]:
    return {"speech": make_batch(speech_records(), "speech", lively), "text": text_batch()}


def max_rel_diff(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    assert np.array_equal(np.isnan(a), np.isnan(b))
    return float(np.nanmax(np.abs(a - b), initial=0.0)) / scale


def n_hooks(model: torch.nn.Module) -> int:
    """Hooks installed by crossmodal.model.capture (HF keeps its own output-capturing hooks)."""
    hooks = [
        h
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    ]
    return sum(1 for h in hooks if h.__module__ == "crossmodal.model.capture")


def assert_replay_matches_reference(
    loaded: LoadedModel, batch: ModelBatch, target: str = "eng"
) -> CaptureResult:
    """One run of the engine vs the reference procedure, both poolings, every step."""
    res = Capturer(loaded, FAMILIES, STEPS, max_new_tokens=MAX_NEW).run(batch, target)
    ref = reference_capture(
        loaded, batch, target, families=FAMILIES, steps=STEPS, max_new_tokens=MAX_NEW
    )
    for i, seq in enumerate(ref.sequences):
        assert res.sequences[i, : len(seq)].tolist() == seq.tolist()
        assert (res.sequences[i, len(seq) :] == 0).all()
    assert {t: r.tolist() for t, r in res.rows.items()} == ref.rows
    assert res.n_ended == ref.n_ended
    assert res.n_ended[20] == len(batch) and res.n_ended[1] == 0
    scale = max(np.nanmax(np.abs(v)) for v in ref.values.values() if v.size)
    for key, expected in ref.values.items():
        got = res.values[key].numpy()
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert max_rel_diff(got, expected, scale) <= REL_TOL, key
    unused = "text_encoder" if batch.modality == "speech" else "speech_encoder"
    values = res.values[("prefix_mean", 1)]
    assert values[:, res.index.select(families=[unused])].isnan().all()
    used = [f"{batch.modality}_encoder", "decoder", "ffn_act"]
    assert values[:, res.index.select(families=used)].isfinite().all()
    return res


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_replay_equals_reference(lively, batches, modality):
    assert_replay_matches_reference(lively, batches[modality])


@pytest.mark.parametrize(
    ("modality", "src", "tgt"),
    [
        ("speech", "deu", "eng"),
        ("text", "deu", "eng"),
        ("speech", "eng", "jpn"),
        ("text", "eng", "cmn"),
    ],
)
def test_replay_equals_reference_on_the_organism(shipped_organism, modality, src, tgt):
    """The trained organism (real tokenizer, feature extractor, padded batches of real
    sentences), x2en and en2x: its outputs run past MAX_NEW, so no row ends early here."""
    from crossmodal.organism import organism_corpus

    loaded = load_model("organism", device="cpu", dtype="float32")
    batch = make_batch(organism_corpus("test", [src], n_sentences=4), modality, loaded)
    res = assert_replay_matches_reference(loaded, batch, tgt)
    assert res.n_ended[11] == 0  # sentences are 12-20 words: every row reaches step 11


def test_some_text_row_ends_early(lively, batches):
    """The text batch exercises EOS exclusion in the comparisons above: rows 0 and 2 emit EOS
    as their 2nd token, row 3 as its 4th; in the padded batch they are then padded with 0."""
    res = Capturer(lively, ("decoder",), STEPS, max_new_tokens=MAX_NEW).run(batches["text"], "eng")
    assert res.n_ended == {1: 0, 6: 3, 11: 3, 20: 6} and res.rows[6].tolist() == [1, 4, 5]
    assert res.sequences[:, 3].tolist()[:4] == [3, 66, 3, 78] and res.sequences[3, 5] == 3
    assert (res.sequences[[0, 2], 4:] == 0).all()


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_batched_equals_unbatched(lively, batches, modality):
    batch = batches[modality]
    cap = Capturer(lively, FAMILIES, STEPS, max_new_tokens=MAX_NEW)
    res = cap.run(batch, "eng")
    scale = float(res.buffers["prefix_mean"].nan_to_num().abs().max())
    for i in range(len(batch)):
        alone = cap.run(batch.row(i), "eng")
        n = alone.sequences.shape[1]
        assert res.sequences[i, :n].tolist() == alone.sequences[0].tolist()
        for p in res.poolings:
            a, b = res.buffers[p][i].numpy(), alone.buffers[p][0].numpy()
            assert max_rel_diff(a, b, scale) <= REL_TOL, (i, p)


def test_adapter_kernel_wider_than_stride():
    """An adapter kernel wider than its stride (4 and 2; v2-large and the organism use equal
    ones): HF's sub-sampled length formula counts one frame more than the convolution
    makes; the guard masks with the real frame count."""
    loaded = lively_model(adaptor_kernel_size=4, adaptor_stride=2)
    batch = make_batch(speech_records(), "speech", loaded)
    res = assert_replay_matches_reference(loaded, batch)
    cap = Capturer(loaded, FAMILIES, STEPS, max_new_tokens=MAX_NEW)
    scale = float(res.buffers["prefix_mean"].nan_to_num().abs().max())
    for i in range(len(batch)):
        alone = cap.run(batch.row(i), "eng")
        for p in res.poolings:
            a, b = res.buffers[p][i].numpy(), alone.buffers[p][0].numpy()
            assert max_rel_diff(a, b, scale) <= REL_TOL, (i, p)


def test_speech_padding_leaks_without_the_guard(lively, batches):
    """Why the guard exists: HF's adapter reads padded frames of the 27-frame row."""
    batch = batches["speech"]
    sites = ("speech_encoder",)
    guarded = Capturer(lively, sites, (1,), ("last",), max_new_tokens=2).replay
    raw = Capturer(lively, sites, (1,), ("last",), max_new_tokens=2, pad_guard=False).replay
    seqs = torch.tensor([[3, 122, 5, 6]] * len(batch))
    alone = guarded(batch.row(1), seqs[:1]).buffers["last"][0]
    scale = float(alone.abs().max())
    assert (
        max_rel_diff(guarded(batch, seqs).buffers["last"][1].numpy(), alone.numpy(), scale)
        <= REL_TOL
    )
    assert max_rel_diff(raw(batch, seqs).buffers["last"][1].numpy(), alone.numpy(), scale) > 1e-3


def test_steps_past_eos_are_excluded_and_counted(lively, batches):
    lang = lively.lang_to_code_id["eng"]
    seqs = torch.tensor(
        [
            [3, lang, 5, 6, 3, 0, 0, 0],  # third generated token is EOS
            [3, lang, 7, 8, 9, 10, 11, 12],  # cut by max_new_tokens after 6 tokens
            [3, lang, 3, 0, 0, 0, 0, 0],  # first generated token is EOS
        ]
    )
    steps = (0, 1, 2, 3, 4, 6, 7)
    batch = text_batch()
    batch = ModelBatch(
        "text", batch.inputs[:3], batch.attention_mask[:3], batch.ids[:3], batch.languages[:3]
    )
    cap = Capturer(lively, ("decoder",), steps)
    res = cap.replay(batch, seqs)
    expected = {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1], 3: [0, 1], 4: [1], 6: [1], 7: []}
    assert {t: r.tolist() for t, r in res.rows.items()} == expected
    assert res.n_ended == {t: 3 - len(rows) for t, rows in expected.items()}
    for si, t in enumerate(steps):
        for i in range(3):
            assert res.buffers["last"][i, si].isnan().all() == (i not in expected[t])
        assert res.values[("prefix_mean", t)].shape == (len(expected[t]), cap.index.n_units)
    # brute force: each valid (row, step) equals a run of the row alone on its prefix
    model, fc1 = lively.model, cap.index.site("decoder.layers.1.ffn.fc1")
    k_proj = cap.index.site("decoder.layers.0.cross_attention.k_proj")
    for t, rows in expected.items():
        for i in rows:
            kw = batch.row(i).model_kwargs(lively.device, lively.dtype)
            seen = {}
            hooks = [
                (
                    model.text_decoder.layers[1].ffn.fc1,
                    lambda m, a, o, seen=seen: seen.__setitem__("fc1", o[0]),
                ),
                (
                    model.text_decoder.layers[0].cross_attention.k_proj,
                    lambda m, a, o, seen=seen: seen.__setitem__("k", o[0]),
                ),
            ]
            with torch.inference_mode(), capture.attached(hooks):
                model(**kw, decoder_input_ids=seqs[i : i + 1, : t + 1])
            got = res.values[("prefix_mean", t)][rows.index(i)]
            torch.testing.assert_close(got[fc1.units], seen["fc1"].mean(0), rtol=0, atol=1e-5)
            torch.testing.assert_close(
                res.values[("last", t)][rows.index(i)][fc1.units], seen["fc1"][t]
            )
            torch.testing.assert_close(got[k_proj.units], seen["k"].mean(0), rtol=0, atol=1e-5)


def test_step_validity_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        width = int(rng.integers(1, 10))
        rows = []
        for _ in range(6):
            gen = rng.integers(3, 9, size=width).tolist()  # 3 = EOS, sometimes
            cut = next((k + 1 for k, tok in enumerate(gen) if tok == 3), width)
            rows.append([3, 100, *gen[:cut], *[0] * (width - cut)])  # padded after EOS
        seqs = torch.tensor(rows)
        steps = tuple(range(width + 3))
        valid = step_validity(seqs, steps, [3, 0])
        for i, row in enumerate(rows):
            unpadded = np.array([tok for k, tok in enumerate(row) if k < 2 or tok != 0])
            assert valid[i].tolist() == [reference_valid(unpadded, t, [3, 0]) for t in steps]


@pytest.mark.parametrize("failing", ["speech_encoder", "decoder"])
def test_hooks_removed_after_run_and_after_exception(lively, batches, monkeypatch, failing):
    """A hook raising in the (guarded) encoder pass or in the decoder pass leaves no hook."""
    model = lively.model
    cap = Capturer(lively, FAMILIES, (1, 6), max_new_tokens=8)
    cap.run(batches["speech"], "eng")
    assert n_hooks(model) == 0

    def boom(self, site, out):
        if site.family == failing:
            assert n_hooks(model) > 0
            raise RuntimeError("boom")

    monkeypatch.setattr(capture._Recorder, "_reduce", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cap.run(batches["speech"], "eng")
    assert n_hooks(model) == 0


@pytest.mark.parametrize("generator", ["hf", "fast"])
def test_one_encoder_pass_and_one_replay(lively, batches, generator):
    """Generation reuses the hooked encoder pass; the replay is one decoder call."""
    model = lively.model
    calls = {"speech_encoder": 0, "text_encoder": 0, "text_decoder": 0}

    def count(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    cap = Capturer(lively, FAMILIES, STEPS, max_new_tokens=MAX_NEW, generator=generator)
    with capture.attached((getattr(model, name), count(name)) for name in calls):
        res = cap.run(batches["speech"], "eng")
        assert calls["speech_encoder"] == 1 and calls["text_encoder"] == 0
        decoder_steps = calls["text_decoder"]
        cap.replay(batches["text"], res.sequences[:, :3].repeat(2, 1)[: len(batches["text"])])
    assert calls == {"speech_encoder": 1, "text_encoder": 1, "text_decoder": decoder_steps + 1}
    assert decoder_steps == res.sequences.shape[1] - 2 + 1  # generation steps + the replay


def test_auto_generator_is_fast_only_for_plain_greedy_configs():
    """``auto`` (the default) takes the fast path unless the generation config asks for
    something plain greedy does not do (which the fast path would refuse)."""
    import copy

    loaded = build_random_model("tiny", seed=0)
    assert Capturer(loaded, ("decoder",), (1,), max_new_tokens=3).generator == "fast"
    loaded.model.generation_config = copy.deepcopy(loaded.model.generation_config)
    loaded.model.generation_config.no_repeat_ngram_size = 3
    assert Capturer(loaded, ("decoder",), (1,), max_new_tokens=3).generator == "hf"
    assert Capturer(loaded, ("decoder",), (1,), max_new_tokens=3, generator="fast").generator == (
        "fast"
    )  # asked for explicitly: refused when it runs (tests/test_fastgen.py)


def test_skipped_layer_is_detected():
    loaded = build_random_model("tiny", seed=0)
    cap = Capturer(loaded, ("decoder",), (1,), max_new_tokens=3)
    loaded.model.train()
    with pytest.raises(ValueError, match=r"model.training must be one of \[False\], got True"):
        Capturer(loaded, ("decoder",), (1,))
    loaded.model.text_decoder.layerdrop = 1.0  # train-mode LayerDrop skips every decoder layer
    with pytest.raises(RuntimeError, match="did not run as expected in the decoder pass"):
        cap.run(text_batch(), "eng")
    assert n_hooks(loaded.model) == 0


def test_fast_generator_gives_the_same_result(lively, batches):
    hf = Capturer(lively, ("decoder",), STEPS, max_new_tokens=MAX_NEW).run(batches["text"], "eng")
    fast = Capturer(lively, ("decoder",), STEPS, max_new_tokens=MAX_NEW, generator="fast").run(
        batches["text"], "eng"
    )
    assert torch.equal(hf.sequences, fast.sequences)
    for p in hf.poolings:
        torch.testing.assert_close(hf.buffers[p], fast.buffers[p], equal_nan=True)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN where NaN), through an integer view of the same width."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("modality", ["speech", "text"])
def test_replay_reusing_the_cross_attention_cache_is_bit_identical(batches, modality, dtype):
    """The fast path's cross-attention keys/values, reused by the replay (and fed to the
    k_proj/v_proj hooks), give every buffer bit for bit as projecting the frames again; rows
    end at different steps, encoder and decoder families together."""
    loaded = lively_model(dtype)
    cap = Capturer(loaded, FAMILIES, STEPS, max_new_tokens=MAX_NEW, generator="fast")
    reused = cap.run(batches[modality], "eng")
    cap.reuse_cross_kv = False
    projected = cap.run(batches[modality], "eng")
    assert torch.equal(reused.sequences, projected.sequences)
    assert not bool(reused.valid.all())  # some rows end early
    for p in cap.poolings:
        assert _bits_equal(reused.buffers[p], projected.buffers[p]), p
    kv = [s for s in cap.index.sites if "cross_attention.k_proj" in s.module_path]
    assert kv and not reused.buffers["last"][:, 0, kv[0].offset].isnan().any()


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_cross_attention_cache_reuse_on_the_organism(shipped_organism, modality):
    loaded = load_model(shipped_organism)
    records = speech_records() if modality == "speech" else None
    batch = (
        make_batch(records, "speech", loaded)
        if records
        else batch_from_token_ids([[5, 9, 30, 41, 7], [12, 8, 3 + 40, 6]])
    )
    cap = Capturer(loaded, ("decoder",), (0, 1, 6, 11), max_new_tokens=12, generator="fast")
    reused = cap.run(batch, "eng")
    cap.reuse_cross_kv = False
    projected = cap.run(batch, "eng")
    for p in cap.poolings:
        assert _bits_equal(reused.buffers[p], projected.buffers[p]), p


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_returns_float32(lively, batches, dtype):
    batch = batches["speech"]
    full = Capturer(lively, FAMILIES, (1, 6), max_new_tokens=8).run(batch, "eng")
    half = lively_model(dtype)
    res = Capturer(half, FAMILIES, (1, 6), max_new_tokens=8).replay(batch, full.sequences)
    assert res.buffers["last"].dtype == torch.float32
    scale = float(full.buffers["last"].nan_to_num().abs().max())
    for p in full.poolings:
        diff = (res.buffers[p] - full.buffers[p]).nan_to_num().abs().max()
        assert diff <= 0.05 * scale  # bf16 keeps ~3 significant digits, fp16 ~4


def test_texts_without_processor_are_token_ids(lively, batches):
    res = Capturer(lively, ("decoder",), (1,), max_new_tokens=MAX_NEW).run(batches["text"], "eng")
    for text, tokens, seq in zip(res.texts, res.tokens, res.sequences, strict=True):
        assert text == " ".join(map(str, tokens))
        assert tokens == [t for t in seq[2:].tolist()][: len(tokens)] and 3 not in tokens


# ---------------------------------------------------------------- inputs and errors


@pytest.fixture(scope="module")
def with_processor(tmp_path_factory, lively) -> LoadedModel:
    """The lively model with a tiny real tokenizer (sentencepiece, loaded as the organism's)."""
    root = tmp_path_factory.mktemp("tok")
    sents = ["the cat sat on the mat", "der hund lief schnell", "el gato come pescado"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents),
        model_prefix=str(root / "sentencepiece.bpe"),
        vocab_size=40,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        model_type="bpe",
        minloglevel=2,
    )
    tok = SeamlessM4TTokenizer.from_pretrained(
        str(root),
        additional_special_tokens=[f"__{x}__" for x in LANGS],
        src_lang="eng",
        tgt_lang="eng",
    )
    proc = SeamlessM4TProcessor(feature_extractor=feature_extractor(), tokenizer=tok)
    return LoadedModel(lively.model, proc, "test", "-", dict(lively.lang_to_code_id))


def test_text_batch_through_the_processor(with_processor):
    recs = [Record("a", "deu", "der hund lief schnell"), Record("b", "deu", "der hund")]
    batch = make_batch(recs, "text", with_processor)
    tok = with_processor.processor.tokenizer
    assert batch.modality == "text" and batch.ids == ("a", "b")
    assert (batch.inputs[:, 0] == tok.convert_tokens_to_ids("__deu__")).all()
    lengths = batch.attention_mask.sum(1)
    assert lengths[0] > lengths[1] and batch.inputs[1, lengths[1] - 1] == tok.eos_token_id
    assert (batch.inputs[1, lengths[1] :] == tok.pad_token_id).all()
    res = Capturer(with_processor, ("decoder",), (1, 2), max_new_tokens=4).run(batch, "deu")
    assert res.texts == tok.batch_decode(res.tokens, skip_special_tokens=True)


def test_speech_batch_with_and_without_processor(with_processor, lively):
    recs = speech_records()
    a = make_batch(recs, "speech", with_processor)
    b = make_batch(recs, "speech", lively)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.attention_mask, b.attention_mask)
    assert a.inputs.shape[:2] == (4, 49) and a.attention_mask.sum(1).tolist() == [49, 27, 37, 14]
    row = a.row(1)
    assert row.inputs.shape[1] == 27 and row.attention_mask.all()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_input_errors_are_one_line(with_processor, lively):
    rec = speech_records()[0]
    slow = Record("x", "deu", "", rec.audio, 8000)
    with pytest.raises(
        ValueError, match=r"sampling_rate must be one of \[16000\], got 8000 .*resample"
    ) as err:
        make_batch([rec, slow], "speech", lively)
    one_line(err)
    with pytest.raises(
        ValueError, match=r"language must be one of \[.*'deu'.*\], got 'xyz'; "
    ) as err:
        make_batch([Record("a", "xyz", "der hund")], "text", with_processor)
    one_line(err)
    with pytest.raises(ValueError, match="single source language per text batch"):
        make_batch([Record("a", "deu", "x"), Record("b", "spa", "y")], "text", with_processor)
    with pytest.raises(ValueError, match="got None for record 'a'"):
        make_batch([Record("a", "deu", "x")], "speech", lively)
    with pytest.raises(ValueError, match="processor must be one of"):
        make_batch([Record("a", "deu", "x")], "text", lively)
    with pytest.raises(
        ValueError, match=r"modality must be one of \['speech', 'text'\], got 'video'"
    ):
        make_batch([rec], "video", lively)


def test_capturer_errors_are_one_line(lively, batches):
    with pytest.raises(ValueError, match=r"tgt_lang must be one of \[.*\], got 'xx'; ") as err:
        Capturer(lively).run(batches["text"], "xx")
    one_line(err)
    with pytest.raises(ValueError, match="steps must be one of"):
        Capturer(lively, steps=(1, -2))
    with pytest.raises(ValueError, match="distinct"):
        Capturer(lively, steps=(1, 1))
    with pytest.raises(ValueError, match="poolings must be one of"):
        Capturer(lively, poolings=("max",))
    with pytest.raises(ValueError, match="generator must be one of"):
        Capturer(lively, generator="beam")
    with pytest.raises(ValueError, match="family must be one of"):
        Capturer(lively, families=("attention",))
