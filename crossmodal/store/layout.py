"""The Zarr v3 store of a collect run: layout, provenance, partial statistics, manifest, merge.

Layout version 1; ``crossmodal/schemas/store.schema.json`` lists every array with dims and dtype:

- root attrs: ``layout_version``, ``config``, ``config_hash``, ``plan_hash``, ``created``,
  ``finished``, ``provenance`` (model source and revision, dtype, package versions, host);
- ``units/<family>``: the unit index table over ``site`` and ``unit`` (:mod:`crossmodal.model.units`;
  offsets restart at 0 in each family);
- ``edges/<family>``: ``edges[task, modality, step, pooling, unit, edge]``, shared by the
  languages of one (task, modality, step, pooling);
- ``parts/<family>``: per work unit ``part``: ``count``/``dropped[part, step, pooling]``,
  ``mean``/``m2``/``min``/``max[part, step, pooling, unit]``, ``hist[..., unit, bin]`` (bin 0
  underflow, 1..n_bins, n_bins+1 overflow);
- ``stats/<family>``: the same merged per condition ``[task, modality, language, step,
  pooling, ...]``, plus ``n_examples``, ``n_skipped``, ``n_rows``, ``n_ended``;
- ``concentration/<family>`` (one family, :func:`crossmodal.stats.concentration.concentration_family`):
  ``count``/``dropped``/``mean``/``m2[task, modality, language, step, pooling, layer]`` of
  the per-example Gini of each decoder layer, merged per condition; the parts in
  ``concentration/<family>/parts`` (``[part, step, pooling, layer]``, kept: they are tiny);
- ``plan`` attrs (written once) and ``manifest`` attrs (done parts and edges, merged
  conditions).

Writers (platform.md, Zarr: two writers of one shard lose updates; metadata is
last-writer-wins): only the driver creates arrays and writes attributes, ``stats`` and the
manifest. A collector writes ``parts[p]`` only for the work unit it runs and the pilot's
collector ``edges[t, m]``; both are whole shards (a shard is 1 along every leading axis and
spans all units). A part is marked done only after its writer returned, so a half-written
part is simply written again on resume. Every array has ``dimension_names`` and every group
its coordinates: ``xr.open_zarr(path, group="stats/decoder", consolidated=False)`` is labelled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from crossmodal.stats.concentration import GiniStats, concentration_family, layer_groups
from crossmodal.store.lock import LOCK_NAME
from crossmodal.stats.running import UnitStats, merge_all
from crossmodal.model.units import UnitIndex

LAYOUT_VERSION = 1
COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
MOMENTS = ("mean", "m2", "min", "max")
SCALARS = ("count", "dropped")
GINI = ("count", "dropped", "mean", "m2")
_CHUNK_BYTES = 1 << 23
_UNIT_COORDS = ("unit_site", "unit_layer", "unit_feature")
_PART_COORDS = ("part_task", "part_modality", "part_language", "part_shard")


class StoreError(ValueError):
    """A store that cannot be used for this run (one line: what, why, the fix)."""


@dataclass(frozen=True)
class UnitCoords:
    """The unit index table of one family: ``site_*`` arrays over its sites (module outputs).

    Offsets restart at 0 in each family, because each family is its own group and unit axis.
    """

    sites: Mapping[str, np.ndarray]  # site_name, site_path, site_layer, site_submodule, ...

    @classmethod
    def from_index(cls, index: UnitIndex, family: str) -> UnitCoords:
        sites = [s for s in index.sites if s.family == family]
        if not sites:
            raise ValueError(f"family must be one of {list(index.families)}, got {family!r}")
        sizes = np.asarray([s.n_features for s in sites], dtype=np.int64)
        return cls({
            "site_name": np.asarray([s.name for s in sites]),
            "site_path": np.asarray([s.module_path for s in sites]),
            "site_layer": np.asarray([-1 if s.layer is None else s.layer for s in sites], np.int16),
            "site_submodule": np.asarray([s.submodule for s in sites]),
            "site_type": np.asarray([s.module_type for s in sites]),
            "site_positions": np.asarray([s.positions for s in sites]),
            "site_offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
            "site_size": sizes,
        })  # fmt: skip

    @property
    def n_units(self) -> int:
        return int(np.sum(self.sites["site_size"]))

    def unit_arrays(self) -> dict[str, np.ndarray]:
        """``unit_site``, ``unit_layer``, ``unit_feature`` over the flat unit axis."""
        sizes = self.sites["site_size"]
        site = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        feature = np.arange(self.n_units) - np.repeat(self.sites["site_offset"], sizes)
        layer = np.asarray(self.sites["site_layer"], dtype=np.int16)[site]
        return {"unit_site": site, "unit_layer": layer, "unit_feature": feature.astype(np.int32)}


@dataclass(frozen=True)
class StoreDims:
    """The labelled axes of a store, fixed at creation."""

    tasks: tuple[str, ...]
    modalities: tuple[str, ...]
    languages: tuple[str, ...]
    steps: tuple[int, ...]
    poolings: tuple[str, ...]
    n_bins: int
    parts: tuple[tuple[str, str, str, int], ...]  # (task, modality, language, shard) per part

    def index(self, task: str, modality: str, language: str | None = None) -> tuple[int, ...]:
        t, m = self.tasks.index(task), self.modalities.index(modality)
        return (t, m) if language is None else (t, m, self.languages.index(language))


def unit_chunk(n_units: int, n_bins: int) -> int:
    """Units per chunk: a histogram chunk of about 8 MiB (power of two, at most all units)."""
    per_unit = 4 * (n_bins + 2)
    size = 1 << max(8, round(np.log2(max(1, _CHUNK_BYTES // per_unit))))
    return min(size, max(1, n_units))


def _array(group: zarr.Group, name: str, data: Any, dims: Sequence[str], **kw: Any) -> None:
    """A small unchunked array holding ``data``, with dimension names."""
    data = np.asarray(data)
    dtype = str if data.dtype.kind in "UO" else data.dtype
    arr = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=list(dims), **kw)
    arr[...] = data


def _sharded(
    group: zarr.Group, name: str, lead: tuple[int, ...], dims: Sequence[str], tail: tuple[int, ...],
    dtype: str, fill: Any, coords: Sequence[str], n_bins: int,
) -> None:  # fmt: skip
    """``[*lead, unit, *tail]``: chunks of ~8 MiB of units, one shard per lead index (all
    units), so whoever owns a lead index owns whole shard files (platform.md, Zarr)."""
    n_units = group["unit"].shape[0]
    uc = unit_chunk(n_units, n_bins)  # the same unit blocks in every array of a family
    ones = (1,) * len(lead)
    group.create_array(
        name, shape=(*lead, n_units, *tail), dtype=dtype, fill_value=fill,
        chunks=(*ones, uc, *tail), shards=(*ones, -(-n_units // uc) * uc, *tail),
        dimension_names=list(dims), compressors=COMPRESSORS,
        attributes={"coordinates": " ".join(coords)},
    )  # fmt: skip


def _counts(group: zarr.Group, name: str, lead: tuple[int, ...], dims: Sequence[str],
            chunk_tail: int, coords: Sequence[str] = ()) -> None:  # fmt: skip
    """Small int64 counters; the last ``chunk_tail`` axes are one chunk per leading index."""
    chunks = (*(1,) * (len(lead) - chunk_tail), *lead[len(lead) - chunk_tail :])
    group.create_array(
        name, shape=lead, dtype="int64", fill_value=0, chunks=chunks, dimension_names=list(dims),
        attributes={"coordinates": " ".join(coords)},
    )  # fmt: skip


def _stat_arrays(group: zarr.Group, lead: tuple[int, ...], dims: list[str], n_bins: int,
                 coords: Sequence[str] = ()) -> None:  # fmt: skip
    """count/dropped over ``lead``; moments and hist over ``lead + unit(+bin)``."""
    unit_coords = (*_UNIT_COORDS, *coords)
    for name in SCALARS:
        _counts(group, name, lead, dims, 2, coords)
    for name in MOMENTS:
        _sharded(group, name, lead, [*dims, "unit"], (), "float64", np.nan, unit_coords, n_bins)
    k = n_bins + 2
    _sharded(group, "hist", lead, [*dims, "unit", "bin"], (k,), "int32", 0, unit_coords, n_bins)
    _array(group, "bin", np.arange(k, dtype=np.int32), ["bin"], attributes={"description": (
        "0 underflow (< edge 0); i in 1..n_bins: [edge i-1, edge i); n_bins+1 overflow")})  # fmt: skip


def _labels(group: zarr.Group, dims: StoreDims, coords: UnitCoords, names: Sequence[str]) -> None:
    """The unit coordinates and the named label axes of one group."""
    _array(group, "unit", np.arange(coords.n_units, dtype=np.int64), ["unit"])
    for name, values in coords.unit_arrays().items():
        _array(group, name, values, ["unit"])
    values = {"task": dims.tasks, "modality": dims.modalities, "language": dims.languages,
              "step": np.asarray(dims.steps, dtype=np.int32), "pooling": dims.poolings}  # fmt: skip
    for name in names:
        _array(group, name, values[name], [name])


def create_store(
    path: str | Path,
    *,
    dims: StoreDims,
    units: Mapping[str, UnitCoords],
    attrs: Mapping[str, Any],
    plan: Mapping[str, Any],
) -> zarr.Group:
    """Create every array and the root attributes (driver only); refuses an existing store."""
    if _has_content(path):
        raise StoreError(
            f"output {str(path)!r} already exists; resume it with its own config "
            "or choose a new output path"
        )
    locked = (Path(path) / LOCK_NAME).exists()  # the driver's lock (lock.py) is all there is
    root = zarr.open_group(str(path), mode="a" if locked else "w-", zarr_format=3)
    cond, sp = ["task", "modality", "language"], ["step", "pooling"]
    n_s, n_p = len(dims.steps), len(dims.poolings)
    for family, coords in units.items():
        g = root.require_group(f"units/{family}")
        _labels(g, dims, coords, [])
        _array(g, "site", np.arange(len(coords.sites["site_name"]), dtype=np.int32), ["site"])
        for name, values in coords.sites.items():
            _array(g, name, values, ["site"])

        e = root.require_group(f"edges/{family}")
        _labels(e, dims, coords, ["task", "modality", *sp])
        lead = (len(dims.tasks), len(dims.modalities), n_s, n_p)
        edge = (dims.n_bins + 1,)
        dims_e = ["task", "modality", *sp, "unit", "edge"]
        _sharded(e, "edges", lead, dims_e, edge, "float32", np.nan, _UNIT_COORDS, dims.n_bins)
        _array(e, "edge", np.arange(edge[0], dtype=np.int32), ["edge"])

        pg = root.require_group(f"parts/{family}")
        _labels(pg, dims, coords, sp)
        _array(pg, "part", np.arange(len(dims.parts), dtype=np.int64), ["part"])
        for i, name in enumerate(_PART_COORDS):
            _array(pg, name, np.asarray([q[i] for q in dims.parts]), ["part"])
        _stat_arrays(pg, (len(dims.parts), n_s, n_p), ["part", *sp], dims.n_bins, _PART_COORDS)

        sg = root.require_group(f"stats/{family}")
        _labels(sg, dims, coords, [*cond, *sp])
        lead = (len(dims.tasks), len(dims.modalities), len(dims.languages))
        _stat_arrays(sg, (*lead, n_s, n_p), [*cond, *sp], dims.n_bins)
        for name in ("n_examples", "n_skipped"):
            _counts(sg, name, lead, cond, 0)
        for name in ("n_rows", "n_ended"):
            _counts(sg, name, (*lead, n_s), [*cond, "step"], 1)
    conc = concentration_family(units)
    if conc is not None:
        _create_concentration(root, dims, conc, units[conc])
    root.require_group("plan").attrs.update(jsonable(plan))
    root.require_group("manifest").attrs.update({"parts": {}, "edges": {}, "merged": []})
    root.attrs.update(jsonable({"layout_version": LAYOUT_VERSION, **attrs}))
    return root


def _create_concentration(root: zarr.Group, dims: StoreDims, family: str,
                          coords: UnitCoords) -> None:  # fmt: skip
    """``concentration/<family>`` and its ``parts``: one chunk per condition (driver) or part
    (its collector), so every writer owns whole chunks."""
    layers, cols = layer_groups(coords.unit_arrays()["unit_layer"])
    n_l, sp = len(layers), ["step", "pooling"]
    g = root.require_group(f"concentration/{family}")
    g.attrs.update({"family": family, "statistic": "gini of |activation| over a layer's units"})
    _labels_only(g, dims, ["task", "modality", "language", *sp])
    _array(g, "layer", layers.astype(np.int32), ["layer"])
    _array(g, "n_units", np.asarray([c.size for c in cols], np.int64), ["layer"])
    lead = (len(dims.tasks), len(dims.modalities), len(dims.languages), len(dims.steps),
            len(dims.poolings), n_l)  # fmt: skip
    pg = g.require_group("parts")
    _labels_only(pg, dims, sp)
    _array(pg, "layer", layers.astype(np.int32), ["layer"])
    _array(pg, "part", np.arange(len(dims.parts), dtype=np.int64), ["part"])
    for i, name in enumerate(_PART_COORDS):
        _array(pg, name, np.asarray([q[i] for q in dims.parts]), ["part"])
    for name in GINI:
        dtype, fill = ("int64", 0) if name in SCALARS else ("float64", 0.0)
        for grp, shape, dim0, coords_ in ((g, lead, ["task", "modality", "language"], ()),
                                          (pg, (len(dims.parts), *lead[3:]), ["part"],
                                           _PART_COORDS)):  # fmt: skip
            grp.create_array(
                name, shape=shape, dtype=dtype, fill_value=fill, chunks=(*(1,) * (len(shape) - 3),
                *shape[-3:]), dimension_names=[*dim0, *sp, "layer"],
                attributes={"coordinates": " ".join(coords_)} if coords_ else {},
            )  # fmt: skip


def _labels_only(group: zarr.Group, dims: StoreDims, names: Sequence[str]) -> None:
    values = {"task": dims.tasks, "modality": dims.modalities, "language": dims.languages,
              "step": np.asarray(dims.steps, dtype=np.int32), "pooling": dims.poolings}  # fmt: skip
    for name in names:
        _array(group, name, values[name], [name])


def has_concentration(root: zarr.Group) -> str | None:
    """The store's concentration family, or None (a store made before it was collected)."""
    return next(iter(root["concentration"].group_keys()), None) if "concentration" in root else None


