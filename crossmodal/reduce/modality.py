"""Reduce pass 4: v1 modality-selective units, speech vs text AP from the store's histograms.

The AP of "speech task example" vs "text task example" (same task direction, language, step
and pooling; decoder units). Why the histograms suffice: collect chooses one set of edges
per (task, step, pooling) from the pilots of both modalities (:mod:`crossmodal.collect`),
so a language's speech and text histograms share bins and
:func:`crossmodal.stats.finalize.ap_from_hist` gives the AP with an interval guaranteed to
hold the exact one, as for languages. A store collected before the edges were shared has
other edges per modality: the pass skips it with a note (re-collect).

Sets and counts: per (task, step, language) the top-k units by AP are the speech-selective
set, the bottom-k the text-selective one (:func:`crossmodal.reduce.selection.select_sets` on
the histogram AP; no exact pass). ``by_submodule`` and ``by_site`` count them per submodule
and per site kind (the site address without its layer, e.g. ``decoder.cross_attention.k_proj``),
where cross-attention k/v are expected to dominate (docs/method.md, "v1 analyses"): they
read the encoder output, whose modality differs. Group: ``modality/<family>`` (default
pooling; others as subgroups).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr

from crossmodal.reduce.overlap import SPEECH, TEXT, count_by, modality_selectivity
from crossmodal.reduce.selection import select_sets
from crossmodal.stats.finalize import ap_from_hist, single_value_bins
from crossmodal.store.datasets import write_dataset
from crossmodal.store.layout import unit_chunk
from crossmodal.store.names import default_pooling, edges_array, modality_group, stats_group

FAMILIES = ("decoder", "ffn_act")
"""Families whose units exist for both modalities (the encoders' do not)."""
UNIT_COORDS = ("layer", "submodule", "site", "site_kind", "feature")


def site_kind(names: Sequence[str]) -> np.ndarray:
    """Site addresses without the layer: ``decoder.layers.3.ffn.fc1`` -> ``decoder.ffn.fc1``."""
    return np.asarray([re.sub(r"\.layers\.\d+\.", ".", str(n)) for n in names])


def paired_tasks(root: zarr.Group, family: str) -> list[str]:
    """Tasks with speech and text examples of one language (x2en, en2x; never asr)."""
    sg = root[stats_group(family)]
    mods = [str(m) for m in sg["modality"][...]]
    if not {SPEECH, TEXT} <= set(mods):
        return []
    count = sg["count"][...]  # [task, modality, language, step, pooling]
    both = (count[:, mods.index(SPEECH)] > 0) & (count[:, mods.index(TEXT)] > 0)
    return [str(t) for t, ok in zip(sg["task"][...], both.any(axis=(1, 2, 3)), strict=True) if ok]


def shared_edge_tasks(root: zarr.Group, family: str, tasks: Sequence[str]) -> list[str]:
    """The tasks whose speech and text edges are equal (checked on the first unit block)."""
    sg, arr = root[stats_group(family)], root[edges_array(family)]
    all_tasks, mods = [str(t) for t in sg["task"][...]], [str(m) for m in sg["modality"][...]]
    sl = slice(0, min(arr.shape[4], 256))
    s, x = mods.index(SPEECH), mods.index(TEXT)

    def shared(task: str) -> bool:
        t = all_tasks.index(task)
        return np.array_equal(arr[t, s, :, :, sl], arr[t, x, :, :, sl])

    return [t for t in tasks if shared(t)]


class _Histograms:
    """One pooling's histograms and edges of a family, addressed by labels."""

    def __init__(self, root: zarr.Group, family: str, pooling: str) -> None:
        self.stats, self.edges = root[stats_group(family)], root[edges_array(family)]
        self.index = {
            d: {str(v): i for i, v in enumerate(self.stats[d][...])}
            for d in ("task", "modality", "language", "pooling")
        }
        self.index["step"] = {int(s): i for i, s in enumerate(self.stats["step"][...])}
        self.pooling = self.index["pooling"][pooling]
        self.count = self.stats["count"][...]  # [task, modality, language, step, pooling]

    def get(self, units: slice, task: str, modality: str, step: int, language: str) -> dict:
        """Example count, histograms and edges of ``units`` in one condition (None if empty)."""
        t, m = self.index["task"][task], self.index["modality"][modality]
        li, si, pi = self.index["language"][language], self.index["step"][step], self.pooling
        n = int(self.count[t, m, li, si, pi])
        return {
            "n": n,
            "hist": self.stats["hist"][t, m, li, si, pi, units] if n else None,
            "edges": self.edges[t, m, si, pi, units] if n else None,
        }

    def counts(self, tasks: Sequence[str]) -> dict[str, tuple]:
        """``n_speech`` and ``n_text`` over ``(task, step, language)``."""
        t_idx = [self.index["task"][t] for t in tasks]
        n = self.count[t_idx][..., self.pooling].transpose(0, 3, 2, 1)  # [..., modality]
        return {
            name: (("task", "step", "language"), n[..., self.index["modality"][mod]])
            for name, mod in (("n_speech", SPEECH), ("n_text", TEXT))
        }


def _hist_ap(pos: dict, neg: dict, size: int) -> Any:
    """AP (with bounds) of speech (``pos``) vs text (``neg``) from histograms of shared edges;
    NaN when either side has no examples."""
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


def modality_dataset(
    root: zarr.Group, family: str, pooling: str, tasks: Sequence[str], lab: Mapping[str, Any]
) -> xr.Dataset:
    """``ap``, ``ap_lo``, ``ap_hi`` over ``(task, step, language, unit)``, unit block by unit
    block (memory: 2 histograms of one block), plus ``n_speech``, ``n_text``."""
    hist = _Histograms(root, family, pooling)
    n_units, n_bins = hist.stats["hist"].shape[-2], hist.stats["hist"].shape[-1] - 2
    kinds = {"site_kind": site_kind(lab["site"])}
    coords = {c: np.asarray(kinds[c] if c in kinds else lab[c]) for c in UNIT_COORDS}
    block = unit_chunk(n_units, n_bins)
    pieces = []
    for start in range(0, n_units, block):
        sl = slice(start, min(start + block, n_units))
        units = xr.Dataset(
            coords={"unit": np.arange(sl.start, sl.stop)}
            | {c: ("unit", v[sl]) for c, v in coords.items()}
        )
        piece = modality_selectivity(
            functools.partial(hist.get, sl),
            functools.partial(_hist_ap, size=sl.stop - sl.start),
            tasks=tasks,
            steps=list(hist.index["step"]),
            languages=list(hist.index["language"]),
            units=units,
        )
        pieces.append(piece)
    return xr.concat(pieces, "unit").assign(hist.counts(tasks))


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
    poolings = [str(p) for p in root[stats_group(family)]["pooling"][...]]
    tasks = paired_tasks(root, family)
    shared = shared_edge_tasks(root, family, tasks) if tasks else []
    if not shared:
        why = "no task with speech and text" if not tasks else "edges not shared by modalities"
        return {"tasks": [], "note": f"skipped: {why}"}
    # The default pooling's group first: mode "w" wipes its subgroups (the other poolings).
    for pooling in sorted(poolings, key=lambda p: p != default_pooling(poolings)):
        ds = modality_units(modality_dataset(root, family, pooling, shared, lab), k)
        attrs = {"pooling": pooling, "poolings": poolings}
        write_dataset(store, modality_group(family, pooling, poolings), ds.assign_attrs(attrs))
    note = "" if shared == tasks else f"skipped {sorted(set(tasks) - set(shared))}: edges differ"
    return {"tasks": shared, "k": int(k), "note": note}
