"""v1 modality-selective units: AP of "speech task example" vs "text task example" from the
collect store's histograms (same task direction, language, step and pooling; decoder units).

Why the histograms suffice: collect chooses one set of edges per (task, step, pooling) from
the pilots of both modalities (:mod:`crossmodal.collect.driver`), so a language's speech and text
histograms share bins and :func:`crossmodal.stats.finalize.ap_from_hist` gives the AP with
an interval guaranteed to hold the exact one, as for languages. A store collected before the
edges were shared has other edges per modality: the pass skips it with a note (re-collect).

Sets and counts: per (task, step, language) the top-k units by AP are the speech-selective
set, the bottom-k the text-selective one (:func:`crossmodal.reduce.selection.select_sets` on the
histogram AP; no exact pass). ``by_submodule`` and ``by_site`` count them per submodule and
per site kind (the site address without its layer, e.g. ``decoder.cross_attention.k_proj``),
where method.md expects cross-attention k/v to dominate: they read the encoder output, whose
modality differs. Group: ``modality/<family>`` (default pooling; others as subgroups).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr

from crossmodal.reduce.overlap import SPEECH, TEXT, count_by, modality_selectivity
from crossmodal.store.results import default_pooling, group_path
from crossmodal.reduce.selection import select_sets
from crossmodal.stats.finalize import ap_from_hist, single_value_bins
from crossmodal.store.layout import unit_chunk

FAMILIES = ("decoder", "ffn_act")
"""Families whose units exist for both modalities (the encoders' do not)."""
UNIT_COORDS = ("layer", "submodule", "site", "site_kind", "feature")


def site_kind(names: Sequence[str]) -> np.ndarray:
    """Site addresses without the layer: ``decoder.layers.3.ffn.fc1`` -> ``decoder.ffn.fc1``."""
    return np.asarray([re.sub(r"\.layers\.\d+\.", ".", str(n)) for n in names])


def paired_tasks(root: zarr.Group, family: str) -> list[str]:
    """Tasks with speech and text examples of one language (x2en, en2x; never asr)."""
    sg = root[f"stats/{family}"]
    mods = [str(m) for m in sg["modality"][...]]
    if not {SPEECH, TEXT} <= set(mods):
        return []
    count = sg["count"][...]  # [task, modality, language, step, pooling]
    both = (count[:, mods.index(SPEECH)] > 0) & (count[:, mods.index(TEXT)] > 0)
    return [str(t) for t, ok in zip(sg["task"][...], both.any(axis=(1, 2, 3)), strict=True) if ok]


def shared_edge_tasks(root: zarr.Group, family: str, tasks: Sequence[str]) -> list[str]:
    """The tasks whose speech and text edges are equal (checked on the first unit block)."""
    sg, arr = root[f"stats/{family}"], root[f"edges/{family}/edges"]
    all_tasks, mods = [str(t) for t in sg["task"][...]], [str(m) for m in sg["modality"][...]]
    sl = slice(0, min(arr.shape[4], 256))
    s, x = mods.index(SPEECH), mods.index(TEXT)
    return [
        t for t in tasks
        if np.array_equal(arr[all_tasks.index(t), s, :, :, sl], arr[all_tasks.index(t), x, :, :, sl])
    ]  # fmt: skip


def modality_dataset(
    root: zarr.Group, family: str, pooling: str, tasks: Sequence[str], lab: Mapping[str, Any]
) -> xr.Dataset:
    """``ap``, ``ap_lo``, ``ap_hi`` over ``(task, step, language, unit)``, unit block by unit
    block (memory: 2 histograms of one block), plus ``n_speech``, ``n_text``."""
    sg, edges_arr = root[f"stats/{family}"], root[f"edges/{family}/edges"]
    names = {d: [str(v) for v in sg[d][...]] for d in ("task", "modality", "language", "pooling")}
    steps = [int(s) for s in sg["step"][...]]
    pi = names["pooling"].index(pooling)
    count = sg["count"][...]
    n_units, n_bins = sg["hist"].shape[-2], sg["hist"].shape[-1] - 2
    kinds = {"site_kind": site_kind(lab["site"])}
    coords = {c: np.asarray(kinds[c] if c in kinds else lab[c]) for c in UNIT_COORDS}

    def at(task: str, modality: str, step: int, lang: str) -> tuple[int, int, int, int]:
        return (names["task"].index(task), names["modality"].index(modality),
                names["language"].index(lang), steps.index(step))  # fmt: skip

    pieces = []
    for start in range(0, n_units, unit_chunk(n_units, n_bins)):
        sl = slice(start, min(start + unit_chunk(n_units, n_bins), n_units))

        def get(task: str, modality: str, step: int, lang: str, sl: slice = sl) -> dict:
            t, m, li, si = at(task, modality, step, lang)
            n = int(count[t, m, li, si, pi])
            hist = sg["hist"][t, m, li, si, pi, sl] if n else None
            return {"n": n, "hist": hist, "edges": edges_arr[t, m, si, pi, sl] if n else None}

        def ap_fn(pos: dict, neg: dict, size: int = sl.stop - sl.start) -> Any:
            if not (pos["n"] and neg["n"]):
                return np.full(size, np.nan)
            if not np.array_equal(pos["edges"], neg["edges"]):
                raise ValueError(
                    "edges must be one of [shared by speech and text], got different ones; "
                    "collect the store again with this version"
                )
            edges = torch.from_numpy(np.asarray(pos["edges"]))
            hists = (torch.from_numpy(np.asarray(x["hist"])) for x in (pos, neg))
            return ap_from_hist(*hists, single_value_bins(edges))

        units = xr.Dataset(coords={"unit": np.arange(sl.start, sl.stop)}
                           | {c: ("unit", v[sl]) for c, v in coords.items()})  # fmt: skip
        pieces.append(
            modality_selectivity(
                get, ap_fn, tasks=tasks, steps=steps, languages=names["language"], units=units
            )  # fmt: skip
        )
    ds = xr.concat(pieces, "unit")
    t_idx = [names["task"].index(t) for t in tasks]
    n = count[t_idx][..., pi].transpose(0, 3, 2, 1)  # [task, step, language, modality]
    for name, mod in (("n_speech", SPEECH), ("n_text", TEXT)):
        ds[name] = (("task", "step", "language"), n[..., names["modality"].index(mod)])
    return ds


def modality_units(ds: xr.Dataset, k: int) -> xr.Dataset:
    """Add the k-sets (top: speech-selective, bottom: text-selective) and their counts per
    submodule and site kind; a condition without AP (x2en/eng) counts NaN, not 0."""
    sets = select_sets(ds["ap"], k=k)
    present = (sets >= 0).any("rank")
    out = ds.assign(units=sets.drop_vars([c for c in sets.coords if c not in sets.dims]))
    for name, coord in (("by_submodule", "submodule"), ("by_site", "site_kind")):
        # the count's axis is plural: the singular stays the per-unit coordinate
        out[name] = count_by(sets, ds, coord).where(present).rename({coord: f"{coord}s"})
    return out.assign_attrs(k=int(k), group="all", layer="all")


def modality_pass(
    root: zarr.Group, store: str, family: str, lab: Mapping[str, Any], k: int
) -> dict[str, Any]:
    """Write ``modality/<family>`` for every pooling; returns a summary (tasks, or why not)."""
    from crossmodal.reduce.driver import write_dataset

    poolings = [str(p) for p in root[f"stats/{family}/pooling"][...]]
    tasks = paired_tasks(root, family)
    shared = shared_edge_tasks(root, family, tasks)
    if not shared:
        why = "no task with speech and text" if not tasks else "edges not shared by modalities"
        return {"tasks": [], "note": f"skipped: {why}"}
    # The default pooling's group first: mode "w" wipes its subgroups (the other poolings).
    for pooling in sorted(poolings, key=lambda p: p != default_pooling(poolings)):
        ds = modality_units(modality_dataset(root, family, pooling, shared, lab), k)
        write_dataset(store, group_path("modality", family, pooling, poolings),
                      ds.assign_attrs(pooling=pooling, poolings=poolings))  # fmt: skip
    note = "" if shared == tasks else f"skipped {sorted(set(tasks) - set(shared))}: edges differ"
    return {"tasks": shared, "k": int(k), "note": note}