def _has_content(path: str | Path) -> bool:
    """Whether ``path`` exists and holds anything besides a run's lock file."""
    return Path(path).is_dir() and any(p.name != LOCK_NAME for p in Path(path).iterdir())


def jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


def open_existing(path: str | Path, *, config_hash: str, plan_hash: str) -> zarr.Group | None:
    """The store at ``path`` if it belongs to this run, ``None`` if there is none.

    Raises:
        StoreError: another layout version, another config, or another plan (data changed).
    """
    if not (Path(path) / "zarr.json").is_file():
        if _has_content(path):
            raise StoreError(
                f"output {str(path)!r} exists and is not a Zarr store; "
                "choose an empty or new output path"
            )
        return None
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs.asdict()
    version = attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreError(
            f"store layout_version must be one of [{LAYOUT_VERSION}], got {version!r}"
            f" in {str(path)!r}; write to a new output path"
        )
    if attrs.get("config_hash") != config_hash:
        raise StoreError(
            f"store {str(path)!r} was written by a different config (hash "
            f"{attrs.get('config_hash')!r}, this config {config_hash!r}); resume it "
            "with its own config (in its attrs) or choose a new output path"
        )
    if attrs.get("plan_hash") != plan_hash:
        raise StoreError(
            f"store {str(path)!r} was planned from different data (plan hash "
            f"{attrs.get('plan_hash')!r}, now {plan_hash!r}); the dataset changed: "
            "choose a new output path"
        )
    return root


