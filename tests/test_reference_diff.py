"""The reference study's input and example handling, each as the option that claims it, and
the measurement of its effect (crossmodal/reduce/reference_diff.py; docs/method.md,
"Differences from the reference implementation")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from crossmodal.model.capture import Capturer
from crossmodal.model.inputs import (
    last_frame_reaches_decoder,
    make_batch,
    speech_frames,
    speech_lengths,
)
from crossmodal.model.load import load_model
from crossmodal.model.reference import (
    REFERENCE_TEXT_WIDTH,
    kv_means_over,
    length_majority_filter,
    pooled_length,
    reference_capture,
    reference_text_batch,
    speech_key_lengths,
)
from crossmodal.model.units import UnitIndex
from crossmodal.reduce import reference_diff as rd

STEPS = (1, 6, 11)


@pytest.fixture(scope="module")
def organism(shipped_organism):
    return load_model("organism", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def quick_records():
    """The --quick run's records: 8 per source language."""
    from crossmodal.data.sources import OrganismSource

    source = OrganismSource(8, 0)
    return {lang: list(source.records(lang, "test")) for lang in rd.SOURCES}


def _tag(loaded, code: str) -> int:
    return loaded.processor.tokenizer.convert_tokens_to_ids(f"__{code}__")


def test_default_tag_is_the_tokenizers_default_not_the_source(organism, quick_records):
    records = quick_records["deu"][:4]
    ours = make_batch(records, "text", organism)  # also sets the tokenizer's src_lang to deu
    ref = reference_text_batch(records, organism, default_tag=True, pad_to=None)
    assert (ours.inputs[:, 0] == _tag(organism, "deu")).all()
    assert (ref.inputs[:, 0] == _tag(organism, "eng")).all()  # the saved default, not the state
    assert torch.equal(ref.inputs[:, 1:], ours.inputs[:, 1:])  # only the tag differs
    assert ref.languages == ours.languages
    source_tag = reference_text_batch(records, organism, default_tag=False, pad_to=None)
    assert torch.equal(source_tag.inputs, ours.inputs)
    res = Capturer(organism, "decoder", (1,), max_new_tokens=4).run(ref, "eng")
    assert (res.sequences[:, 1] == _tag(organism, "eng")).all()  # the decoder's target tag


def test_padding_to_256_and_kv_means_over_every_position(organism, quick_records):
    """The k/v means of the padded variant equal a brute-force mean over the 256 positions of
    each row run alone; every other unit keeps crossmodal's value."""
    records = {"spa": quick_records["spa"][:3]}
    batch = reference_text_batch(records["spa"], organism, default_tag=False)
    assert batch.inputs.shape[1] == REFERENCE_TEXT_WIDTH
    assert torch.equal(
        batch.attention_mask.sum(1),
        make_batch(records["spa"], "text", organism).attention_mask.sum(1),
    )
    padded = rd.capture_run(organism, records, "text", "pad256_kv", steps=(1,))
    ours = rd.capture_run(organism, records, "text", "crossmodal", steps=(1,))
    index = UnitIndex.from_model(organism.model, "decoder")
    kv = rd.kv_units(index)
    modules = dict(organism.model.named_modules())
    for i in range(3):
        ids, mask = batch.inputs[i : i + 1], batch.attention_mask[i : i + 1]
        with torch.inference_mode():
            hidden = organism.model.text_encoder(input_ids=ids, attention_mask=mask)[0][0].double()
        for site in (s for s in index.sites if s.positions == "encoder_output"):
            w, b = (p.double() for p in modules[site.module_path].parameters())
            brute = np.mean(
                [(w @ hidden[j] + b).numpy() for j in range(REFERENCE_TEXT_WIDTH)], axis=0
            )
            got = padded.values[1][i, site.offset : site.offset + site.n_features]
            np.testing.assert_allclose(got, brute, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded.values[1][:, ~kv], ours.values[1][:, ~kv], atol=1e-4)
    assert not np.allclose(padded.values[1][:, kv], ours.values[1][:, kv], atol=1e-2)


