"""Checks that a collect store is whole and self-consistent (``crossmodal verify STORE``).

It re-derives what the driver recorded from what the arrays hold, so a lost, doubled or
half-written work unit, a merge that went wrong, or bit rot shows up as one line each:

- root attrs against ``crossmodal/schemas/store.schema.json``, ``layout_version`` first (other
  versions are not read further);
- manifest against plan: every done part is a planned work unit, every merged condition
  has all its parts done; a finished store has every planned condition merged;
- manifest against arrays: for every done part and family, ``count + dropped`` equals the
  part's recorded ``n_rows`` per step and pooling (present where rows were expected, absent
  where none were); where part shards are kept, their histograms sum to ``count``;
- merged conditions: ``count`` = the sum of its parts' counts; ``n_rows``, ``n_ended``,
  ``n_examples``, ``n_skipped`` = the sums the manifest recorded; ``count + dropped =
  n_rows``; ``n_rows`` never grows with the step (an example only reaches step t if its
  output has not ended before); every family that runs on the modality has the same counts;
  per unit the histogram sums to ``count`` and mean, m2, min, max are finite where count > 0
  (m2 >= 0, min <= max);
- edges of every finished pilot are finite and strictly increasing.

Arrays are read one (condition, step, pooling) shard and one unit block at a time, so memory
stays bounded; a store of the full reference run is read once end to end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import zarr

from crossmodal.collect.plan import applies
from crossmodal.schemas import load_schema
from crossmodal.store import names
from crossmodal.store.integrity import scan
from crossmodal.store.layout import LAYOUT_VERSION, MOMENTS, manifest
from crossmodal.store.location import upath, zarr_store

_COUNTS = ("n_examples", "n_skipped", "n_rows", "n_ended")
_AXES = ("task", "modality", "language")
Labels = dict[str, list[str]]


@dataclass
class Report:
    """What :func:`verify_store` found: ``problems`` (the store is wrong) and ``notes``."""

    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [*self.problems, *(f"note: {n}" for n in self.notes)]
        if self.ok:
            what = ", ".join(f"{v} {k}" for k, v in self.checked.items())
            lines.append(f"ok: {self.store} ({what})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Family:
    """One family's small arrays (loaded) and big arrays (opened once, read by block)."""

    name: str
    labels: Labels  # task, modality, language
    steps: np.ndarray
    stats: dict[str, np.ndarray]  # count, dropped, n_examples, n_skipped, n_rows, n_ended
    parts: dict[str, np.ndarray]  # count, dropped: [part, step, pooling]
    stat_arrays: dict[str, zarr.Array]  # mean, m2, min, max, hist
    part_arrays: dict[str, zarr.Array]

    @classmethod
    def read(cls, root: zarr.Group, name: str) -> _Family:
        sg, pg = root[names.stats_group(name)], root[names.parts_group(name)]
        big = (*MOMENTS, "hist")
        return cls(
            name=name,
            labels={d: [str(v) for v in np.asarray(sg[d][...]).tolist()] for d in _AXES},
            steps=np.asarray(sg["step"][...]),
            stats={k: np.asarray(sg[k][...]) for k in ("count", "dropped", *_COUNTS)},
            parts={k: np.asarray(pg[k][...]) for k in ("count", "dropped")},
            stat_arrays={k: sg[k] for k in big},
            part_arrays={k: pg[k] for k in big},
        )


def verify_store(path: str | Path) -> Report:
    """Check the store at ``path``; never raises for a damaged store, reports instead (one
    line per damage, naming the array, the chunk and the fix)."""
    report = Report(str(path))
    try:
        root = _open(upath(path), report)
        if root is None:
            return report
        damage = scan(root, counts=False)
        report.problems += [d.line() for d in damage]
        try:
            _check(report, root)
        except Exception as err:  # noqa: BLE001 - verify reports, it never raises
            if not damage:  # damage explains a failed read; otherwise say what failed
                report.problems.append(
                    f"store: a consistency check could not read it ({_first_line(err)}); "
                    f"collect again into a new output"
                )
    except Exception as err:  # noqa: BLE001 - verify reports, it never raises
        report.problems.append(
            f"store: cannot be read ({_first_line(err)}); collect again into a new output"
        )
    return report


