"""Forcing hooks on a tiny random SeamlessM4T v2.

Tricky cases covered: a row alone vs batched with other interventions and unforced rows
(text and speech input); the unforced baseline vs plain ``generate``; forced values at every
position and every decoding step; cross-attention k/v computed once over encoder frames
and cached; fc1 (pre-ReLU) vs act (post-ReLU); Conv1d units with features on dim 1; hooks
removed after an exception; bad paths, lengths, features and batch sizes.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from crossmodal.model.fastgen import greedy_generate
from crossmodal.model.forcing import (
    NO_FORCING,
    SteeringError,
    forcing,
    generate_forced,
    plan_batch,
)

L0 = "text_decoder.layers.0"
L1 = "text_decoder.layers.1"
MAX_NEW = 12


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model.model


@pytest.fixture(scope="module")
def deu(tiny_model):
    return tiny_model.lang_to_code_id["deu"]


def _hf(model, inputs, lang="deu"):
    with torch.inference_mode():
        return model.generate(
            **inputs,
            tgt_lang=lang,
            generate_speech=False,
            num_beams=1,
            do_sample=False,
            max_new_tokens=MAX_NEW,
        ).sequences


def _text(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 100, (1, 9), generator=gen)
    return {
        "input_ids": ids.repeat(batch, 1),
        "attention_mask": torch.ones(batch, 9, dtype=torch.long),
    }


def _speech(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 40, 160, generator=gen)
    return {
        "input_features": feats.repeat(batch, 1, 1),
        "attention_mask": torch.ones(batch, 40, dtype=torch.long),
    }


INTERVENTIONS = [
    {f"{L0}.ffn.fc1": ([1, 5, 7, 90], [4.0, -3.0, 6.0, 5.0])},
    NO_FORCING,
    {f"{L1}.cross_attention.k_proj": (list(range(0, 64, 2)), [3.0] * 32)},
    {f"{L1}.ffn.act": (list(range(40)), [8.0] * 40), f"{L0}.self_attn.q_proj": ([0], [-5.0])},
    {
        f"{L1}.cross_attention.v_proj": (list(range(64)), [2.0] * 64),
        "text_decoder.layer_norm": ([3], [9.0]),
    },
]


def _pad(seq: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(seq, (0, width - seq.shape[-1]))


@pytest.mark.parametrize("make_inputs", [_text, _speech], ids=["text", "speech"])
def test_row_alone_equals_row_in_mixed_batch(model, deu, make_inputs):
    batched = generate_forced(
        model, make_inputs(len(INTERVENTIONS)), "deu", INTERVENTIONS, max_new_tokens=MAX_NEW
    )
    shared = generate_forced(
        model,
        make_inputs(1),
        "deu",
        INTERVENTIONS,
        max_new_tokens=MAX_NEW,
        rows=[0] * len(INTERVENTIONS),
    )
    assert torch.equal(batched, shared)
    for row, intervention in enumerate(INTERVENTIONS):
        alone = generate_forced(
            model, make_inputs(1), "deu", [intervention], max_new_tokens=MAX_NEW
        )
        width = max(alone.shape[-1], batched.shape[-1])
        assert torch.equal(_pad(alone[0], width), _pad(batched[row], width)), row


@pytest.mark.parametrize("make_inputs", [_text, _speech], ids=["text", "speech"])
def test_unforced_rows_equal_plain_generate(model, deu, make_inputs):
    plain = _hf(model, make_inputs(1))
    batched = generate_forced(
        model, make_inputs(len(INTERVENTIONS)), "deu", INTERVENTIONS, max_new_tokens=MAX_NEW
    )
    width = max(plain.shape[-1], batched.shape[-1])
    assert torch.equal(_pad(plain[0], width), _pad(batched[1], width))


def test_forcing_changes_the_output(model, deu):
    out = generate_forced(
        model, _text(len(INTERVENTIONS)), "deu", INTERVENTIONS, max_new_tokens=MAX_NEW
    )
    baseline = out[1]
    changed = [row for row in (0, 2, 3, 4) if not torch.equal(out[row], baseline)]
    assert len(changed) >= 3, (changed, out)


def test_forced_values_reach_every_position_and_step(model, deu):
    """A recorder hooked after the forcing hook sees the constants at every call."""
    site, cross = f"{L0}.ffn.fc1", f"{L1}.cross_attention.k_proj"
    interventions = [{site: ([2, 9], [7.5, -1.25]), cross: ([4], [0.5])}, NO_FORCING]
    plan = plan_batch(model, interventions)
    seen: dict[str, list[torch.Tensor]] = {site: [], cross: []}
    handles = []
    with forcing(model, plan):
        for path in seen:
            handles.append(
                model.get_submodule(path).register_forward_hook(
                    lambda m, a, o, p=path: seen[p].append(o.detach().clone())
                )
            )
        with torch.inference_mode():
            model.generate(
                **_text(2),
                decoder_input_ids=torch.tensor([[deu], [deu]]),
                generate_speech=False,
                max_new_tokens=MAX_NEW,
            )
    for h in handles:
        h.remove()
    assert len(seen[site]) >= 3  # one call per decoding step
    assert seen[site][0].shape[1] == 2  # step 0 sees [</s>, lang_tag]
    for out in seen[site]:
        assert torch.all(out[0, :, 2] == 7.5) and torch.all(out[0, :, 9] == -1.25)
        assert not torch.all(out[1, :, 2] == 7.5)
    # cross-attention k/v: computed once over the 9 encoder positions, then cached
    assert len(seen[cross]) == 1 and seen[cross][0].shape[1] == 9
    assert torch.all(seen[cross][0][0, :, 4] == 0.5)
    assert not torch.all(seen[cross][0][1, :, 4] == 0.5)


def test_fc1_forcing_is_pre_relu(model, deu):
    """A negative constant on fc1 units becomes 0 after the ReLU; on act it stays negative."""
    fc1, act = f"{L0}.ffn.fc1", f"{L0}.ffn.act"
    seen = []
    for site in (fc1, act):
        plan = plan_batch(model, [{site: ([3], [-2.0])}])
        with forcing(model, plan):
            h = model.get_submodule(act).register_forward_hook(
                lambda m, a, o: seen.append(o[0, :, 3].clone())
            )
            with torch.inference_mode():
                model.generate(
                    **_text(1),
                    decoder_input_ids=torch.tensor([[deu]]),
                    generate_speech=False,
                    max_new_tokens=2,
                )
            h.remove()
    assert torch.all(seen[0] == 0.0)
    assert torch.all(seen[-1] == -2.0)


def test_conv1d_features_are_channels():
    conv = nn.Sequential(nn.Conv1d(3, 5, 1))
    x = torch.randn(2, 3, 7)
    plan = plan_batch(conv, [{"0": ([4], [1.5])}, NO_FORCING])
    assert plan.sites["0"].feature_dim == 1
    with forcing(conv, plan):
        y = conv(x)
    ref = conv(x)
    assert torch.all(y[0, 4] == 1.5)
    assert torch.equal(y[0, :4], ref[0, :4]) and torch.equal(y[1], ref[1])


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_after_exception(model, deu):
    before = _n_hooks(model)
    plan = plan_batch(model, INTERVENTIONS[:1])
    fc1 = model.get_submodule(f"{L0}.ffn.fc1")
    with pytest.raises(RuntimeError, match="boom"), forcing(model, plan):
        assert len(fc1._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(fc1._forward_hooks) == 0
    assert _n_hooks(model) == before


def test_batch_mismatch_raises_and_leaves_no_hooks(model, deu):
    before = _n_hooks(model)
    with pytest.raises(
        SteeringError, match=r"rows must name one input in \[0, 3\) per intervention \(2\), got 3"
    ):
        generate_forced(model, _text(3), "deu", INTERVENTIONS[:1] * 2, max_new_tokens=3)
    with pytest.raises(SteeringError, match=r"rows must name one input in \[0, 1\)"):
        generate_forced(
            model, _text(1), "deu", INTERVENTIONS[:1] * 2, max_new_tokens=3, rows=[0, 1]
        )
    with pytest.raises(ValueError, match="tgt_lang must be one of"):
        generate_forced(model, _text(2), ["deu"] * 3, INTERVENTIONS[:1] * 2, max_new_tokens=3)
    plan = plan_batch(model, INTERVENTIONS[:1] * 2)
    with (
        pytest.raises(SteeringError, match="batch size at site .* must be 2"),
        forcing(model, plan),
    ):
        model.text_decoder.layers[0].ffn.fc1(torch.zeros(3, 1, 64))
    assert _n_hooks(model) == before


def test_plan_errors(model):
    with pytest.raises(
        SteeringError,
        match="site must be a module path .* did you mean .*'text_decoder.layers.0.ffn.fc1'",
    ):
        plan_batch(model, [{"text_decoder.layers.0.ffn.fc": ([1], [1.0])}])
    with pytest.raises(SteeringError, match=r"feature of site .* must be in \[0, 128\), got 128"):
        plan_batch(model, [{f"{L0}.ffn.fc1": ([128], [1.0])}])
    with pytest.raises(SteeringError, match="values must match features in length"):
        plan_batch(model, [{f"{L0}.ffn.fc1": ([1, 2], [1.0])}])


def test_plan_tensors(model):
    plan = plan_batch(
        model,
        [{f"{L0}.ffn.fc1": ([5, 1], [2.0, 3.0])}, NO_FORCING, {f"{L0}.ffn.fc1": ([5], [4.0])}],
    )
    site = plan.sites[f"{L0}.ffn.fc1"]
    assert site.cols.tolist() == [1, 5]
    assert site.mask.shape == site.values.shape == (3, 128)  # the module's full width
    assert site.mask[:, [1, 5]].tolist() == [[True, True], [False, False], [False, True]]
    assert int(site.mask.sum()) == 3
    assert site.values[0, [1, 5]].tolist() == [3.0, 2.0] and site.values[2, 5] == 4.0


def _legacy_forcing(model, interventions):
    """The forcing written the slow, obvious way: each row's features set one by one (the
    values cast as the plan casts them); the reference for the full-width plan's hook."""
    handles = []
    for path in {p for row in interventions for p in row}:
        module = model.get_submodule(path)
        dim = 1 if isinstance(module, nn.Conv1d) else -1

        def hook(m, a, out, path=path, dim=dim):
            out = out.clone()
            for b, row in enumerate(interventions):
                feats, vals = row.get(path, ((), ()))
                for f, v in zip(feats, vals, strict=True):
                    value = torch.tensor(v, dtype=torch.float32).to(out.dtype)
                    out.select(dim, int(f))[b] = value
            return out

        handles.append(module.register_forward_hook(hook))
    return handles


