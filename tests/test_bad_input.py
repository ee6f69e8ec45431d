"""Bad input through the public entry points: one clear error line or a counted skip, and
never a corrupt store (no output at all, or one that ``crossmodal verify`` passes).

Cases (docs/reliability.md keeps the tally with the observed messages):
unknown language code; a language the model cannot write (en2x target without a language
tag); empty or whitespace text; missing, truncated and non-audio files; wrong sample rate;
stereo audio; NaN/Inf activations (a text encoder that outputs +inf for inputs holding one
word, as after an fp16 overflow); config schema violations; a store of another layout version; too little
disk (``shutil.disk_usage`` patched); an output locked by another run (collect, reduce,
steer). The collect driver runs with one in-process Collector instead of Ray
(tests/helpers.py ``local_collect``): the same driver code, no cluster start-up.
"""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from fleurs_fixture import build_fleurs
from helpers import build_model_dir, collect_config, local_collect
from helpers import hold_lock as _holder

from crossmodal.data.records import Record
from crossmodal.store.verify import verify_store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Writes every organism language but jpn."""
    return build_model_dir(tmp_path_factory.mktemp("model"), writes=("eng", "deu", "cmn"))


@pytest.fixture(scope="module")
def fleurs(tmp_path_factory) -> Path:
    return build_fleurs(tmp_path_factory.mktemp("fleurs")).root


def _small(model_dir: Path, out: Path, **kw) -> dict:
    base = {"languages": ["eng", "deu"], "tasks": ["x2en"], "families": ["decoder"]}
    return collect_config(model_dir, out, **{**base, **kw})


def _cli(args: list[str]):
    from jobs.collect import main

    return CliRunner().invoke(main, args)


# ------------------------------------------------------------------------ config errors


def test_unknown_language_code(model_dir, tmp_path):
    import yaml

    out = tmp_path / "s.zarr"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_small(model_dir, out, languages=["eng", "deu", "xx"])))
    result = _cli([str(cfg)])
    assert result.exit_code == 2
    assert (
        "  languages[2]: must be one of ['cmn', 'deu', 'eng', 'fra', 'jpn', 'spa'], got 'xx'; "
        "organism "
        "data has no such language\n"
    ) in result.output
    assert not out.exists()


def test_config_schema_violations_all_at_once(model_dir, tmp_path):
    import yaml

    out = tmp_path / "s.zarr"
    raw = _small(model_dir, out, n_bins=4, batch_size="big", shard_sise=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = _cli([str(cfg)])
    assert result.exit_code == 2
    assert f"error: {cfg}: 3 config error(s):" in result.output
    for line in (
        "  (top level): unknown field(s) ['shard_sise']; did you mean 'shard_size'?",
        "  batch_size: must be of type integer, got 'big'; fix the value",
        "  n_bins: must be >= 8, got 4; fix the value",
    ):
        assert line + "\n" in result.output
    assert not out.exists()


def test_language_the_model_cannot_write(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    raw = _small(model_dir, out, languages=["eng", "deu", "jpn"], tasks=["x2en", "en2x"])
    with pytest.raises(ValueError) as err:
        local_collect(monkeypatch, raw)
    assert str(err.value) == (
        f"languages must be one of ['cmn', 'deu', 'eng'] (those model {str(model_dir)!r} "
        "writes) where a task writes them, got ['jpn']; drop them or their tasks (en2x, asr)"
    )
    assert not out.exists()  # checked before anything is written
    # jpn as a SOURCE (x2en writes eng) is fine: nothing to refuse
    local_collect(monkeypatch, {**raw, "tasks": ["x2en"], "modalities": ["text"]})
    assert verify_store(out).ok


# ------------------------------------------------------------------------ data errors


def test_bad_audio_files_are_counted_skips(model_dir, fleurs, tmp_path, monkeypatch):
    """FLEURS en_us holds a non-audio file (1004), a missing one (1005), a truncated WAV
    (1006), a whitespace-only text (1007), an 8 kHz file (1002) and a 22.05 kHz stereo one
    (1003): the bad ones are skipped and counted, the others resampled to 16 kHz mono."""
    out = tmp_path / "s.zarr"
    raw = _small(
        model_dir,
        out,
        languages=["eng", "deu"],
        tasks=["asr"],
        modalities=["speech"],
        data={"source": "fleurs_raw", "path": str(fleurs)},
    )
    result = local_collect(monkeypatch, raw)
    stats = xr.open_zarr(out, group="stats/decoder", consolidated=False)
    eng = stats.sel(task="asr", modality="speech", language="eng")
    assert (int(eng["n_examples"]), int(eng["n_skipped"])) == (4, 3)  # 1001 1002 1003 1008
    deu = stats.sel(task="asr", modality="speech", language="deu")
    assert (int(deu["n_examples"]), int(deu["n_skipped"])) == (4, 0)
    plan_ids = {i for w in zarr.open_group(str(out))["plan"].attrs["work_units"] for i in w["ids"]}
    assert "1007" not in plan_ids  # whitespace text never becomes an example
    assert result["work_units"] == 4 + 2 and verify_store(out).ok  # 7 eng ids, 4 deu

    from crossmodal.data.fleurs import FleursSource

    source = FleursSource(fleurs, audio=True)
    recs = {r.id: r for r in source.records("eng", "test")}
    assert all(r.sampling_rate == 16_000 and r.audio.ndim == 1 for r in recs.values())
    assert {k: v["count"] for k, v in source.skipped.as_dict().items()} == {
        "audio_undecodable": 2,
        "audio_missing": 1,
        "audio_truncated": 1,
        "row_malformed": 1,
        "text_empty": 1,
    }


def test_raw_records_with_wrong_rate_stereo_or_empty_audio(model_dir):
    from crossmodal.model.inputs import make_batch
    from crossmodal.model.load import load_model

    loaded = load_model(str(model_dir))
    mono = np.zeros(1600, dtype=np.float32)
    cases = [
        (
            Record("a", "eng", "x", mono, 8_000, "test"),
            "sampling_rate must be one of [16000], got 8000 for record 'a'; resample with "
            "crossmodal.data.audio.resample",
        ),
        (
            Record("b", "eng", "x", np.zeros((1600, 2), np.float32), 16_000, "test"),
            "audio must be one of [non-empty 1-D waveform], got shape (1600, 2) for record 'b'; "
            "convert to mono with crossmodal.data.audio.to_mono",
        ),
        (
            Record("c", "eng", "x", None, 16_000, "test"),
            "audio must be one of [a mono waveform], got None for record 'c'; load audio for "
            "speech batches or use modality='text'",
        ),
    ]
    for record, message in cases:
        with pytest.raises(ValueError) as err:
            make_batch([record], "speech", loaded)
        assert str(err.value) == message


def _poison_text_encoder(monkeypatch: pytest.MonkeyPatch, piece: str) -> None:
    """Every Collector's text encoder outputs +inf for inputs that hold ``piece`` (as an
    fp16 overflow would): their activations are NaN/Inf, the other inputs are untouched."""
    from crossmodal.collect import driver as collect

    init = collect.Collector.__init__

    def poisoned_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        token = self.loaded.processor.tokenizer.convert_tokens_to_ids(piece)

        def hook(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            output.last_hidden_state[(ids == token).any(dim=1)] = float("inf")

        self.loaded.model.text_encoder.register_forward_hook(hook, with_kwargs=True)

    monkeypatch.setattr(collect.Collector, "__init__", poisoned_init)


def test_nan_and_inf_activations_are_dropped_and_reported(model_dir, tmp_path, monkeypatch):
    """deu sentences 0 and 2 of the organism test split hold the word "nö", sentence 1 not."""
    _poison_text_encoder(monkeypatch, "\u2581nö")
    out = tmp_path / "s.zarr"
    said: list[str] = []
    raw = _small(model_dir, out, modalities=["text"])
    result = local_collect(monkeypatch, raw, echo=said.append)
    stats = xr.open_zarr(out, group="stats/decoder", consolidated=False).load()
    deu = stats.sel(task="x2en", modality="text", language="deu")
    assert deu["dropped"].sel(step=1).values.tolist() == [2, 2]  # both poolings
    assert deu["count"].sel(step=1).values.tolist() == [1, 1]
    assert ((deu["count"] + deu["dropped"]) == deu["n_rows"]).all()
    assert np.isfinite(deu["mean"].sel(step=1).values).all()  # never merged
    assert result["dropped"] == int(deu["dropped"].sum()) > 0
    assert said[-1] == (
        f"warning: {result['dropped']} example rows with NaN/Inf activations were dropped, "
        "not merged (summed over families, steps, poolings; per condition: "
        "stats/<family>/dropped)"
    )
    assert verify_store(out).ok


# ------------------------------------------------------------------------ store errors


@pytest.fixture(scope="module")
def good_store(model_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("good") / "s.zarr"
    raw = _small(model_dir, out, modalities=["text"])
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
    return raw, out


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_store_of_another_layout_version(good_store, tmp_path, monkeypatch):
    from crossmodal.reduce.driver import run_reduce
    from crossmodal.store.layout import StoreError

    raw, good = good_store
    out = Path(shutil.copytree(good, tmp_path / "old.zarr"))
    zarr.open_group(str(out), mode="r+").attrs["layout_version"] = 0
    before = _tree(out)
    with pytest.raises(StoreError) as err:
        local_collect(monkeypatch, {**raw, "output": str(out)})
    assert str(err.value) == (
        f"store layout_version must be one of [2], got 0 in {str(out)!r}; write to a new "
        "output path"
    )
    with pytest.raises(StoreError, match=r"layout_version must be one of \[2\], got 0; "):
        run_reduce(out, progress=False, echo=lambda _: None)
    assert _tree(out) == before  # untouched, no lock left behind


def test_too_little_disk_is_refused_before_starting(model_dir, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "deep" / "s.zarr"
    with pytest.raises(ValueError) as err:
        local_collect(monkeypatch, _small(model_dir, out))
    message = str(err.value)
    assert message.startswith("output disk must have one of [>= 0.0 GB free]")
    assert message.endswith(f"got 0.0 GB at {str(tmp_path)!r}; free space or choose another output")
    assert not (tmp_path / "deep").exists()


def test_locked_outputs_are_refused_by_collect_reduce_and_steer(good_store, tmp_path, monkeypatch):
    from crossmodal.reduce.driver import run_reduce
    from crossmodal.steer.driver import run_steer
    from crossmodal.steer.grid import load_grid
    from crossmodal.store.lock import LockError

    raw, good = good_store
    out = Path(shutil.copytree(good, tmp_path / "s.zarr"))
    before = _tree(out)
    holder = _holder(out, "collect")
    try:
        for run in (
            lambda: local_collect(monkeypatch, {**raw, "output": str(out)}),
            lambda: run_reduce(out, progress=False, echo=lambda _: None),
        ):
            with pytest.raises(LockError, match=rf"is locked by collect run pid {holder.pid} "):
                run()
    finally:
        holder.communicate("")
    assert {k: v for k, v in _tree(out).items() if k != "crossmodal.lock"} == before

    steer_out = tmp_path / "steer"
    holder = _holder(steer_out, "steer")
    try:
        grid = load_grid({"selectivity": {"path": str(out)}, "output": str(steer_out)})
        with pytest.raises(LockError, match=rf"is locked by steer run pid {holder.pid} "):
            run_steer(grid, progress=False, echo=lambda _: None)
    finally:
        holder.communicate("")
    assert sorted(p.name for p in steer_out.iterdir()) == []