def check_integrity(path: str | Path | zarr.Group) -> list[str]:
    """One line per damage of a collect store (checksums, missing shards, counts against the
    recorded rows, the stored config against its hash), each naming the array, the chunk
    and the fix; empty if intact. For readers (reduce) to refuse damaged inputs; never
    raises for a damaged store."""
    try:
        root = path if isinstance(path, zarr.Group) else zarr.open_group(zarr_store(path), mode="r")
        return [d.line() for d in scan(root)]
    except Exception as err:  # noqa: BLE001 - a store that does not open is damage too
        return [f"store: cannot be read ({_first_line(err)}); collect again into a new output"]


def _check(report: Report, root: zarr.Group) -> None:
    """The consistency checks of :func:`verify_store` (module docstring)."""
    attrs = root.attrs.asdict()
    families = [f for f in attrs["config"].get("families", []) if names.stats_group(f) in root]
    keep_parts = bool(attrs["config"].get("keep_parts", False))
    units = root[names.PLAN].attrs.asdict().get("work_units", [])
    done = manifest(root)
    conds = _conditions(units)
    merged = set(done.get("merged", []))
    _check_manifest(report, units, done, conds)
    fams = [_Family.read(root, f) for f in families]
    for fam in fams:
        _check_edges(report, root, fam, done.get("edges", {}))
        _check_parts(report, fam, units, done["parts"], merged, keep_parts)
        for key in sorted(merged & set(conds)):
            if applies(fam.name, names.parse_condition_key(key)[1]):
                _check_condition(report, fam, key, conds[key], done["parts"])
    _check_families(report, fams, merged & set(conds))
    pending = sorted(set(conds) - merged)
    if pending and "finished" in attrs:
        report.problems.append(
            f"manifest: the store is marked finished but {len(pending)} planned condition(s) "
            f"are not merged ({', '.join(pending[:5])}); resume it with `crossmodal collect`"
        )
    elif pending:
        report.notes.append(
            f"incomplete: {len(conds) - len(pending)} of {len(conds)} conditions merged; "
            "resume it with `crossmodal collect CONFIG` (its own config)"
        )
    report.checked = {
        "parts": len(done["parts"]),
        "conditions": len(merged & set(conds)),
        "families": len(families),
    }


# ------------------------------------------------------------------------------ checks


def _open(path: Path, report: Report) -> zarr.Group | None:
    if not (path / "zarr.json").is_file():
        report.problems.append(
            f"store: {str(path)!r} is not a Zarr store (no zarr.json); pass a `crossmodal "
            "collect` output"
        )
        return None
    try:
        root = zarr.open_group(zarr_store(path), mode="r")
    except (OSError, ValueError, json.JSONDecodeError) as err:
        report.problems.append(f"store: cannot be opened ({_first_line(err)})")
        return None
    attrs = root.attrs.asdict()
    version = attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        report.problems.append(
            f"layout_version: must be one of [{LAYOUT_VERSION}], got {version!r}; this "
            "crossmodal cannot read it: collect it again into a new output"
        )
        return None
    schema = load_schema("store")
    for err in jsonschema.Draft202012Validator(schema).iter_errors(attrs):
        where = "/".join(map(str, err.absolute_path)) or "attrs"
        report.problems.append(f"attrs {where}: {err.message}")
    for group in (names.PLAN, names.MANIFEST):
        if group not in root:
            report.problems.append(f"{group}: group missing; the store was not fully created")
    if report.problems:
        return None
    return root