def test_kv_means_over_given_lengths_is_a_plain_mean(organism):
    index = UnitIndex.from_model(organism.model, "decoder")
    hidden = torch.randn(2, 7, organism.model.config.hidden_size)
    got = kv_means_over(organism, index, hidden, torch.tensor([7, 3]))
    site = next(s for s in index.sites if s.positions == "encoder_output")
    module = dict(organism.model.named_modules())[site.module_path]
    with torch.inference_mode():
        out = module(hidden).double().numpy()
    np.testing.assert_allclose(got[site.name][0], out[0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[site.name][1], out[1, :3].mean(0), rtol=1e-6)


@pytest.mark.parametrize(
    "shape", [(1, 5, 9), (1, 9, 5), (1, 6, 6), (1, 120, 96), (1, 192, 40), (1, 7)]
)
def test_pooled_length_is_the_reference_transpose_then_mean(shape):
    """The reference pooling, written out: transpose [1, A, B] when A > B, mean over axis 1,
    keep a row [1, T]."""
    arr = np.zeros(shape)
    if arr.ndim == 3 and arr.shape[1] > arr.shape[2]:
        arr = np.transpose(arr, (0, 2, 1))
    pooled = np.mean(arr, axis=1)
    row = pooled[None, :] if pooled.ndim == 1 else pooled
    assert pooled_length(shape) == row.shape[1]


def test_length_majority_filter_rule():
    """Brute force of the rule: a key is strong when its most common length has >= 90% of
    the examples; an example survives iff every strong key has its majority length."""
    n = 20
    lengths = {
        "a": np.array([96] * 19 + [100]),  # strong: example 19 dropped
        "b": np.array([96] * 18 + [97, 96]),  # strong (90%): example 18 dropped
        "c": np.array([96] * 17 + [120, 121, 122]),  # weak (85%): decides nothing
    }
    got = length_majority_filter(lengths)
    expected = np.ones(n, bool)
    expected[[18, 19]] = False
    assert np.array_equal(got.kept, expected)
    assert got.weak_keys == ("c",)
    assert got.majority == {"a": 96, "b": 96, "c": 96}


def test_length_filter_drops_exactly_the_examples_longer_than_the_hidden_size(
    organism, quick_records
):
    """On the organism (hidden size 96) fewer than 10% of the quick examples have more than
    96 frames: the filter drops exactly those, whatever their language."""
    every = [r for recs in quick_records.values() for r in recs]
    batch = make_batch(every, "speech", organism, speech_last_frame="keep")
    lengths = speech_key_lengths(organism, batch)
    result = length_majority_filter(lengths)
    hidden = organism.model.config.hidden_size
    long = batch.speech_frames.numpy() > hidden
    assert 0 < long.sum() < 0.1 * len(every)
    assert np.array_equal(result.kept, ~long)
    assert not result.weak_keys
    assert rd.length_filter(organism, quick_records)["dropped"] == [
        f"{r.language}/{r.id}" for r, x in zip(every, long, strict=True) if x
    ]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # one-frame inputs: variance of 1 frame
def test_speech_frames_is_the_lone_feature_extractor_width(organism):
    fe = organism.processor.feature_extractor
    rng = np.random.default_rng(0)
    sizes = [400, 401, 559, 560, 719, 720, 881, *rng.integers(400, 40_000, 30).tolist()]
    for n in sizes:
        out = fe(
            rng.standard_normal(n).astype(np.float32), sampling_rate=16_000, return_tensors="pt"
        )
        assert int(speech_frames([n], fe.stride)[0]) == out["input_features"].shape[1], n


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_batched_capture_equals_the_models_batch1_run(organism, quick_records, mode):
    """``keep``: a padded batch gives every row what HF gives it alone on the feature
    extractor's own output (last frame marked as padding but read by the adapter); ``drop``:
    what HF gives the row cut to its mask. Decoder-position units to float tolerance; the
    k/v means over every frame of the lone run (the reference's pooling) as reference_diff
    computes them."""
    records = quick_records["jpn"][:6]
    batch = make_batch(records, "speech", organism, speech_last_frame=mode)
    cap = Capturer(organism, "decoder", STEPS, ("prefix_mean", "last"), max_new_tokens=16)
    res = cap.run(batch, "eng")
    ref = reference_capture(organism, batch, "eng", steps=STEPS, max_new_tokens=16)
    kv = rd.kv_units(cap.index)
    all_frames = rd._speech_kv(organism, cap.index, batch)
    for key in res.values:
        got, want = res.values[key].numpy().astype(np.float64), ref.values[key]
        np.testing.assert_allclose(got[:, ~kv], want[:, ~kv], atol=5e-5, rtol=1e-4)
        rd._write_kv(
            got[:, None], cap.index, {k: v[ref.rows[key[1]]] for k, v in all_frames.items()}
        )
        np.testing.assert_allclose(got[:, kv], want[:, kv], atol=5e-5, rtol=1e-4)


def test_keep_changes_exactly_the_rows_with_a_half_padded_last_frame(organism, quick_records):
    records = quick_records["fra"][:8]
    drop = make_batch(records, "speech", organism)
    keep = make_batch(records, "speech", organism, speech_last_frame="keep")
    half = (keep.speech_frames > keep.attention_mask.sum(1)).numpy()
    reaches = last_frame_reaches_decoder(
        organism.model, keep.attention_mask, keep.speech_frames
    ).numpy()
    # brute force: a kernel-2, stride-2, padding-1 convolution; output j reads frames 2j-1, 2j
    ones = keep.attention_mask.sum(1).numpy()
    attended = ones // 2 + 1  # HF's formula, kernel 2: floor((n + 2 - 2) / 2) + 1
    assert np.array_equal(reaches, half & (2 * (attended - 1) >= ones))
    assert 0 < reaches.sum() < half.sum() < len(records)
    cap = Capturer(organism, "decoder", STEPS, ("prefix_mean",), max_new_tokens=16)
    a = cap.run(drop, "eng").buffers["prefix_mean"].numpy()
    b = cap.run(keep, "eng").buffers["prefix_mean"].numpy()
    moved = np.nanmax(np.abs(a - b), axis=(1, 2))
    assert (moved[reaches] > 1e-3).all() and (moved[~reaches] == 0).all()
    lengths = speech_lengths(organism.model, keep.attention_mask, keep.speech_frames)
    assert torch.equal(lengths[0].long(), keep.speech_frames)


def test_speech_last_frame_error_is_one_line(organism, quick_records):
    with pytest.raises(
        ValueError, match=r"^speech_last_frame must be one of \['drop', 'keep'\], got 'all'$"
    ):
        make_batch(quick_records["deu"][:1], "speech", organism, speech_last_frame="all")


def test_ap_spearman_and_overlap_match_sklearn_scipy_and_brute_force():
    rng = np.random.default_rng(1)
    n, units = 30, 40
    values = np.round(rng.standard_normal((n, units)), 1)  # ties
    values[[3, 7], :] = np.nan  # rows left out of the step
    languages = np.array(list(rd.SOURCES) * (n // len(rd.SOURCES)))
    ap = rd.per_unit_ap(rd.Run({1: values}, languages), 1, rd.SOURCES)
    rows = ~np.isnan(values).all(1)
    for li, lang in enumerate(rd.SOURCES):
        for u in range(units):
            want = average_precision_score(languages[rows] == lang, values[rows, u])
            assert abs(ap[li, u] - want) < 1e-12
    a, b = ap[0], np.round(ap[0] + rng.normal(0, 0.05, units), 2)
    b[5] = np.nan
    fin = np.isfinite(b)
    assert rd.spearman(a, b) == pytest.approx(spearmanr(a[fin], b[fin]).statistic, abs=1e-12)

    def brute_top(x, k):
        order = sorted((i for i in range(x.size) if np.isfinite(x[i])), key=lambda i: (-x[i], i))
        return set(order[:k])

    for k in (1, 5, 10, 39):
        assert rd.top_overlap(a, b, k) == len(brute_top(a, k) & brute_top(b, k))


@pytest.mark.integration
def test_quick_command_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "reference-diff.json"
    assert rd.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert printed.startswith("| modality | difference | step | deu |")
    expected = {
        (m, v, t, lang)
        for m, vs in rd.VARIANTS.items()
        for v in vs
        for t in STEPS
        for lang in rd.SOURCES
    }
    assert {
        (r["modality"], r["variant"], r["step"], r["language"]) for r in result["rows"]
    } == expected
    assert all(-1 <= r["spearman"] <= 1 and 0 <= r["top100_overlap"] <= 100 for r in result["rows"])
    filt = result["length_filter"]
    assert filt["n_dropped"] == filt["frames_over_hidden"] == len(filt["dropped"])
    assert result["max_abs_value_change"]["speech/length_filter"]["all_units"] == 0.0
    assert result["max_abs_value_change"]["text/pad256_kv"]["outside_kv"] < 1e-3


def test_speech_last_frame_is_validated_by_the_collect_and_steer_schemas(
    shipped_organism, tmp_path
):
    from helpers import collect_config

    from crossmodal.collect.config import load_config, validate
    from crossmodal.steer.grid import load_grid

    raw = collect_config(shipped_organism, tmp_path / "s.zarr")
    errors = validate({**raw, "speech_last_frame": "all"})
    assert (
        len(errors) == 1
        and "speech_last_frame" in errors[0]
        and "'drop'" in errors[0]
        and "'keep'" in errors[0]
    )
    drop, keep = load_config(raw), load_config({**raw, "speech_last_frame": "keep"})
    assert (drop.speech_last_frame, keep.speech_last_frame) == ("drop", "keep")
    assert drop.hash() != keep.hash()
    old = {k: v for k, v in drop.to_dict().items() if k != "speech_last_frame"}
    assert load_config({**raw}).hash() == drop.hash() and "speech_last_frame" not in old
    grid = {
        "model": "organism",
        "selectivity": {"path": str(tmp_path / "sel.zarr")},
        "output": str(tmp_path / "steer"),
        "speech_last_frame": "keep",
    }
    assert load_grid(grid).speech_last_frame == "keep"
    assert load_grid(grid).context() != load_grid({**grid, "speech_last_frame": "drop"}).context()


@pytest.mark.integration
def test_collect_with_keep_stores_the_models_batch1_values(
    monkeypatch, tmp_path, organism, shipped_organism
):
    """End to end: a batched collect with ``speech_last_frame: keep`` stores, per unit, the
    mean of what HF gives each example alone on the feature extractor's output; ``drop``
    stores something else (two of the three examples have a half-padded last frame)."""
    import xarray as xr
    from helpers import collect_config, local_collect

    from crossmodal.data.sources import OrganismSource

    common = {
        "languages": ["eng", "deu"],
        "tasks": ["x2en"],
        "modalities": ["speech"],
        "steps": [1, 6],
        "families": ["decoder"],
        "batch_size": 3,
        "pilot_size": 3,
        "max_new_tokens": 8,
        "keep_parts": False,
    }
    means = {}
    for mode in ("keep", "drop"):
        out = tmp_path / f"{mode}.zarr"
        local_collect(
            monkeypatch, collect_config("organism", out, **common, speech_last_frame=mode)
        )
        ds = xr.open_zarr(str(out), group="stats/decoder", consolidated=False)
        cond = {"task": "x2en", "modality": "speech", "language": "deu", "pooling": "prefix_mean"}
        means[mode] = ds["mean"].sel(cond).values  # [step, unit]
    records = list(OrganismSource(3, 0).records("deu", "test"))
    batch = make_batch(records, "speech", organism, speech_last_frame="keep")
    assert int((batch.speech_frames > batch.attention_mask.sum(1)).sum()) == 2
    ref = reference_capture(organism, batch, "eng", steps=(1, 6), max_new_tokens=8)
    kv = rd.kv_units(UnitIndex.from_model(organism.model, "decoder"))
    for si, step in enumerate((1, 6)):
        want = ref.values[("prefix_mean", step)].mean(0)
        np.testing.assert_allclose(means["keep"][si, ~kv], want[~kv], atol=5e-5, rtol=1e-4)
        assert np.abs(means["drop"][si, ~kv] - want[~kv]).max() > 1e-3


def test_steer_forcing_with_keep_equals_lone_runs(organism, quick_records):
    """Steering's generation on a ``keep`` batch: each row's tokens are those HF generates
    for it alone (unforced), and a forced row in a batch equals the same row alone."""
    from crossmodal.model.forcing import NO_FORCING, generate_forced

    records = quick_records["fra"][:4]
    batch = make_batch(records, "speech", organism, speech_last_frame="keep")
    kwargs = batch.model_kwargs(organism.device, organism.dtype)
    forced = {"text_decoder.layers.1.ffn.fc1": ([0, 3, 9], [4.0, -2.0, 5.0])}
    plan = [NO_FORCING, forced, NO_FORCING, forced]
    out = generate_forced(
        organism, kwargs, "eng", plan, max_new_tokens=8, speech_frames=batch.speech_frames
    )
    for i in range(len(records)):
        row = batch.row(i)
        row_kwargs = row.model_kwargs(organism.device, organism.dtype)
        alone = generate_forced(
            organism,
            row_kwargs,
            "eng",
            [plan[i]],
            max_new_tokens=8,
            speech_frames=row.speech_frames,
        )[0]
        assert torch.equal(_pad(alone, 12), _pad(out[i], 12)), i
        if not plan[i]:
            with torch.inference_mode():
                hf = organism.model.generate(
                    **row_kwargs,
                    tgt_lang="eng",
                    generate_speech=False,
                    num_beams=1,
                    do_sample=False,
                    max_new_tokens=8,
                )
            assert torch.equal(_pad(hf.sequences[0], 12), _pad(out[i], 12)), i


def _pad(seq: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(seq, (0, width - seq.shape[-1]))
