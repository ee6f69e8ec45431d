"""The Zarr v3 store of a collect run: its groups and arrays, their creation, collector writes.

Layout version 2 (every chunk checksummed: crc32c); ``crossmodal/schemas/store.schema.json`` lists every array with dims and dtype:

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

Writers (two writers of one shard lose updates and metadata is last-writer-wins;
docs/platform.md, "Zarr"): only the driver creates arrays and writes attributes,
``stats`` and the manifest (:class:`crossmodal.store.collect_store.CollectStore`). A collector
writes ``parts[part]`` only for the work unit it runs and the pilot's collector
``edges[task, modality]``; both are whole shards (a shard is 1 along every leading axis and
spans all units). Collectors address them by labels (task, modality, step, pooling), read
from the group's own label arrays. A part is marked done only after its writer returned, so
a half-written part is simply written again on resume. Group paths are spelled in
:mod:`crossmodal.store.names`. Every array has ``dimension_names`` and every group
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
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from crossmodal.model.units import UnitIndex
from crossmodal.stats.concentration import concentration_family, layer_groups
from crossmodal.store import names
from crossmodal.store.location import upath, zarr_store
from crossmodal.store.lock import LOCK_NAME

LAYOUT_VERSION = 2
"""2: every chunk carries a crc32c checksum (1: none; refused, collect it again)."""
COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec())
"""Big arrays: Blosc, then a crc32c of the compressed chunk, so a changed byte fails on read
(the shard index carries its own crc32c, Zarr's default); crossmodal/store/integrity.py."""
SMALL = (ZstdCodec(level=0), Crc32cCodec())
"""Every other array: Zarr's default compressor, then the same checksum."""
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
        return cls(
            {
                "site_name": np.asarray([s.name for s in sites]),
                "site_path": np.asarray([s.module_path for s in sites]),
                "site_layer": np.asarray(
                    [-1 if s.layer is None else s.layer for s in sites], np.int16
                ),
                "site_submodule": np.asarray([s.submodule for s in sites]),
                "site_type": np.asarray([s.module_type for s in sites]),
                "site_positions": np.asarray([s.positions for s in sites]),
                "site_offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                "site_size": sizes,
            }
        )

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
        """Positions of a (task, modality[, language]) along the store's leading axes."""
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
    arr = group.create_array(
        name, shape=data.shape, dtype=dtype, dimension_names=list(dims), compressors=SMALL, **kw
    )
    arr[...] = data


def _sharded(
    group: zarr.Group,
    name: str,
    lead: tuple[int, ...],
    dims: Sequence[str],
    tail: tuple[int, ...],
    dtype: str,
    fill: Any,
    coords: Sequence[str],
    n_bins: int,
) -> None:
    """``[*lead, unit, *tail]``: chunks of ~8 MiB of units, one shard per lead index (all
    units), so whoever owns a lead index owns whole shard files (two writers of one shard
    would lose updates; docs/platform.md, "Zarr")."""
    n_units = group["unit"].shape[0]
    uc = unit_chunk(n_units, n_bins)  # the same unit blocks in every array of a family
    ones = (1,) * len(lead)
    group.create_array(
        name,
        shape=(*lead, n_units, *tail),
        dtype=dtype,
        fill_value=fill,
        chunks=(*ones, uc, *tail),
        shards=(*ones, -(-n_units // uc) * uc, *tail),
        dimension_names=list(dims),
        compressors=COMPRESSORS,
        attributes={"coordinates": " ".join(coords)},
    )


def _counts(
    group: zarr.Group,
    name: str,
    lead: tuple[int, ...],
    dims: Sequence[str],
    chunk_tail: int,
    coords: Sequence[str] = (),
) -> None:
    """Small int64 counters; the last ``chunk_tail`` axes are one chunk per leading index."""
    chunks = (*(1,) * (len(lead) - chunk_tail), *lead[len(lead) - chunk_tail :])
    group.create_array(
        name,
        shape=lead,
        dtype="int64",
        fill_value=0,
        chunks=chunks,
        dimension_names=list(dims),
        compressors=SMALL,
        attributes={"coordinates": " ".join(coords)},
    )


def _stat_arrays(
    group: zarr.Group,
    lead: tuple[int, ...],
    dims: list[str],
    n_bins: int,
    coords: Sequence[str] = (),
) -> None:
    """count/dropped over ``lead``; moments and hist over ``lead + unit(+bin)``."""
    unit_coords = (*_UNIT_COORDS, *coords)
    for name in SCALARS:
        _counts(group, name, lead, dims, 2, coords)
    for name in MOMENTS:
        _sharded(group, name, lead, [*dims, "unit"], (), "float64", np.nan, unit_coords, n_bins)
    k = n_bins + 2
    _sharded(group, "hist", lead, [*dims, "unit", "bin"], (k,), "int32", 0, unit_coords, n_bins)
    description = "0 underflow (< edge 0); i in 1..n_bins: [edge i-1, edge i); n_bins+1 overflow"
    _array(
        group,
        "bin",
        np.arange(k, dtype=np.int32),
        ["bin"],
        attributes={"description": description},
    )


def _label_axes(group: zarr.Group, dims: StoreDims, names: Sequence[str]) -> None:
    """The named label axes (task, modality, language, step, pooling) of one group."""
    values = {
        "task": dims.tasks,
        "modality": dims.modalities,
        "language": dims.languages,
        "step": np.asarray(dims.steps, dtype=np.int32),
        "pooling": dims.poolings,
    }
    for name in names:
        _array(group, name, values[name], [name])


def _labels(group: zarr.Group, dims: StoreDims, coords: UnitCoords, names: Sequence[str]) -> None:
    """The unit coordinates and the named label axes of one group."""
    _array(group, "unit", np.arange(coords.n_units, dtype=np.int64), ["unit"])
    for name, values in coords.unit_arrays().items():
        _array(group, name, values, ["unit"])
    _label_axes(group, dims, names)


def _part_axis(group: zarr.Group, dims: StoreDims) -> None:
    """The ``part`` axis and its (task, modality, language, shard) coordinates."""
    _array(group, "part", np.arange(len(dims.parts), dtype=np.int64), ["part"])
    for i, name in enumerate(_PART_COORDS):
        _array(group, name, np.asarray([q[i] for q in dims.parts]), ["part"])


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
    locked = (upath(path) / LOCK_NAME).exists()  # the driver's lock (lock.py) is all there is
    root = zarr.open_group(zarr_store(path), mode="a" if locked else "w-", zarr_format=3)
    for family, coords in units.items():
        _create_family(root, dims, family, coords)
    conc = concentration_family(units)
    if conc is not None:
        _create_concentration(root, dims, conc, units[conc])
    root.require_group(names.PLAN).attrs.update(jsonable(plan))
    root.require_group(names.MANIFEST).attrs.update({"parts": {}, "edges": {}, "merged": []})
    root.attrs.update(jsonable({"layout_version": LAYOUT_VERSION, **attrs}))
    return root


def _create_family(root: zarr.Group, dims: StoreDims, family: str, coords: UnitCoords) -> None:
    """``units``, ``edges``, ``parts`` and ``stats`` of one family."""
    cond, sp = ["task", "modality", "language"], ["step", "pooling"]
    n_s, n_p = len(dims.steps), len(dims.poolings)
    g = root.require_group(names.units_group(family))
    _labels(g, dims, coords, [])
    _array(g, "site", np.arange(len(coords.sites["site_name"]), dtype=np.int32), ["site"])
    for name, values in coords.sites.items():
        _array(g, name, values, ["site"])

    e = root.require_group(names.edges_group(family))
    _labels(e, dims, coords, ["task", "modality", *sp])
    lead = (len(dims.tasks), len(dims.modalities), n_s, n_p)
    edge = (dims.n_bins + 1,)
    dims_e = ["task", "modality", *sp, "unit", "edge"]
    _sharded(e, "edges", lead, dims_e, edge, "float32", np.nan, _UNIT_COORDS, dims.n_bins)
    _array(e, "edge", np.arange(edge[0], dtype=np.int32), ["edge"])

    pg = root.require_group(names.parts_group(family))
    _labels(pg, dims, coords, sp)
    _part_axis(pg, dims)
    _stat_arrays(pg, (len(dims.parts), n_s, n_p), ["part", *sp], dims.n_bins, _PART_COORDS)

    sg = root.require_group(names.stats_group(family))
    _labels(sg, dims, coords, [*cond, *sp])
    lead = (len(dims.tasks), len(dims.modalities), len(dims.languages))
    _stat_arrays(sg, (*lead, n_s, n_p), [*cond, *sp], dims.n_bins)
    for name in ("n_examples", "n_skipped"):
        _counts(sg, name, lead, cond, 0)
    for name in ("n_rows", "n_ended"):
        _counts(sg, name, (*lead, n_s), [*cond, "step"], 1)


def _create_concentration(
    root: zarr.Group, dims: StoreDims, family: str, coords: UnitCoords
) -> None:
    """``concentration/<family>`` and its ``parts``: one chunk per condition (driver) or part
    (its collector), so every writer owns whole chunks."""
    layers, cols = layer_groups(coords.unit_arrays()["unit_layer"])
    cond, sp = ["task", "modality", "language"], ["step", "pooling"]
    g = root.require_group(names.concentration_group(family))
    g.attrs.update({"family": family, "statistic": "gini of |activation| over a layer's units"})
    _label_axes(g, dims, [*cond, *sp])
    _array(g, "layer", layers.astype(np.int32), ["layer"])
    _array(g, "n_units", np.asarray([c.size for c in cols], np.int64), ["layer"])
    tail = (len(dims.steps), len(dims.poolings), len(layers))
    lead = (len(dims.tasks), len(dims.modalities), len(dims.languages))
    pg = root.require_group(names.concentration_parts(family))
    _label_axes(pg, dims, sp)
    _array(pg, "layer", layers.astype(np.int32), ["layer"])
    _part_axis(pg, dims)
    for name in GINI:
        dtype, fill = ("int64", 0) if name in SCALARS else ("float64", 0.0)
        for grp, shape, dim0, coords_ in (
            (g, (*lead, *tail), cond, ()),
            (pg, (len(dims.parts), *tail), ["part"], _PART_COORDS),
        ):
            grp.create_array(
                name,
                shape=shape,
                dtype=dtype,
                fill_value=fill,
                chunks=(*(1,) * (len(shape) - 3), *shape[-3:]),
                dimension_names=[*dim0, *sp, "layer"],
                compressors=SMALL,
                attributes={"coordinates": " ".join(coords_)} if coords_ else {},
            )


def has_concentration(root: zarr.Group) -> str | None:
    """The store's concentration family, or None (a store made before it was collected)."""
    if names.CONCENTRATION not in root:
        return None
    return next(iter(root[names.CONCENTRATION].group_keys()), None)


def _has_content(path: str | Path) -> bool:
    """Whether ``path`` exists and holds anything besides a run's lock file."""
    here = upath(path)
    return here.is_dir() and any(p.name != LOCK_NAME for p in here.iterdir())


def jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as plain JSON types (anything else as its ``str``), as Zarr attrs keep it."""
    return json.loads(json.dumps(value, default=str))


def open_existing(path: str | Path, *, config_hash: str, plan_hash: str) -> zarr.Group | None:
    """The store at ``path`` if it belongs to this run, ``None`` if there is none.

    Raises:
        StoreError: another layout version, another config, or another plan (data changed).
    """
    if not (upath(path) / "zarr.json").is_file():
        if _has_content(path):
            raise StoreError(
                f"output {str(path)!r} exists and is not a Zarr store; "
                "choose an empty or new output path"
            )
        return None
    root = zarr.open_group(zarr_store(path), mode="r+")
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


def _positions(group: zarr.Group, axes: Sequence[str]) -> dict[str, dict[Any, int]]:
    """Label -> index along each of ``axes`` of ``group`` (its label arrays)."""
    return {a: {v: i for i, v in enumerate(np.asarray(group[a][...]).tolist())} for a in axes}


def write_edges(
    path: str | Path,
    family: str,
    task: str,
    modality: str,
    edges: Mapping[tuple[int, str], np.ndarray],
) -> None:
    """Write the pilot's edges of one (task, modality), ``[unit, edge]`` per (step, pooling)."""
    group = zarr.open_group(zarr_store(path), path=names.edges_group(family), mode="r+")
    at = _positions(group, ("task", "modality", "step", "pooling"))
    t, m = at["task"][task], at["modality"][modality]
    for (step, pooling), values in edges.items():
        si, pi = at["step"][step], at["pooling"][pooling]
        group["edges"][t, m, si, pi] = np.asarray(values, dtype=np.float32)


def read_edges(
    path: str | Path, family: str, task: str, modality: str
) -> dict[tuple[int, str], np.ndarray]:
    """``[unit, edge]`` edges of one (task, modality), per (step, pooling)."""
    group = zarr.open_group(zarr_store(path), path=names.edges_group(family), mode="r")
    at = _positions(group, ("task", "modality", "step", "pooling"))
    edges = group["edges"][at["task"][task], at["modality"][modality]]
    return {
        (step, pooling): edges[si, pi]
        for step, si in at["step"].items()
        for pooling, pi in at["pooling"].items()
    }


def write_part(
    path: str | Path,
    family: str,
    part: int,
    stats: Mapping[tuple[int, str], Mapping[str, np.ndarray]],
) -> None:
    """Write one work unit's statistics (``UnitStats.to_numpy()`` per (step, pooling)).

    May be called once per (step, pooling) to bound host memory; all calls for ``part``
    must come from the one collector that runs it.
    """
    group = zarr.open_group(zarr_store(path), path=names.parts_group(family), mode="r+")
    at = _positions(group, ("step", "pooling"))
    for (step, pooling), arrays in stats.items():
        si, pi = at["step"][step], at["pooling"][pooling]
        for name in (*MOMENTS, "hist"):
            group[name][part, si, pi] = arrays[name]
        for name in SCALARS:  # the [1, step, pooling] chunk of this part: same single writer
            group[name][part, si, pi] = int(arrays[name])


def write_concentration(
    path: str | Path, family: str, part: int, stats: Mapping[str, np.ndarray]
) -> None:
    """Write one work unit's Gini sums (``[step, pooling, layer]`` per name of GINI): one
    chunk per array, owned by the collector that runs ``part``."""
    group = zarr.open_group(zarr_store(path), path=names.concentration_parts(family), mode="r+")
    for name in GINI:
        group[name][part] = stats[name]


def manifest(root: zarr.Group) -> dict[str, Any]:
    """The driver's record: done ``parts`` and ``edges`` (summaries), ``merged`` conditions."""
    return root[names.MANIFEST].attrs.asdict()