def _conditions(units: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for w in units:
        out.setdefault(names.condition_key(w["task"], w["modality"], w["language"]), []).append(w)
    return out


def _check_manifest(
    report: Report,
    units: Sequence[Mapping[str, Any]],
    done: Mapping[str, Any],
    conds: Mapping[str, Sequence[Mapping[str, Any]]],
) -> None:
    """Done parts are planned units; merged conditions are planned and have every part."""
    for key, summary in done["parts"].items():
        if not key.isdigit() or int(key) >= len(units):
            report.problems.append(f"manifest part {key}: not a work unit of the plan")
            continue
        w = units[int(key)]
        want = f"{names.condition_key(w['task'], w['modality'], w['language'])}/{w['shard']}"
        if summary.get("key") != want:
            report.problems.append(
                f"manifest part {key}: records work unit {summary.get('key')!r}, the plan "
                f"says {want!r}"
            )
        n = summary.get("n_examples", 0) + summary.get("n_skipped", 0)
        if n != len(w["ids"]):
            report.problems.append(
                f"manifest part {key}: n_examples + n_skipped = {n}, the plan has "
                f"{len(w['ids'])} example ids"
            )
    for key in done.get("merged", []):
        if key not in conds:
            report.problems.append(f"manifest merged {key}: not a condition of the plan")
            continue
        missing = [str(w["index"]) for w in conds[key] if str(w["index"]) not in done["parts"]]
        if missing:
            report.problems.append(
                f"manifest merged {key}: parts {missing} are not done; they were merged "
                "before they were written"
            )


def _check_edges(report: Report, root: zarr.Group, fam: _Family, pilots: Mapping[str, Any]) -> None:
    family = fam.name
    arr = root[names.edges_array(family)]
    tasks, modalities = fam.labels["task"], fam.labels["modality"]
    for key in pilots:
        task, modality = names.parse_condition_key(key)
        if not applies(family, modality) or task not in tasks or modality not in modalities:
            continue
        t, m = tasks.index(task), modalities.index(modality)
        for si, pi in np.ndindex(*arr.shape[2:4]):
            edges = np.asarray(arr[t, m, si, pi])
            if not np.isfinite(edges).all() or not (np.diff(edges, axis=-1) > 0).all():
                unsorted = ~(np.diff(edges, axis=-1) > 0).all(-1)
                bad = int((~np.isfinite(edges).all(-1) | unsorted).sum())
                report.problems.append(
                    f"{names.edges_group(family)}[{task}, {modality}, step {si}, pooling {pi}]: {bad} "
                    "unit(s) have non-finite or non-increasing edges"
                )


def _check_parts(
    report: Report,
    fam: _Family,
    units: Sequence[Mapping[str, Any]],
    parts: Mapping[str, Mapping[str, Any]],
    merged: set[str],
    keep_parts: bool,
) -> None:
    """Each done part's counts match its recorded rows; kept shards are internally sound."""
    count, dropped = fam.parts["count"], fam.parts["dropped"]  # [part, step, pooling]
    kept = []
    for key, summary in parts.items():
        if not key.isdigit() or int(key) >= len(units):
            continue
        p, w = int(key), units[int(key)]
        if not applies(fam.name, w["modality"]):
            continue
        rows = np.asarray(summary.get("n_rows", []), dtype=np.int64)
        got = count[p] + dropped[p]
        if rows.shape != got.shape[:1] or (got != rows[:, None]).any():
            report.problems.append(
                f"{names.parts_group(fam.name)} part {p} ({summary.get('key')}): count + dropped "
                f"{got.T.tolist()} per pooling and step, the manifest recorded n_rows "
                f"{rows.tolist()}; the part was lost or written twice: delete it from the "
                "manifest and resume"
            )
        elif (
            keep_parts or names.condition_key(w["task"], w["modality"], w["language"]) not in merged
        ):
            kept.append(p)  # else the driver deleted its shards after merging
    for a, b in _runs(sorted(kept)):  # contiguous parts: one read per unit block
        _check_region(
            report,
            fam.part_arrays,
            (slice(a, b),),
            count[a:b],
            lambda i, a=a: f"{names.parts_group(fam.name)} part {a + i[0]}",
        )


def _check_condition(
    report: Report,
    fam: _Family,
    key: str,
    units: Sequence[Mapping[str, Any]],
    parts: Mapping[str, Mapping[str, Any]],
) -> None:
    """A merged condition against the sum of its parts, across steps, and per unit."""
    summaries = [parts[str(w["index"])] for w in units if str(w["index"]) in parts]
    at = _at(fam.labels, key)
    where = f"{names.stats_group(fam.name)}[{key}]"
    for name in _COUNTS:
        want = np.sum([s.get(name, 0) for s in summaries], axis=0)
        got = fam.stats[name][at]
        if np.shape(want) != got.shape or (got != want).any():
            report.problems.append(
                f"{where} {name}: {got.tolist()}, its parts' manifest entries sum to "
                f"{np.asarray(want).tolist()}"
            )
    count, dropped = fam.stats["count"][at], fam.stats["dropped"][at]
    part_sum = sum(fam.parts["count"][w["index"]] for w in units)
    if (count != part_sum).any():
        report.problems.append(
            f"{where} count: {count.T.tolist()}, its parts' counts sum to "
            f"{np.asarray(part_sum).T.tolist()}; a part was merged twice or lost"
        )
    n_rows = fam.stats["n_rows"][at]
    if (count + dropped != n_rows[:, None]).any():
        report.problems.append(
            f"{where}: count + dropped {(count + dropped).T.tolist()} != n_rows {n_rows.tolist()}"
        )
    order = np.argsort(fam.steps)
    if (np.diff(n_rows[order]) > 0).any():
        report.problems.append(
            f"{where} n_rows: {n_rows[order].tolist()} grows with the step "
            f"{fam.steps[order].tolist()}; an example cannot reach a step after its output ended"
        )
    _check_region(report, fam.stat_arrays, at, count, lambda _: where)


def _check_region(
    report: Report,
    arrays: Mapping[str, zarr.Array],
    at: tuple[int | slice, ...],
    count: np.ndarray,
    where: Callable[[tuple[int, ...]], str],
) -> None:
    """``arrays[at]`` over [..., step, pooling, unit]: each unit's histogram sums to its
    ``count[..., step, pooling]``; moments are finite (m2 >= 0, min <= max) where the count
    is > 0. Reads one unit block of the whole region at a time; ``where(lead index)`` names
    a region for the messages."""
    n_units = arrays["mean"].shape[-1]
    block = arrays["mean"].chunks[-1]  # one unit block: the arrays' chunk
    bad_hist = np.zeros(count.shape, dtype=np.int64)
    bad_moments = np.zeros(count.shape, dtype=np.int64)
    for start in range(0, n_units, block):
        sl = (*at, slice(None), slice(None), slice(start, min(start + block, n_units)))
        hist = np.asarray(arrays["hist"][sl], dtype=np.int64)  # [..., step, pooling, unit, bin]
        bad_hist += (hist.sum(-1) != count[..., None]).sum(-1)
        m = {k: np.asarray(arrays[k][sl]) for k in MOMENTS}  # [..., step, pooling, unit]
        ok = np.logical_and.reduce([np.isfinite(v) for v in m.values()])
        ok &= (m["m2"] >= 0) & (m["min"] <= m["max"])
        bad_moments += ((~ok) & (count[..., None] > 0)).sum(-1)
    for idx in map(tuple, np.argwhere(bad_hist | bad_moments)):
        lead, c = f"{where(idx[:-2])} step {idx[-2]} pooling {idx[-1]}", int(count[idx])
        if bad_hist[idx]:
            report.problems.append(
                f"{lead}: {bad_hist[idx]} of {n_units} unit histograms do not sum to count {c}"
            )
        if bad_moments[idx]:
            report.problems.append(
                f"{lead}: {bad_moments[idx]} of {n_units} units have NaN/Inf or inconsistent "
                f"moments (m2 < 0 or min > max) with count {c}"
            )


def _check_families(report: Report, fams: Sequence[_Family], merged: set[str]) -> None:
    """Every family measured on a condition saw the same rows."""
    for key in sorted(merged):
        modality = names.parse_condition_key(key)[1]
        counts = {
            f.name: f.stats["count"][_at(f.labels, key)] for f in fams if applies(f.name, modality)
        }
        first = next(iter(counts.values()), None)
        if any((c != first).any() for c in counts.values()):
            shown = {f: c.T.tolist() for f, c in counts.items()}
            report.problems.append(f"stats[{key}] count differs across families: {shown}")


# ------------------------------------------------------------------------------ helpers


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ints as ``[start, stop)`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _at(labels: Labels, key: str) -> tuple[int, int, int]:
    """Indices of condition ``task/modality/language``."""
    task, modality, language = names.parse_condition_key(key)
    return (
        labels["task"].index(task),
        labels["modality"].index(modality),
        labels["language"].index(language),
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
