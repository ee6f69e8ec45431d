"""Compare two crossmodal output trees value by value (stores, CSVs, Parquet, report).

    python tests/compare_runs.py BEFORE_RESULTS AFTER_RESULTS   (two `results/` folders of make demo)

Volatile fields (timestamps, durations, hosts, pids, absolute roots) are ignored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

VOLATILE = {
    "created",
    "finished",
    "seconds",
    "provenance",
    "host",
    "pid",
    "started",
    "start",
    "time",
    "mean_ap_width_seconds",
}


def clean(value, roots):
    if isinstance(value, dict):
        return {k: clean(v, roots) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [clean(v, roots) for v in value]
    if isinstance(value, str):
        for r in roots:
            value = value.replace(r, "<ROOT>")
    return value


def walk(group, prefix=""):
    for name, node in sorted(group.members()):
        path = f"{prefix}{name}"
        yield path, node
        if isinstance(node, zarr.Group):
            yield from walk(node, path + "/")


def compare_store(a: Path, b: Path, roots) -> list[str]:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    problems, n_arrays, n_values = [], 0, 0
    if clean(dict(ga.attrs), roots) != clean(dict(gb.attrs), roots):
        problems.append("root attrs differ")
    ma, mb = dict(walk(ga)), dict(walk(gb))
    if set(ma) != set(mb):
        problems.append(
            f"members differ: only before {sorted(set(ma) - set(mb))[:10]}, only after {sorted(set(mb) - set(ma))[:10]}"
        )
    for path in sorted(set(ma) & set(mb)):
        x, y = ma[path], mb[path]
        if clean(dict(x.attrs), roots) != clean(dict(y.attrs), roots):
            problems.append(f"attrs of {path} differ")
        if isinstance(x, zarr.Array):
            n_arrays += 1
            if (
                x.shape != y.shape
                or str(x.dtype) != str(y.dtype)
                or x.metadata.dimension_names != y.metadata.dimension_names
            ):
                problems.append(
                    f"{path}: shape/dtype/dims differ {x.shape} {y.shape} {x.dtype} {y.dtype}"
                )
                continue
            if x.chunks != y.chunks:
                problems.append(f"{path}: chunks differ {x.chunks} {y.chunks}")
            u, v = x[...], y[...]
            n_values += np.size(u)
            if u.dtype.kind in "fc":
                same = np.array_equal(u, v, equal_nan=True)
            else:
                same = [str(s) for s in np.ravel(u)] == [str(s) for s in np.ravel(v)]
            if not same:
                problems.append(f"{path}: values differ")
    print(f"store: {n_arrays} arrays, {n_values:,} values compared")
    return problems


def compare_files(a: Path, b: Path, pattern: str, roots) -> list[str]:
    fa = sorted(p.relative_to(a) for p in a.rglob(pattern))
    fb = sorted(p.relative_to(b) for p in b.rglob(pattern))
    problems = (
        [] if fa == fb else [f"{a.name} {pattern}: file lists differ ({len(fa)} vs {len(fb)})"]
    )
    for rel in sorted(set(fa) & set(fb)):
        if pattern.endswith(".parquet"):
            x, y = pd.read_parquet(a / rel), pd.read_parquet(b / rel)
            # cell ids hash the selectivity path, which differs between two output roots
            drop = [c for c in x if c in VOLATILE or c == "cell_id"]
            x, y = x.drop(columns=drop), y.drop(columns=drop)
            keys = list(x.columns)
            x = x.sort_values(keys, na_position="first").reset_index(drop=True)
            y = y.sort_values(keys, na_position="first").reset_index(drop=True)
            if not x.equals(y):
                problems.append(f"{rel}: table differs")
        elif pattern.endswith((".md", ".json", ".csv")):
            tx, ty = (a / rel).read_text(), (b / rel).read_text()
            for r in roots:
                tx, ty = tx.replace(r, "<ROOT>"), ty.replace(r, "<ROOT>")
            if pattern.endswith(".json"):
                tx, ty = (
                    json.dumps(clean(json.loads(tx), roots)),
                    json.dumps(clean(json.loads(ty), roots)),
                )
            if tx != ty:
                problems.append(f"{rel}: text differs")
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            problems.append(f"{rel}: bytes differ")
    print(f"{a.name} {pattern}: {len(set(fa) & set(fb))} files compared")
    return problems


def main(before: str, after: str) -> int:
    a, b = Path(before).resolve(), Path(after).resolve()
    roots = [str(a.parent), str(b.parent), str(a), str(b)]
    roots.sort(key=len, reverse=True)
    problems = compare_store(a / "organism.zarr", b / "organism.zarr", roots)
    problems += compare_files(a / "organism-sets", b / "organism-sets", "*.parquet", roots)
    problems += compare_files(a / "steer-organism", b / "steer-organism", "*ts.parquet", roots)
    problems += compare_files(a / "steer-organism", b / "steer-organism", "summary.parquet", roots)
    problems += compare_files(a / "organism-report", b / "organism-report", "*.md", roots)
    problems += compare_files(a / "organism-report", b / "organism-report", "*.png", roots)
    for p in problems:
        print("DIFF", p)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
