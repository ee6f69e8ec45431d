"""Builders several test modules share: tiny model directories, small configs, the collect
driver without Ray, a synthetic selectivity store, a lock held by another process and free
ports for Ray processes.

Import as ``from helpers import ...``: tests/ holds no ``__init__.py``, so pytest (``prepend``
import mode) puts tests/ on ``sys.path`` when it loads tests/conftest.py, before any test
module, whichever tests are selected.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import xarray as xr

from crossmodal.organism import ORGANISM_LANGUAGES


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: all are held open while choosing, so none
    repeats (Ray refuses a port given to two of its components)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def build_model_dir(
    out: Path,
    writes: tuple[str, ...] = ORGANISM_LANGUAGES,
    *,
    sentences: int = 50,
    max_new_tokens: int = 8,
) -> Path:
    """A random tiny SeamlessM4T v2 saved like a checkpoint, with the organism tokenizer
    (trained on ``sentences`` corpus sentences) and the real feature extractor; ``writes``: the
    languages its generation config has a tag for."""
    import torch
    from transformers import GenerationConfig, SeamlessM4Tv2Model

    from crossmodal.model.load import tiny_config
    from crossmodal.organism.corpus import organism_corpus
    from crossmodal.organism.tokenizer import build_processor, language_tokens, train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    corpus = organism_corpus("train", None, sentences, 0, audio=False)
    train_sentencepiece([r.text for r in corpus], out)
    processor = build_processor(out)
    tok = processor.tokenizer
    ids = {t[2:-2]: tok.convert_tokens_to_ids(t) for t in language_tokens()}
    torch.manual_seed(0)
    model = SeamlessM4Tv2Model(tiny_config(vocab_size=len(tok))).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_new_tokens=max_new_tokens,
        text_decoder_lang_to_code_id={k: ids[k] for k in writes},
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.feature_extractor.save_pretrained(out)
    return out


def collect_config(model_dir: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    """A small collect config on the organism corpus (raw dict; ``load_config`` it)."""
    raw: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "languages": ["eng", "deu", "jpn"],
        "tasks": ["x2en", "en2x"],
        "modalities": ["text"],
        "steps": [1, 3],
        "families": ["decoder", "ffn_act"],
        "n_bins": 8,
        "pilot_size": 4,
        "batch_size": 1,
        "max_new_tokens": 4,
        "data": {"source": "organism", "examples_per_language": 3},
        "output": str(output),
        "shard_size": 2,
        "keep_parts": True,
        "actors": {"count": 1, "num_cpus": 0.25, "max_restarts": 1, "max_task_retries": 1},
    }
    raw.update(overrides)
    return raw


class InProcessRay:
    """``ray.remote`` / ``wait`` / ``get`` run in this process (reduce's selectivity tasks)."""

    def remote(self, **_: Any):
        return lambda fn: SimpleNamespace(remote=fn)

    def wait(self, refs: list, num_returns: int = 1) -> tuple[list, list]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, done: list) -> list:
        return done


class LocalSession:
    """A stand-in for :class:`crossmodal.fleet.RaySession`: one in-process replica, no Ray."""

    def __init__(self, address: str | None = None, **_: Any) -> None:
        self.address = address  # output=, progress=: one process sees every path

    def connect(self) -> InProcessRay:
        return InProcessRay()

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def actors(
        self, cls: type, *args: Any, spec: Any, count: int | None = None, **_: Any
    ) -> LocalFleet:
        return LocalFleet(cls(*args))


