"""Unit families and the address scheme (crossmodal.model.units).

Tricky cases covered:
  * the unit counts per family, by hand, for the tiny config and the real large shapes (the
    large model is built on the meta device: no weights, no memory);
  * ``ffn.act`` is the post-ReLU neuron; ``layers[i].activation_fn`` never runs;
  * the speech adapter's GLU runs twice per forward and gives two sites;
  * every site's ``n_features`` equals the width of the output a real forward produces;
  * the same family set in any order (or through the ``encoder`` alias) gives the same index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import SeamlessM4Tv2Model

from crossmodal.model.capture import attached
from crossmodal.model.load import feature_extractor, large_config
from crossmodal.model.units import UnitIndex, resolve_families

ALL = ("decoder", "ffn_act", "encoder")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's 2 cores are shared: one thread keeps these tiny runs fast and stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def index(tiny_model) -> UnitIndex:
    return UnitIndex.from_model(tiny_model.model, ALL)


def test_tiny_counts_by_hand(index):
    h, ffn, layers = 64, 128, 2  # tiny_config: hidden 64, FFN 128, 2 layers everywhere
    decoder_layer = 4 * h + h + 4 * h + h + ffn + h + h  # self q,k,v,o + LN, cross + LN, fc1 fc2 LN
    text_layer = 4 * h + h + ffn + h + h
    conformer = (h + ffn + h) * 2 + (h + 4 * h) + (h + 2 * h + h + h + h + h) + h
    adapter = h + 2 * h + 2 * h + h + 2 * h + 4 * h + h + ffn + h  # GLU counted twice
    speech = (160 + h) + layers * conformer + h + (ffn + h) + adapter + h
    assert decoder_layer == 896
    assert index.counts() == {
        "decoder": layers * decoder_layer + h,
        "ffn_act": layers * ffn,
        "speech_encoder": speech,
        "text_encoder": layers * text_layer + h,
    }
    assert index.counts() == {
        "decoder": 1856,
        "ffn_act": 256,
        "speech_encoder": 4256,
        "text_encoder": 1216,
    }
    assert index.n_units == 1856 + 256 + 4256 + 1216


def test_large_totals_on_meta_device():
    with torch.device("meta"):
        model = SeamlessM4Tv2Model(large_config())
    idx = UnitIndex.from_model(model, ALL)
    per_layer = 4 * 1024 + 1024 + 4 * 1024 + 1024 + 8192 + 1024 + 1024
    assert per_layer == 20_480
    counts = idx.counts()
    assert counts["decoder"] == 24 * per_layer + 1024 == 492_544
    assert counts["ffn_act"] == 24 * 8192 == 196_608
    assert counts["text_encoder"] == 24 * (4 * 1024 + 1024 + 8192 + 1024 + 1024) + 1024 == 369_664
    assert counts["speech_encoder"] == 641_184
    assert UnitIndex.from_model(model).n_units == 492_544


def test_site_fields_and_names(index):
    fc1 = index.site("decoder.layers.1.ffn.fc1")
    assert (fc1.module_path, fc1.family, fc1.layer, fc1.submodule, fc1.n_features) == (
        "text_decoder.layers.1.ffn.fc1",
        "decoder",
        1,
        "ffn",
        128,
    )
    assert index.site("decoder.layers.0.cross_attention.k_proj").positions == "encoder_output"
    assert index.site("decoder.layers.0.cross_attention.q_proj").positions == "decoder"
    assert index.site("decoder.layers.0.self_attn_layer_norm").submodule == "self_attn"
    final = index.site("decoder.layer_norm")
    assert (final.layer, final.submodule) == (None, "final_norm")
    act = index.site("decoder.layers.0.ffn.act")
    assert (act.family, act.module_type, act.n_features) == ("ffn_act", "ReLU", 128)
    glu = [s for s in index.sites if s.module_path.endswith("adapter.layers.0.activation")]
    assert [(s.name.split("@")[1], s.call, s.subsample) for s in glu] == [
        ("residual_conv", 0, 1),
        ("self_attn_conv", 1, 1),
    ]
    assert index.site("speech_encoder.adapter.layers.0.residual_layer_norm").subsample == 0
    assert index.site("speech_encoder.inner_layer_norm").subsample == 1
    assert index.site("speech_encoder.encoder.layers.0.conv_module.glu").channels_first
    assert not any("activation_fn" in s.name for s in index.sites)


def test_order_is_deterministic_and_contiguous(tiny_model, index):
    again = UnitIndex.from_model(tiny_model.model, ("encoder", "ffn_act", "decoder"))
    assert again == index
    assert resolve_families(["text_encoder", "decoder", "speech_encoder"]) == (
        "decoder",
        "speech_encoder",
        "text_encoder",
    )
    offset = 0
    for site in index.sites:
        assert site.offset == offset
        offset += site.n_features
    assert offset == index.n_units
    assert len({s.name for s in index.sites}) == len(index.sites)


def test_n_features_match_real_outputs(tiny_model, index):
    """Brute force: every hooked output's feature width equals the index's n_features."""
    model = tiny_model.model
    widths: dict[str, list[int]] = {}
    modules = dict(model.named_modules())

    def hook(path, channels_first):
        def fn(module, args, out):
            widths.setdefault(path, []).append(out.shape[1] if channels_first else out.shape[-1])

        return fn

    paths = {s.module_path: s.channels_first for s in index.sites}
    feats = feature_extractor()(
        [np.zeros(8000, np.float32)], sampling_rate=16000, return_tensors="pt"
    )
    ids = torch.tensor([[5, 6, 7, 3]])
    with torch.inference_mode(), attached((modules[p], hook(p, c)) for p, c in paths.items()):
        model(**feats, decoder_input_ids=torch.tensor([[3, 122, 9]]))
        model(input_ids=ids, decoder_input_ids=torch.tensor([[3, 122, 9]]))
    for path in paths:  # the decoder ran twice (once per modality)
        sites = [s for s in index.sites if s.module_path == path]
        runs = 2 if path.startswith("text_decoder") else 1
        assert widths[path] == [s.n_features for s in sites] * runs, path


def test_activation_fn_never_fires_ffn_act_does(tiny_model):
    layer = tiny_model.model.text_decoder.layers[0]
    fired = {"act": 0, "activation_fn": 0}
    hooks = [
        (layer.ffn.act, lambda *a: fired.__setitem__("act", fired["act"] + 1)),
        (layer.activation_fn, lambda *a: fired.__setitem__("activation_fn", 1)),
    ]
    with torch.inference_mode(), attached(hooks):
        tiny_model.model(
            input_ids=torch.tensor([[5, 6, 3]]), decoder_input_ids=torch.tensor([[3, 122]])
        )
    assert fired == {"act": 1, "activation_fn": 0}


def test_expansion_helpers(index):
    layer0 = index.select(families=["decoder"], layers=[0])
    layer1 = index.select(families=["decoder"], layers=[1])
    final = index.units_of("decoder.layer_norm")
    assert np.array_equal(
        np.concatenate([layer0, layer1, final]), index.select(families=["decoder"])
    )
    # a glob follows the address scheme: ffn_act sites live under decoder.layers.i too
    act0 = index.units_of("decoder.layers.0.ffn.act")
    assert np.array_equal(index.units_of("decoder.layers.0.*"), np.concatenate([layer0, act0]))
    attention = index.select(families=["decoder"], submodules=["self_attn", "cross_attn"])
    assert len(attention) == 2 * (4 * 64 + 64) * 2
    fc1 = index.units_of("decoder.layers.1.ffn.fc1")
    assert np.array_equal(fc1, np.arange(fc1[0], fc1[0] + 128))
    assert len(index.select(families=["encoder"], submodules=["adapter"])) == 1024
    assert len(index.select(layers=[5])) == 0
    rng = np.random.default_rng(0)
    for unit in rng.integers(0, index.n_units, size=50):
        site, feature = index.address(int(unit))
        assert index.unit(site, feature) == unit


def test_tables_and_records(index):
    sites = index.table()
    assert len(sites) == len(index.sites)
    assert list(sites["name"][:2]) == [
        "decoder.layers.0.self_attn.k_proj",
        "decoder.layers.0.self_attn.v_proj",
    ]
    units = index.table("unit")
    assert len(units) == index.n_units
    row = units.iloc[index.unit("decoder.layers.1.ffn.fc1", 7)]
    assert (row["name"], row["feature"], row["layer"], row["submodule"]) == (
        "decoder.layers.1.ffn.fc1",
        7,
        1,
        "ffn",
    )
    assert units["layer"].isna().sum() == sum(s.n_features for s in index.sites if s.layer is None)
    assert UnitIndex.from_records(index.to_records()) == index


def test_errors_are_one_line(index, tiny_model):
    with pytest.raises(ValueError, match=r"family must be one of \[.*\], got 'attn'; ") as err:
        UnitIndex.from_model(tiny_model.model, ["decoder", "attn"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="families must be one of"):
        resolve_families([])
    with pytest.raises(KeyError, match="site must be one of"):
        index.site("decoder.layers.9.ffn.fc1")
    with pytest.raises(KeyError, match="pattern must match"):
        index.units_of("decoder.layers.9.*")
    with pytest.raises(IndexError, match="unit must be one of"):
        index.address(index.n_units)
    with pytest.raises(ValueError, match="level must be one of"):
        index.table("layer")


def test_step_invariant_units_by_brute_force(tiny_model, index):
    """Brute force: the decoder run, without cache, on two prefixes of one generation (the
    states of steps 1 and 3). Every site labelled ``step_invariant`` outputs exactly the same
    tensor at both steps; every other decoder site's output at the step's position changes."""
    model = tiny_model.model
    modules = dict(model.named_modules())
    decoder = [s for s in index.sites if s.family == "decoder"]
    outs: dict[str, list[torch.Tensor]] = {}

    def hook(path):
        def fn(module, args, out):
            outs.setdefault(path, []).append(out.detach().clone())

        return fn

    prefix = torch.tensor([[3, 122, 9, 17]])
    with torch.inference_mode():
        hidden = model.text_encoder(input_ids=torch.tensor([[5, 6, 7, 3]])).last_hidden_state
        with attached((modules[s.module_path], hook(s.module_path)) for s in decoder):
            for step in (1, 3):
                model.text_decoder(
                    input_ids=prefix[:, : step + 1], encoder_hidden_states=hidden, use_cache=False
                )
    invariant = {s.name for s in decoder if s.step_invariant}
    assert invariant == {
        f"decoder.layers.{i}.cross_attention.{p}_proj"
        for i in range(len(model.text_decoder.layers))
        for p in ("k", "v")
    }
    for s in decoder:
        first, later = outs[s.module_path]
        if s.step_invariant:
            assert torch.equal(first, later), s.name
        else:
            assert not torch.allclose(first[:, -1], later[:, -1]), s.name
    table = index.table("unit")
    in_decoder = table.loc[table["family"] == "decoder", "step_invariant"]
    assert in_decoder.sum() == sum(s.n_features for s in decoder if s.step_invariant)
    encoders = table["family"].isin(["speech_encoder", "text_encoder"])
    assert table.loc[encoders, "step_invariant"].all()  # pooled over input positions
    assert not table.loc[table["family"] == "ffn_act", "step_invariant"].any()