# ---------------------------------------------------------------- collector-side writes


def write_edges(
    path: str | Path,
    family: str,
    index: tuple[int, int],
    edges: Mapping[tuple[int, int], np.ndarray],
) -> None:
    """Write ``edges[t, m, step_i, pooling_i]`` for the pilot's (task, modality) only."""
    arr = zarr.open_array(str(path), path=f"edges/{family}/edges", mode="r+")
    for (si, pi), values in edges.items():
        arr[index[0], index[1], si, pi] = np.asarray(values, dtype=np.float32)


def read_edges(path: str | Path, family: str, index: tuple[int, int]) -> np.ndarray:
    """``[step, pooling, unit, edge]`` edges of one (task, modality)."""
    arr = zarr.open_array(str(path), path=f"edges/{family}/edges", mode="r")
    return arr[index[0], index[1]]


def write_part(
    path: str | Path,
    family: str,
    part: int,
    stats: Mapping[tuple[int, int], Mapping[str, np.ndarray]],
) -> None:
    """Write one work unit's statistics (``UnitStats.to_numpy()`` per (step_i, pooling_i)).

    May be called once per (step_i, pooling_i) to bound host memory; all calls for ``part``
    must come from the one collector that runs it.
    """
    group = zarr.open_group(str(path), path=f"parts/{family}", mode="r+")
    for (si, pi), arrays in stats.items():
        for name in (*MOMENTS, "hist"):
            group[name][part, si, pi] = arrays[name]
        for name in SCALARS:  # the [1, step, pooling] chunk of this part: same single writer
            group[name][part, si, pi] = int(arrays[name])