class LocalFleet:
    """A stand-in for :class:`crossmodal.fleet.ActorFleet` running jobs one by one in order."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, jobs: Any, *, fault: Any = None) -> Any:
        for job in list(jobs):
            yield self.worker(job)
            if fault is not None:
                fault.tick()


def local_collect(monkeypatch: pytest.MonkeyPatch, raw: dict[str, Any], **kw: Any) -> dict:
    """:func:`run_collect` (the real driver) with one in-process Collector instead of Ray."""
    from crossmodal.collect import driver as collect
    from crossmodal.collect.config import load_config

    config = load_config(raw)
    monkeypatch.setattr(collect, "RaySession", LocalSession)
    return collect.run_collect(config, progress=False, echo=kw.pop("echo", lambda _: None), **kw)


def steer_selectivity(model: Any, path: Path) -> Path:
    """Random AP and forcing values over ``model``'s decoder units, in the reducer's layout
    (group ``selectivity/decoder`` of the Zarr store at ``path``)."""
    import xarray as xr

    from crossmodal.model.units import UnitIndex

    units = UnitIndex.from_model(model, "decoder").table("unit")
    rng = np.random.default_rng(0)
    dims = ("task", "modality", "step", "language", "unit")
    shape = (2, 2, 3, len(ORGANISM_LANGUAGES), len(units))
    ap = rng.uniform(0, 1, shape)
    coords = {
        "task": ["x2en", "en2x"],
        "modality": ["speech", "text"],
        "step": [1, 6, 11],
        "language": list(ORGANISM_LANGUAGES),
        "unit": np.arange(len(units)),
        "site": ("unit", units["name"].to_numpy().astype(str)),
        "feature": ("unit", units["feature"].to_numpy()),
        "layer": ("unit", units["layer"].fillna(-1).to_numpy().astype(int)),
        "submodule": ("unit", units["submodule"].to_numpy().astype(str)),
    }
    data = {
        "ap": ap,
        "ap_lo": ap - 0.01,
        "ap_hi": ap + 0.01,
        "auroc": ap,
        "on_p50": rng.normal(0, 4, shape),
        "on_p90": rng.normal(3, 4, shape),
        "off_mean": rng.normal(0, 1, shape),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: fixed-width strings have no v3 spec yet
        xr.Dataset({k: (dims, v) for k, v in data.items()}, coords=coords).to_zarr(
            path, group="selectivity/decoder", mode="w", consolidated=False
        )
    return path


def steer_config(root: Path, out: str, **kw: Any):
    """A small steering grid over ``root/model`` and ``root/sel.zarr``, output ``root/out``."""
    from crossmodal.steer.grid import load_grid

    raw = {
        "model": str(root / "model"),
        "dtype": "float32",
        "selectivity": {"path": str(root / "sel.zarr")},
        "roles": ["control"],
        "unit_modalities": ["speech"],
        "steps": [1, 11],
        "languages": ["deu", "jpn"],
        "set_sizes": [40],
        "random_seeds": [0, 1],
        "n_inputs": 3,
        "max_new_tokens": 10,
        "batch_size": 8,
        "cells_per_task": 3,
        "lid": {"backends": ["organism"]},
        "output": str(root / out),
        "actors": {"count": 2, "num_cpus": 0.5, "num_gpus": 0},
    }
    raw.update(kw)
    return load_grid(raw)


_HOLD = (
    "import sys; from crossmodal.store.lock import OutputLock; "
    "lock = OutputLock(sys.argv[1], sys.argv[2]); lock.acquire(); "
    "print('held', flush=True); sys.stdin.read(); lock.release()"
)


def hold_lock(out: Path, job: str = "collect") -> subprocess.Popen:
    """A process that holds the lock of ``out`` (as run ``job``) until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), job],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------ synthetic selectivity

SUBMODULES = ("self_attn", "cross_attn", "ffn", "other")