def _random_rows(n: int, paths: list[str], seed: int) -> list[dict]:
    """Row 0 unforced; then a different random set per row, as lists or as arrays, with
    features repeated within a row (the last value wins)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [NO_FORCING]
    for r in range(1, n):
        row = {}
        for path in paths[r % 3 :: 2]:
            feats = torch.randint(0, 64, (20,), generator=gen)
            vals = torch.randn(20, generator=gen, dtype=torch.float64)
            row[path] = (feats.numpy(), vals.numpy()) if r % 2 else (feats.tolist(), vals.tolist())
        rows.append(row)
    return rows


@contextmanager
def _recorded(model, paths, seen):
    """Record every output of ``paths`` (registered last: after any forcing hook)."""
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: seen.setdefault(p, []).append(o.clone())
        )
        for p in paths
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_full_width_plan_equals_feature_by_feature_forcing(model):
    """Many sites, a different set per row: every forced module output at every decoding
    step, and the generated tokens, are bit-identical to setting features one at a time."""
    layers = (L0, L1)
    paths = [f"{la}.{m}" for la in layers for m in ("ffn.fc1", "ffn.act", "self_attn.q_proj")]
    paths += [f"{L1}.cross_attention.k_proj", "text_decoder.layer_norm"]
    rows = _random_rows(6, paths, seed=11)
    inputs = _text(len(rows))
    plan_seen: dict[str, list[torch.Tensor]] = {}
    legacy_seen: dict[str, list[torch.Tensor]] = {}
    with forcing(model, plan_batch(model, rows)), _recorded(model, paths, plan_seen):
        planned = greedy_generate(model, inputs, "deu", MAX_NEW).sequences
    legacy = _legacy_forcing(model, rows)
    try:
        with _recorded(model, paths, legacy_seen):
            expected = greedy_generate(model, inputs, "deu", MAX_NEW).sequences
    finally:
        for h in legacy:
            h.remove()
    assert torch.equal(planned, expected)
    assert plan_seen.keys() == legacy_seen.keys() == set(paths)
    for path in paths:
        assert len(plan_seen[path]) == len(legacy_seen[path]), path
        for a, b in zip(plan_seen[path], legacy_seen[path], strict=True):
            assert torch.equal(a, b), path
    assert len({tuple(r.tolist()) for r in planned}) > 1  # the forcing did something


ENCODER_INTERVENTIONS = [
    {
        "speech_encoder.encoder.layers.0.conv_module.depthwise_conv": (
            list(range(0, 64, 3)),
            [6.0] * 22,
        )
    },
    NO_FORCING,
    {"speech_encoder.inner_layer_norm": (list(range(0, 64, 2)), [5.0] * 32)},
]


def test_encoder_units_alone_equals_batched_and_change_output(model):
    """Encoder sites force per row too: rows then run the encoder separately."""
    batched = generate_forced(
        model, _speech(1), "deu", ENCODER_INTERVENTIONS, max_new_tokens=MAX_NEW, rows=[0, 0, 0]
    )
    for row, intervention in enumerate(ENCODER_INTERVENTIONS):
        alone = generate_forced(model, _speech(1), "deu", [intervention], max_new_tokens=MAX_NEW)
        width = max(alone.shape[-1], batched.shape[-1])
        assert torch.equal(_pad(alone[0], width), _pad(batched[row], width)), row
    plain = _hf(model, _speech(1))
    width = max(plain.shape[-1], batched.shape[-1])
    assert torch.equal(_pad(plain[0], width), _pad(batched[1], width))
    assert not torch.equal(batched[2], batched[1])  # the encoder's last norm reaches the output