def write_concentration(path: str | Path, family: str, part: int,
                        stats: Mapping[str, np.ndarray]) -> None:  # fmt: skip
    """Write one work unit's Gini sums (``[step, pooling, layer]`` per name of GINI): one
    chunk per array, owned by the collector that runs ``part``."""
    group = zarr.open_group(str(path), path=f"concentration/{family}/parts", mode="r+")
    for name in GINI:
        group[name][part] = stats[name]


# ---------------------------------------------------------------- driver-side bookkeeping


def manifest(root: zarr.Group) -> dict[str, Any]:
    return root["manifest"].attrs.asdict()


def mark_part(root: zarr.Group, part: int, summary: Mapping[str, Any]) -> None:
    done = dict(manifest(root)["parts"])
    done[str(part)] = jsonable(summary)
    root["manifest"].attrs["parts"] = done


def mark_edges(root: zarr.Group, task: str, modality: str, summary: Mapping[str, Any]) -> None:
    done = dict(manifest(root)["edges"])
    done[f"{task}/{modality}"] = jsonable(summary)
    root["manifest"].attrs["edges"] = done


def merge_condition(
    root: zarr.Group,
    dims: StoreDims,
    families: Sequence[str],
    condition: tuple[str, str, str],
    parts: Sequence[int],
    counts: Mapping[str, Any],
    *,
    keep_parts: bool,
) -> None:
    """Chan-merge ``parts`` into ``stats/<family>[task, modality, language]`` (driver only).

    ``counts``: n_examples, n_skipped (ints) and n_rows, n_ended (per step) of the condition.
    Parts are read in unit blocks; each merged (step, pooling) is written as whole shards in
    one call (a partial write would read-modify-write the shard once per block). Parts are
    deleted afterwards unless ``keep_parts``.
    """
    t, m, lang = dims.index(*condition)
    names = (*MOMENTS, "hist")
    conc = has_concentration(root)
    if conc is not None and conc in families:  # before "merged" is marked: redone on resume
        pg, cg = root[f"concentration/{conc}/parts"], root[f"concentration/{conc}"]
        pieces = [GiniStats.from_numpy({k: pg[k][q] for k in GINI}) for q in parts]
        total = pieces[0]
        for piece in pieces[1:]:
            total = total.merge(piece)
        for k, v in total.to_numpy().items():
            cg[k][t, m, lang] = v
    for family in families:
        pg, sg = root[f"parts/{family}"], root[f"stats/{family}"]
        n_units = pg["mean"].shape[-1]
        block = unit_chunk(n_units, dims.n_bins)
        for si, pi in np.ndindex(len(dims.steps), len(dims.poolings)):
            scal = {k: [np.asarray(pg[k][q, si, pi]) for q in parts] for k in SCALARS}
            out = {k: np.empty(sg[k].shape[5:], sg[k].dtype) for k in names}
            for start in range(0, n_units, block):
                sl = slice(start, min(start + block, n_units))
                edges = root[f"edges/{family}/edges"][t, m, si, pi, sl]
                pieces = [
                    UnitStats.from_numpy(
                        {
                            "edges": edges,
                            **{k: scal[k][j] for k in SCALARS},
                            **{k: pg[k][q, si, pi, sl] for k in names},
                        }  # fmt: skip
                    )
                    for j, q in enumerate(parts)
                ]
                merged = merge_all(pieces).to_numpy()
                for k in names:
                    out[k][sl] = merged[k]
            for k in names:
                sg[k][t, m, lang, si, pi] = out[k]
            for k in SCALARS:
                sg[k][t, m, lang, si, pi] = int(sum(scal[k]))
        for k in ("n_examples", "n_skipped", "n_rows", "n_ended"):
            sg[k][t, m, lang] = np.asarray(counts[k], dtype=np.int64)
        if not keep_parts:
            _delete_parts(root, family, parts)
    key = "/".join(condition)
    root["manifest"].attrs["merged"] = sorted({*manifest(root)["merged"], key})


def _delete_parts(root: zarr.Group, family: str, parts: Sequence[int]) -> None:
    """Drop the parts' shards (whole ``c/<part>`` directories): stats now hold their sums."""
    for name in (*MOMENTS, "hist"):
        for q in parts:
            sync(root.store.delete_dir(f"parts/{family}/{name}/c/{q}"))


def finish(root: zarr.Group, attrs: Mapping[str, Any]) -> None:
    root.attrs.update(jsonable(attrs))