def unit_coords(n_units: int, n_layers: int = 4, id_offset: int = 0) -> dict:
    """Unit coordinates like the store's: layers 0..n_layers-1, the last few units at -1."""
    per_layer = (n_units - 4) // n_layers
    layer = np.full(n_units, -1)
    layer[: per_layer * n_layers] = np.repeat(np.arange(n_layers), per_layer)
    sub = np.array([SUBMODULES[(i // 5) % 3] for i in range(n_units)], dtype=object)
    sub[layer == -1] = "other"
    site = np.array([f"decoder.layers.{lay}.{s}" for lay, s in zip(layer, sub, strict=True)])
    return {
        "unit": ("unit", np.arange(n_units) + id_offset),
        "layer": ("unit", layer),
        "submodule": ("unit", sub.astype(str)),
        "site": ("unit", site),
        "feature": ("unit", np.arange(n_units) % 5),
        # half the cross-attention units stand for k/v projections of the encoder output
        "step_invariant": ("unit", (sub == "cross_attn") & (np.arange(n_units) % 2 == 0)),
    }


def synthetic_selectivity(seed: int = 0, n_units: int = 124, slack: float = 0.01) -> xr.Dataset:
    """A small selectivity dataset with shared structure across modalities, ties and NaNs."""
    rng = np.random.default_rng(seed)
    tasks, modalities, steps = ["x2en", "en2x", "asr"], ["speech", "text"], [1, 6, 11]
    langs = ["eng", "deu", "jpn"]
    base = rng.random((len(tasks), 1, 1, len(langs), n_units))
    noise = rng.random((len(tasks), len(modalities), len(steps), len(langs), n_units))
    weight = np.array([0.1, 0.5, 0.9])[None, None, :, None, None]  # overlap fades with step
    ap = np.round((1 - weight) * base + weight * noise, 2)  # rounding makes ties
    ap[1, :, :, 0] = np.nan  # en2x has no eng
    ap[2, 1] = np.nan  # asr has no text
    lo = ap - slack * rng.random(ap.shape)
    hi = ap + slack * rng.random(ap.shape)
    dims = ("task", "modality", "step", "language", "unit")
    data = {"ap": ap, "ap_lo": lo, "ap_hi": hi, "auroc": ap * 0.9}
    data |= {"on_p50": ap + 1.0, "on_p90": ap + 2.0, "off_mean": ap - 1.0}
    coords = {"task": tasks, "modality": modalities, "step": steps, "language": langs}
    coords |= unit_coords(n_units)
    return xr.Dataset({k: (dims, v) for k, v in data.items()}, coords=coords)


def synthetic_concentration(ds: xr.Dataset) -> xr.DataArray:
    """Mean Gini per condition and layer (-1..3) over ``ds``'s conditions (random values)."""
    rng = np.random.default_rng(0)
    return xr.DataArray(
        rng.random((3, 2, 3, 3, 5)),
        dims=("task", "modality", "step", "language", "layer"),
        coords={k: ds[k].values for k in ("task", "modality", "step", "language")}
        | {"layer": [-1, 0, 1, 2, 3]},
    )


# ------------------------------------------------------------ store comparison


def assert_same_arrays(a: Path, b: Path) -> None:
    """Every array of two collect stores holds the same values (integers and strings exactly,
    floats within 1e-12 relative, NaN = NaN) and the manifests record the same work; creation
    and finish times are not compared."""
    import zarr

    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    xa = {k: v for k, v in ra.members(max_depth=None) if isinstance(v, zarr.Array)}
    xb = {k: v for k, v in rb.members(max_depth=None) if isinstance(v, zarr.Array)}
    assert sorted(xa) == sorted(xb)
    for name, arr in xa.items():
        x, y = np.asarray(arr[...]), np.asarray(xb[name][...])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    ma, mb = ra["manifest"].attrs.asdict(), rb["manifest"].attrs.asdict()
    assert sorted(ma["merged"]) == sorted(mb["merged"]) and sorted(ma["edges"]) == sorted(
        mb["edges"]
    )
    assert sorted(ma["parts"]) == sorted(mb["parts"])
    for key in ma["parts"]:
        for field in ("key", "n_examples", "n_skipped", "n_rows", "n_ended", "dropped"):
            assert ma["parts"][key][field] == mb["parts"][key][field], (key, field)
    assert ("finished" in ra.attrs) == ("finished" in rb.attrs)
