"""The collect job end to end: Collector without Ray, then the three Ray launch modes.

Model: an untrained tiny SeamlessM4T v2 with the organism's real sentencepiece tokenizer,
saved as an ordinary model directory (the load path of the real model). Data: the
FLEURS-shaped fixture (eng, deu, cmn; eng has corrupt, missing and truncated audio, so
skips are counted). Edge cases: skipped examples inside a shard, a step some outputs do not
reach, en2x reusing the pivot inputs per target, a part half-written before a crash. The
last test runs configs/organism.yaml (the demo) on the shipped organism, shrunk.

Ray hygiene (docs/platform.md, "Ray"): RAY_AUTH_MODE=disabled and
RAY_USAGE_STATS_ENABLED=0 everywhere; fractional num_cpus; the head is started by this module in its own process group on free
ports and killed by process group in ``finally`` (never ``ray stop``, which would stop every
Ray on a shared machine). ``--address auto`` is pinned to that head with RAY_ADDRESS so it
cannot join a neighbour's cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from crossmodal.collect.collector import Collector
from crossmodal.collect.config import load_config
from crossmodal.collect.driver import run_collect
from crossmodal.collect.plan import build_plan, unit_index
from crossmodal.store.collect_store import store_dims
from crossmodal.store.layout import StoreError, UnitCoords, create_store

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
GROUPS = ("units/decoder", "edges/decoder", "parts/decoder", "stats/decoder")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny model with the organism tokenizer, saved like a real checkpoint."""
    import torch
    from transformers import GenerationConfig, SeamlessM4TFeatureExtractor, SeamlessM4Tv2Model

    from crossmodal.model.load import tiny_config
    from crossmodal.organism.corpus import organism_corpus
    from crossmodal.organism.tokenizer import build_processor, language_tokens, train_sentencepiece

    out = tmp_path_factory.mktemp("model")
    train_sentencepiece([r.text for r in organism_corpus("train", None, 50, 0, audio=False)], out)
    processor = build_processor(out)
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = SeamlessM4Tv2Model(tiny_config(vocab_size=len(tok))).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_new_tokens=8,
        text_decoder_lang_to_code_id={
            t[2:-2]: tok.convert_tokens_to_ids(t) for t in language_tokens()
        },
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    SeamlessM4TFeatureExtractor().save_pretrained(out)  # preprocessor_config.json
    return out


@pytest.fixture(scope="module")
def fleurs(tmp_path_factory) -> Path:
    from fleurs_fixture import build_fleurs

    return build_fleurs(tmp_path_factory.mktemp("data")).root


@pytest.fixture(scope="module")
def raw_config(model_dir, fleurs) -> dict:
    return {
        "model": str(model_dir),
        "dtype": "float32",
        "languages": ["eng", "deu", "cmn"],
        "steps": [1, 3],
        "n_bins": 16,
        "pilot_size": 6,
        "batch_size": 2,
        "max_new_tokens": 6,
        "data": {"source": "fleurs_raw", "path": str(fleurs)},
        "shard_size": 4,
        "keep_parts": True,
        "actors": {"count": 2, "num_cpus": 0.5, "max_restarts": 1, "max_task_retries": 1},
    }


def _write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_same_stats(a: Path, b: Path) -> None:
    """Identical counts and histograms; moments within 1e-12 relative (floating point)."""
    x = xr.open_zarr(a, group="stats/decoder", consolidated=False).load()
    y = xr.open_zarr(b, group="stats/decoder", consolidated=False).load()
    for name in ("count", "dropped", "hist", "n_examples", "n_skipped", "n_rows", "n_ended"):
        np.testing.assert_array_equal(x[name].values, y[name].values, err_msg=name)
    for name in ("mean", "m2", "min", "max"):
        np.testing.assert_allclose(
            x[name].values, y[name].values, rtol=1e-12, atol=0, equal_nan=True, err_msg=name
        )


def test_collector_without_ray(raw_config, tmp_path):
    """The actor class is a plain callable: it runs a pilot and a work unit with no Ray."""
    config = load_config({**raw_config, "output": str(tmp_path / "s.zarr")})
    plan = build_plan(config)
    index = unit_index(config)
    root = create_store(
        config.output,
        dims=store_dims(plan),
        plan=plan.to_dict(),
        attrs={},
        units={"decoder": UnitCoords.from_index(index, "decoder")},
    )
    collector = Collector(config, config.output)
    assert collector.capturer.index.n_units == index.n_units  # meta build == loaded model
    pilot = next(p for p in plan.pilots if (p.task, p.modality) == ("asr", "speech"))
    summary = collector(pilot)
    assert summary["n_examples"] + summary["n_skipped"] == pilot.n_examples
    edges = root["edges/decoder/edges"][config.tasks.index("asr"), 0]
    assert np.isfinite(edges).all() and (np.diff(edges, axis=-1) > 0).all()
    unit = next(w for w in plan.work_units if w.key == "asr/speech/eng/0")  # 1001-1004
    summary = collector(unit)
    assert (summary["n_examples"], summary["n_skipped"]) == (3, 1)  # 1004 is corrupt audio
    assert len(summary["texts"]) == 3 and summary["dropped"] == 0
    counts = root["parts/decoder/count"][unit.index]
    assert counts[:, 0].tolist() == summary["n_rows"] == counts[:, 1].tolist()
    hist = root["parts/decoder/hist"][unit.index]
    assert (hist.sum(axis=-1) == counts[:, :, None]).all()  # every value in exactly one bin

    # A step no pilot output reaches takes its edges from every step's pilot values.
    real_run = collector.capturer.run

    class NoStep3:
        def __init__(self, res):
            self.texts, self.rows = res.texts, {**res.rows, 3: res.rows[3][:0]}
            self.values = {k: v[:0] if k[1] == 3 else v for k, v in res.values.items()}

    collector.capturer.run = lambda *a, **k: NoStep3(real_run(*a, **k))
    summary = collector(next(p for p in plan.pilots if p.task == "x2en"))
    assert summary["edges_from_all_steps"] == [3]
    assert np.isfinite(root["edges/decoder/edges"][0, :, 1]).any()


