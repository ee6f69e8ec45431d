"""Reduce driver memory in the sets pass (docs/benchmarks.md, "Reduce driver memory at the
real shapes"): the sets pass of a reduced store run alone, on a copy of the store, with the
resident memory sampled every 50 ms and its peak reported per step of the pass.

    PYTHONPATH=. python tests/bench_sets_memory.py results/large-shapes.zarr

The store must have been reduced (its exact group is reused; the selection plans are made
again from its selectivity, with the parameters its sets pass recorded). The copy leaves out
``edges`` and ``parts`` (the pass reads neither) and goes to a temporary folder that is
deleted afterwards; the store itself is only read.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import zarr

import crossmodal.reduce.driver as driver
import crossmodal.reduce.fidelity as fidelity
from crossmodal.reduce.exact import exact_plan
from crossmodal.store.results import Results

BIG = ("edges", "parts")
"""Top-level groups of the store the sets pass does not read: not copied."""
PHASE = ["start"]
PEAKS: dict[str, int] = {}
STEPS = {
    driver: ("final_sets", "sets_table", "exact_views", "write_analyses", "write_fidelity"),
    fidelity: ("write_exemplars", "_pooling_stability"),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sample() -> None:
    while True:
        PEAKS[PHASE[0]] = max(PEAKS.get(PHASE[0], 0), _rss())
        time.sleep(0.05)


def _timed(module: object, name: str) -> None:
    """Replace ``module.name`` by a wrapper that names the phase while it runs."""
    fn = getattr(module, name, None)
    if fn is None:  # an older version of the pass (the before measurement)
        return

    def run(*args: object, **kwargs: object) -> object:
        outer, PHASE[0] = PHASE[0], name
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            print(f"{name}: {time.time() - start:.1f} s", flush=True)
            PHASE[0] = outer

    setattr(module, name, run)


def sets_pass(path: str) -> None:
    """Plans, then the driver's sets pass, on the store at ``path`` (a copy)."""
    root = zarr.open_group(path, mode="r+")
    params = root.attrs["reduce"]["sets"]["decoder"]
    job = driver.ReduceJob(root, path, params["k"], params["scopes"], params["widen"], 0.25, False)
    job.every_unit = job.params["every_unit"] = bool(params.get("every_unit", False))
    res = Results(Path(path))
    job.views = {f: {p: res.selectivity(f, p) for p in job.config.poolings} for f in job.families}
    job.pending = list(job.families)
    PHASE[0] = "plans"
    job.plans = {
        f: exact_plan(job.views[f], job.k, job.scopes, job.widen, job.every_unit)
        for f in job.pending
    }
    plans = [ds for f in job.pending for ds in job.plans[f].plans.values()]
    widest = [int(ds["candidate_count"].max()) for ds in plans]
    rows = sum(ds["candidate_count"].size for ds in plans)
    print(
        f"selection plans: {sum(ds.nbytes for ds in plans) / 1e9:.2f} GB; "
        f"{sum(ds.sizes['entry'] for ds in plans):,} candidates in {rows:,} rows; the widest "
        f"row of each plan: {widest}",
        flush=True,
    )
    del plans
    PHASE[0] = "sets (other)"
    print(f"resident before the sets pass: {_rss() / 1e9:.2f} GB", flush=True)
    start = time.time()
    job.sets(Path(path + "-csv"), False)
    print(f"sets pass: {time.time() - start:.1f} s")


def main(store: str) -> None:
    for module, names in STEPS.items():
        for name in names:
            _timed(module, name)
    threading.Thread(target=_sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        copy = str(Path(tmp) / Path(store).name)
        top = os.path.abspath(store)
        skip = lambda d, names: [n for n in names if os.path.abspath(d) == top and n in BIG]  # noqa: E731
        shutil.copytree(store, copy, ignore=skip)
        sets_pass(copy)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"driver peak RSS (ru_maxrss): {peak / 1e9:.2f} GB")
    for phase, rss in PEAKS.items():
        print(f"  peak in {phase}: {rss / 1e9:.2f} GB")


if __name__ == "__main__":
    main(sys.argv[1])
