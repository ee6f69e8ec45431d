"""Damage to a collect store's files: every chunk decoded, every expected shard present, the
stored config against its hash; each damage mapped to the work units that rewrite it.

Why: a flipped byte, a truncated or deleted shard, a deleted array ``zarr.json`` or an
edited ``config`` attribute must never give numbers silently (docs/reliability.md,
"Integrity"). Every chunk of the arrays collect writes carries a crc32c checksum (the
``Crc32cCodec`` after the compressor, and the shard index's own), so reading a chunk fails on
a changed byte; Zarr reads a missing chunk as its fill value, so which shards must exist is
derived from the counts (a region with ``count > 0`` was written). Each :class:`Damage` says
which work units, merged conditions and pilot edges rewrite the damaged chunk: the collect
resume un-records them and runs them again (:func:`repairable`), ``crossmodal verify`` prints
:meth:`Damage.line`, and reduce refuses a store with any (:func:`check_integrity` in
:mod:`crossmodal.store.verify`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from crossmodal.collect.plan import applies
from crossmodal.store import names
from crossmodal.store.layout import GINI, MOMENTS, SCALARS, has_concentration, manifest

BIG = (*MOMENTS, "hist")
STATS_COUNTS = ("n_examples", "n_skipped", "n_rows", "n_ended")
RESUME = "run `crossmodal collect CONFIG` again (the store's own config): its resume redoes them"
NEW_OUTPUT = "collect again into a new output (`crossmodal collect CONFIG --output NEW`)"


@dataclass(frozen=True)
class Damage:
    """One damaged array or chunk, and the recorded work that rewrites it.

    ``repairable``: re-running ``parts`` (and re-merging ``conditions``, re-running the
    pilots of ``edges``) rewrites it; otherwise only a new store can (array metadata, labels,
    the root attributes).
    """

    array: str
    chunk: tuple[int, ...] | None
    reason: str
    parts: tuple[int, ...] = ()
    conditions: tuple[str, ...] = ()
    edges: tuple[str, ...] = ()
    repairable: bool = True
    key: str | None = None
    """The store key of the damaged chunk's file (its shard), deleted before it is redone:
    Zarr reads a shard before writing into it, so a damaged one would fail the rewrite."""

    def line(self) -> str:
        """One line: the array, the chunk, what is wrong and the fix."""
        where = self.array if self.chunk is None else f"{self.array} chunk {list(self.chunk)}"
        if not self.repairable:
            return (
                f"{where}: {self.reason}; the store cannot be repaired by work unit: {NEW_OUTPUT}"
            )
        return f"{where}: {self.reason}; recollect work units {list(self.parts)}: {RESUME}"


@dataclass(frozen=True)
class _Record:
    """What the store says was written: plan work units, manifest, and its labels."""

    units: Sequence[Mapping[str, Any]]
    done: Mapping[str, Any]
    keep_parts: bool
    labels: Mapping[str, list[str]]

    def cond_units(self, key: str) -> tuple[int, ...]:
        return tuple(w["index"] for w in self.units if _key(w) == key)

    def part_kept(self, q: int) -> bool:
        """Whether part ``q`` is done and its shards are still there (kept or unmerged)."""
        if str(q) not in self.done["parts"] or q >= len(self.units):
            return False
        return self.keep_parts or _key(self.units[q]) not in set(self.done["merged"])


def _key(w: Mapping[str, Any]) -> str:
    return names.condition_key(w["task"], w["modality"], w["language"])


def scan(root: zarr.Group, *, counts: bool = True) -> list[Damage]:
    """Every damage of the store at ``root`` (never raises for a damaged store).

    ``counts``: also check the recorded rows against the count arrays (a deleted count chunk
    reads as 0); ``crossmodal verify`` has its own lines for those.
    """
    out = _config_damage(root.attrs.asdict())
    try:
        record = _record(root)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
        return [*out, Damage("plan/manifest", None, f"unreadable ({_one(err)})", repairable=False)]
    for family in root.attrs.asdict().get("config", {}).get("families", []):
        out += _family_damage(root, family, record, counts)
    conc = _concentration_family(root)
    if conc is not None:
        out += _concentration_damage(root, conc, record)
    return out


def repairable(damage: Sequence[Damage]) -> tuple[set[int], set[str], set[str]]:
    """The parts, merged conditions and pilot edges a resume must redo for ``damage``."""
    parts, conds, edges = set(), set(), set()
    for d in damage:
        parts |= set(d.parts)
        conds |= set(d.conditions)
        edges |= set(d.edges)
    return parts, conds, edges


# ------------------------------------------------------------------------ config


def _config_damage(attrs: Mapping[str, Any]) -> list[Damage]:
    """The stored ``config`` must hash to the stored ``config_hash`` (an edited seed or step
    list would make reduce read the store with settings it was not collected with)."""
    from crossmodal.collect.config import from_dict

    try:
        got = from_dict(attrs["config"]).hash()
    except Exception as err:  # noqa: BLE001 - any edit that breaks the config is damage
        got = f"unreadable ({_one(err)})"
    want = attrs.get("config_hash")
    if got == want:
        return []
    reason = (
        f"the stored config hashes to {got!r}, config_hash says {want!r} (the root attributes "
        "were edited)"
    )
    return [Damage("attrs config", None, reason, repairable=False)]


# ------------------------------------------------------------------------ arrays


def _record(root: zarr.Group) -> _Record:
    attrs = root.attrs.asdict()
    units = root[names.PLAN].attrs.asdict().get("work_units", [])
    done = manifest(root)
    for k in ("parts", "edges", "merged"):
        done.setdefault(k, {} if k != "merged" else [])
    cfg = attrs["config"]
    labels = {"task": cfg["tasks"], "modality": cfg["modalities"], "language": cfg["languages"]}
    return _Record(units, done, bool(cfg.get("keep_parts", False)), labels)


def _family_damage(root: zarr.Group, family: str, record: _Record, counts: bool) -> list[Damage]:
    """Parts, stats and edges of one family."""
    out: list[Damage] = []
    for group, lead, names_ in (
        (names.parts_group(family), _part_lead, (*SCALARS, *BIG)),
        (names.stats_group(family), _cond_lead, (*SCALARS, *BIG, *STATS_COUNTS)),
        (names.edges_group(family), _edges_lead, ("edges",)),
    ):
        arrays = {}
        for name in names_:
            arr, damage = _open_array(root, f"{group}/{name}")
            if damage is not None:
                out.append(damage)
            else:
                arrays[name] = arr
        for arr in arrays.values():
            out += _chunk_damage(arr, lambda idx, lead=lead: lead(record, idx))
        out += _missing_shards(arrays, group, lead, record)
        if counts and group != names.edges_group(family):
            out += _count_damage(arrays, group, lead, record, family)
    return out


def _open_array(root: zarr.Group, path: str) -> tuple[zarr.Array | None, Damage | None]:
    try:
        arr = root[path]
    except Exception as err:  # noqa: BLE001 - a missing or broken zarr.json, whatever zarr says
        return None, Damage(
            path, None, f"array metadata unreadable ({_one(err)})", repairable=False
        )
    if not isinstance(arr, zarr.Array):
        return None, Damage(path, None, "is a group, not an array", repairable=False)
    return arr, None


def _chunks(arr: zarr.Array) -> Iterator[tuple[int, ...]]:
    grid = [range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    return itertools.product(*grid)


def _chunk_damage(arr: zarr.Array, lead: Any) -> list[Damage]:
    """Decode every chunk of ``arr`` (its checksum is checked on decode)."""
    out = []
    for idx in _chunks(arr):
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))
        try:
            arr[sl]
        except Exception as err:  # noqa: BLE001 - a checksum, codec or truncation error
            shard = arr.shards or arr.chunks
            at = tuple(i * c // n for i, c, n in zip(idx, arr.chunks, shard, strict=True))
            key = f"{arr.path}/{arr.metadata.encode_chunk_key(at)}"
            out.append(_damage(arr.path, idx, f"unreadable ({_one(err)})", lead(idx), key))
    return out


def _missing_shards(
    arrays: Mapping[str, zarr.Array], group: str, lead: Any, record: _Record
) -> list[Damage]:
    """A shard of a big array whose region counts rows must exist (a missing one reads as
    the fill value: NaN moments, empty histograms)."""
    out: list[Damage] = []
    edges = group.startswith("edges/")
    count = arrays.get("edges") if edges else arrays.get("count")
    if count is None:
        return out
    for name in ("edges",) if edges else BIG:
        arr = arrays.get(name)
        if arr is None:
            continue
        shard = arr.shards or arr.chunks
        n_lead = len(arr.shape) - (2 if name in ("hist", "edges") else 1)
        for idx in itertools.product(*(range(n) for n in arr.shape[:n_lead])):
            if not _expected(record, group, idx, count):
                continue
            coords = (*idx, *(0 for _ in range(len(shard) - n_lead)))
            key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
            if not sync(arr.store.exists(key)):
                out.append(_damage(arr.path, coords, "shard file missing", lead(record, coords)))
    return out


def _expected(record: _Record, group: str, idx: tuple[int, ...], count: zarr.Array) -> bool:
    """Whether the shard at lead index ``idx`` of ``group`` was written: recorded edges; a
    done part still kept, or a merged condition, where its count is > 0."""
    if group.startswith("edges/"):
        task, modality = _labels(record, idx[:2])
        family = group.split("/", 1)[1]  # the pilot writes only the modalities it runs on
        return (
            applies(family, modality)
            and names.condition_key(task, modality) in record.done["edges"]
        )
    if group.startswith("parts/"):
        written = record.part_kept(idx[0])
    else:
        written = names.condition_key(*_labels(record, idx[:3])) in set(record.done["merged"])
    try:
        return written and int(np.asarray(count[idx])) > 0
    except Exception:  # noqa: BLE001 - the count chunk itself is damaged: reported on its own
        return False


def _count_damage(
    arrays: Mapping[str, zarr.Array], group: str, lead: Any, record: _Record, family: str
) -> list[Damage]:
    """``count + dropped`` of every recorded part and merged condition = its recorded rows
    (where ``family`` runs on the modality)."""
    out: list[Damage] = []
    if "count" not in arrays or "dropped" not in arrays:
        return out
    try:
        rows = np.asarray(arrays["count"][...]) + np.asarray(arrays["dropped"][...])
    except Exception:  # noqa: BLE001 - unreadable chunks are reported by _chunk_damage
        return out
    parts = record.done["parts"]
    if group.startswith("parts/"):
        regions = {
            (int(k),): [v]
            for k, v in parts.items()
            if k.isdigit()
            and int(k) < min(len(rows), len(record.units))
            and applies(family, record.units[int(k)]["modality"])
        }
    else:
        regions = {}
        for key in record.done["merged"]:
            if not applies(family, names.parse_condition_key(key)[1]):
                continue
            at = _cond_index(record, key)
            units = record.cond_units(key)
            if at is not None and all(str(q) in parts for q in units):
                regions[at] = [parts[str(q)] for q in units]
    for at, summaries in regions.items():
        want = np.sum([np.asarray(s.get("n_rows", []), dtype=np.int64) for s in summaries], axis=0)
        got = rows[at]
        if np.shape(want) != got.shape[:1] or (got != np.asarray(want)[:, None]).any():
            reason = (
                f"count + dropped {got.T.tolist()} != the recorded rows {np.asarray(want).tolist()}"
            )
            out.append(_damage(f"{group}/count", at, reason, lead(record, at)))
    return out


# ------------------------------------------------------------------------ concentration


def _concentration_family(root: zarr.Group) -> str | None:
    try:
        return has_concentration(root)
    except Exception:  # noqa: BLE001 - a damaged group listing is reported by its arrays
        return None


def _concentration_damage(root: zarr.Group, family: str, record: _Record) -> list[Damage]:
    out: list[Damage] = []
    for group, lead in (
        (names.concentration_group(family), _cond_lead),
        (names.concentration_parts(family), _part_lead),
    ):
        for name in GINI:
            arr, damage = _open_array(root, f"{group}/{name}")
            if damage is not None:
                out.append(damage)
            else:
                out += _chunk_damage(arr, lambda idx, lead=lead: lead(record, idx))
    return out


# ------------------------------------------------------------------------ lead index -> work


def _damage(
    array: str,
    chunk: tuple[int, ...],
    reason: str,
    target: Damage | None,
    key: str | None = None,
) -> Damage:
    if target is None:
        return Damage(array, chunk, reason, repairable=False)
    return Damage(array, chunk, reason, target.parts, target.conditions, target.edges, key=key)


def _labels(record: _Record, idx: Sequence[int]) -> list[str]:
    axes = ("task", "modality", "language")
    return [record.labels[a][i] for a, i in zip(axes, idx, strict=False)]


def _cond_index(record: _Record, key: str) -> tuple[int, int, int] | None:
    task, modality, language = names.parse_condition_key(key)
    try:
        return (
            record.labels["task"].index(task),
            record.labels["modality"].index(modality),
            record.labels["language"].index(language),
        )
    except ValueError:
        return None


def _part_lead(record: _Record, idx: tuple[int, ...]) -> Damage | None:
    """Part ``idx[0]``: rerun that work unit and re-merge its condition."""
    q = idx[0]
    if q >= len(record.units):
        return None
    key = _key(record.units[q])
    return Damage("", None, "", (q,), (key,))


def _cond_lead(record: _Record, idx: tuple[int, ...]) -> Damage | None:
    """Condition ``idx[:3]``: rerun all its work units (their parts may be deleted)."""
    key = names.condition_key(*_labels(record, idx[:3]))
    units = record.cond_units(key)
    return Damage("", None, "", units, (key,)) if units else None


def _edges_lead(record: _Record, idx: tuple[int, ...]) -> Damage | None:
    """Edges of (task, modality): the task's pilot and every work unit of the task (the
    task's pilot rewrites every modality's edges)."""
    task, modality = _labels(record, idx[:2])
    units = tuple(w["index"] for w in record.units if w["task"] == task)
    conds = tuple(dict.fromkeys(_key(w) for w in record.units if w["task"] == task))
    return Damage("", None, "", units, conds, (names.condition_key(task, modality),))


def _one(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
    return f"{type(err).__name__}: {text}"[:200]