@pytest.fixture(scope="module")
def collected(raw_config, tmp_path_factory):
    """The in-process launch (what `make demo` uses): local ray.init(), two actors."""
    out = tmp_path_factory.mktemp("inproc") / "a.zarr"
    config = load_config({**raw_config, "output": str(out)})
    return config, run_collect(config, progress=False, echo=lambda s: None)


def test_in_process_two_actors_resume_and_refusal(raw_config, collected):
    config, first = collected
    assert first["ran"] == first["work_units"] == len(build_plan(config).work_units)
    for group in GROUPS:  # every group reads back labelled
        ds = xr.open_zarr(config.output, group=group, consolidated=False)
        assert all(ds[v].dims for v in ds.data_vars)
    stats = xr.open_zarr(config.output, group="stats/decoder", consolidated=False)
    eng = stats.sel(task="asr", modality="speech", language="eng")
    assert int(eng["n_skipped"]) == 3 and int(eng["n_examples"]) == 4
    en2x = stats["count"].sel(task="en2x", modality="text", language=["deu", "cmn"])
    assert (en2x.values == 7).all()  # the 7 English sentences with text, once per target
    root = zarr.open_group(config.output, mode="r")
    assert root.attrs["provenance"]["model"]["model_source"] == str(raw_config["model"])
    assert root.attrs["provenance"]["packages"]["zarr"] == zarr.__version__
    assert len(root["manifest"].attrs["merged"]) == len(build_plan(config).conditions)

    again = run_collect(config, progress=False, echo=lambda s: None)  # resume: nothing to do
    assert (again["ran"], again["resumed"]) == (0, first["work_units"])
    other = load_config({**raw_config, "steps": [1, 2], "output": config.output})
    with pytest.raises(StoreError, match="written by a different config"):
        run_collect(other, progress=False, echo=lambda s: None)

    # The driver died after work unit p's collector half-wrote its part: p is not in the
    # manifest, its condition is not merged. The rerun redoes p only and merges again.
    plan = build_plan(config)
    p = next(w for w in plan.work_units if w.key == "en2x/text/deu/1")
    before = stats.sel(task="en2x", modality="text", language="deu").load()
    rw = zarr.open_group(config.output, mode="r+")
    parts = dict(rw["manifest"].attrs["parts"])
    del parts[str(p.index)]
    rw["manifest"].attrs["parts"] = parts
    rw["manifest"].attrs["merged"] = [
        k for k in rw["manifest"].attrs["merged"] if k != p.condition.key
    ]
    rw["parts/decoder/hist"][p.index, 0, 0] = 7  # garbage from the interrupted write
    t, m, lang = store_dims(plan).index("en2x", "text", "deu")
    rw["stats/decoder/hist"][t, m, lang] = 0
    redo = run_collect(config, progress=False, echo=lambda s: None)
    assert redo["ran"] == 1
    after = xr.open_zarr(config.output, group="stats/decoder", consolidated=False)
    after = after.sel(task="en2x", modality="text", language="deu").load()
    np.testing.assert_array_equal(after["hist"].values, before["hist"].values)
    np.testing.assert_allclose(after["mean"].values, before["mean"].values, rtol=1e-12)


@pytest.fixture(scope="module")
def head(ray_head):
    """The session's `ray start --head` (tests/conftest.py)."""
    return ray_head


def test_against_a_head_with_address_auto(head, raw_config, collected, tmp_path):
    cfg = _write_config(
        {**raw_config, "actors": {**raw_config["actors"], "count": 1}}, tmp_path / "c.yaml"
    )
    out = tmp_path / "auto.zarr"
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.collect",
            str(cfg),
            "--address",
            "auto",
            "--output",
            str(out),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "collected" in proc.stdout and "work units" in proc.stdout
    _assert_same_stats(Path(collected[0].output), out)  # 1 actor here, 2 in-process
    for group in GROUPS:
        xr.open_zarr(out, group=group, consolidated=False)


def test_organism_demo_config(shipped_organism, tmp_path):
    """configs/organism.yaml (what `make demo` runs), shrunk to 4 sentences per language."""
    raw = yaml.safe_load((REPO / "configs" / "organism.yaml").read_text())
    raw["data"]["examples_per_language"] = 4
    raw.update(output=str(tmp_path / "organism.zarr"), shard_size=4, pilot_size=24)
    config = load_config(raw)
    result = run_collect(config, progress=False, echo=lambda s: None)
    assert result["ran"] == 26  # 5 x2en + 5 en2x per modality, 6 asr: one shard each
    stats = xr.open_zarr(config.output, group="stats/decoder", consolidated=False)
    assert list(stats.step.values) == [1, 6, 11]
    n_rows = stats["n_rows"].sel(step=1).values
    assert sorted(np.unique(n_rows).tolist()) == [0, 4]  # 4 everywhere but non-conditions
    assert (n_rows.sum() == 26 * 4) and int(stats["n_skipped"].sum()) == 0
    done = stats["count"].sel(step=1, pooling="prefix_mean").values
    assert (
        stats["hist"].sel(step=1, pooling="prefix_mean").sum("bin").values == done[..., None]
    ).all()
