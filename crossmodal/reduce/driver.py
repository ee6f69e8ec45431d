"""The reduce job: selectivity, exact selected sets, roles and overlap, into the collect store.

Passes, each recorded by the driver in the root attribute ``reduce`` and skipped on re-run:

1. ``selectivity``: per (task, modality, step, pooling) and unit block (the stats' chunk), a
   job reads that block of every language's histograms and writes AP, AUROC (with guaranteed
   bounds), on_p50, on_p90, off_mean of every language: one whole shard per array
   (platform.md: a shard has one writer). Ray tasks run a few jobs each (a tiny store is one
   task); memory per task: languages x block x bins.
2. ``exact``: :func:`crossmodal.reduce.selection.plan_exact` over the AP intervals (every pooling and
   scope); :class:`ExactWorker` actors re-run the work units of each (task, modality) with
   candidates, keeping per-example values of the candidates only; when all of a (task,
   modality)'s work units are back the driver writes their exact AP to ``exact/<family>`` and
   marks that (task, modality) done. A unit is re-collected only for the (step, pooling) where
   it is a candidate. Memory: candidates x examples of the open (task, modality) pairs.
3. ``sets``: :func:`crossmodal.reduce.selection.finalize_selection` -> ``sets/<family>`` (the sets
   exact AP selects), CSVs with the reference's expertise columns, ``roles/<family>``,
   ``overlap/<family>/{sets, sets_by_layer, spearman}``. Redone when k, scopes or widen change.

4. ``modality``: v1 modality-selective units, :func:`crossmodal.reduce.modality.modality_pass`
   (speech vs text AP from histograms with edges shared by the modalities, on the driver) ->
   ``modality/<family>`` for the decoder families. Redone when k changes.

Group layout: :mod:`crossmodal.store.results`. Only the driver creates arrays and writes attrs.
Activation concentration (Gini) needs no pass: collect merges it per condition into
``concentration/<family>``; :meth:`crossmodal.store.results.Results.concentration` reads it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from tqdm import tqdm

from crossmodal.collect.driver import RAY_ENV, applies
from crossmodal.collect.config import CollectConfig, from_dict
from crossmodal.store.lock import OutputLock
from crossmodal.reduce.modality import FAMILIES as MODALITY_FAMILIES
from crossmodal.reduce.modality import modality_pass
from crossmodal.collect.plan import Condition, WorkUnit
from crossmodal.store.results import Results, default_pooling, group_path, unicode
from crossmodal.reduce.selection import (
    GROUPS,
    check_k,
    exact_units,
    expand_scopes,
    finalize_selection,
    parse_scope,
    plan_exact,
    sets_frame,
)
from crossmodal.stats.finalize import exact_selectivity, selectivity_from_stats
from crossmodal.stats.running import ExactValues, UnitStats
from crossmodal.store.layout import COMPRESSORS, LAYOUT_VERSION, StoreError, jsonable, unit_chunk

SEL_VARS = ("ap", "ap_lo", "ap_hi", "auroc", "auroc_lo", "auroc_hi", "on_p50", "on_p90", "off_mean")
COND = ("task", "modality", "step", "language")
UNIT_COORDS = ("layer", "submodule", "site", "feature")
_SUBMODULES = ("self_attn", "cross_attn", "ffn")  # selection's groups; the rest is "other"
_TASK_ELEMS = 1 << 25
Candidates = Mapping[str, Mapping[str, Mapping[tuple[int, int], np.ndarray]]]
"""``{family: {"task/modality": {(step index, pooling index): sorted unit ids}}}``."""


def _put(group: zarr.Group, name: str, data: Any, dims: Sequence[str], **attrs: Any) -> None:
    data = np.asarray(data)
    dtype = str if data.dtype.kind in "UOT" else data.dtype
    arr = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=list(dims),
                             attributes=attrs, overwrite=True)  # fmt: skip
    if data.size:
        arr[...] = data


def write_dataset(store: str | Path, path: str, ds: xr.Dataset | xr.DataArray) -> None:
    """Replace group ``path`` with ``ds`` (driver only): dimension names, non-index coords
    listed in each variable's ``coordinates`` attr, variable-length strings, ``ds.attrs`` as
    the group's attrs (variable attrs are not kept)."""
    if isinstance(ds, xr.DataArray):  # a named DataArray: its attrs become the group's
        ds = ds.to_dataset().assign_attrs(ds.attrs)
    g = zarr.open_group(str(store), path=path, mode="w", zarr_format=3)
    g.attrs.update(jsonable(ds.attrs))
    aux = [c for c in ds.coords if c not in ds.dims]
    for name, var in ds.variables.items():
        coords = [c for c in aux if name in ds.data_vars and set(ds[c].dims) <= set(var.dims)]
        _put(g, str(name), var.values, [str(d) for d in var.dims],
             **({"coordinates": " ".join(map(str, coords))} if coords else {}))  # fmt: skip


# ----------------------------------------------------------------------------- pass 1


def _labels(root: zarr.Group, family: str) -> dict[str, np.ndarray]:
    sg, ug = root[f"stats/{family}"], root[f"units/{family}"]
    site = ug["unit_site"][...]
    sub = unicode(ug["site_submodule"][...])[site]
    return {"task": sg["task"][...], "modality": sg["modality"][...], "step": sg["step"][...],
            "language": sg["language"][...], "unit": ug["unit"][...],
            "layer": ug["unit_layer"][...].astype(np.int32),
            "submodule": np.where(np.isin(sub, _SUBMODULES), sub, "other"),
            "site": unicode(ug["site_name"][...])[site],
            "feature": ug["unit_feature"][...]}  # fmt: skip


def create_selectivity(root: zarr.Group, store: str, family: str, poolings: Sequence[str],
                       block: int) -> None:  # fmt: skip
    """Every pooling's selectivity group: NaN-filled arrays, shards ``[1, 1, 1, language,
    block]`` (one reduce task's region) of chunks ``[1, 1, 1, 1, block]``, and labels."""
    lab = _labels(root, family)
    shape = tuple(len(lab[d]) for d in (*COND, "unit"))
    # The default pooling's group first: mode "w" wipes its subgroups (the other poolings).
    for pooling in sorted(poolings, key=lambda p: p != default_pooling(poolings)):
        path = group_path("selectivity", family, pooling, poolings)
        g = zarr.open_group(store, path=path, mode="w", zarr_format=3)
        g.attrs.update({"pooling": pooling, "poolings": list(poolings), "estimate": "expected"})
        for name in SEL_VARS:
            g.create_array(name, shape=shape, dtype="float64", fill_value=np.nan,
                           chunks=(1, 1, 1, 1, block), shards=(1, 1, 1, shape[3], block),
                           compressors=COMPRESSORS, dimension_names=[*COND, "unit"],
                           attributes={"coordinates": " ".join(UNIT_COORDS)})  # fmt: skip
        for name, values in lab.items():
            _put(g, name, values, ["unit" if name in ("unit", *UNIT_COORDS) else name])


def reduce_blocks(store: str, family: str, paths: Sequence[str],
                  jobs: Sequence[tuple[tuple[int, int, int, int], int, int]]) -> list[float]:  # fmt: skip
    """Selectivity of units ``start:stop`` for every language of ``at`` = (task, modality,
    step, pooling) indices, per job; writes ``paths[pooling]``'s ``[t, m, s, :, start:stop]``
    of every variable (a whole shard). Returns the widest AP interval and their sum, count."""
    sg = zarr.open_group(store, path=f"stats/{family}", mode="r")
    edges_arr = zarr.open_array(store, path=f"edges/{family}/edges", mode="r")
    widths = [0.0, 0.0, 0.0]
    for (t, m, s, p), start, stop in jobs:
        count, dropped = sg["count"][t, m, :, s, p], sg["dropped"][t, m, :, s, p]
        sl = slice(start, stop)
        edges = torch.from_numpy(np.asarray(edges_arr[t, m, s, p, sl]))
        arrays = {k: sg[k][t, m, :, s, p, sl] for k in ("mean", "m2", "min", "max", "hist")}
        stats = {
            int(lang): UnitStats(
                edges=edges,
                count=torch.tensor(int(count[lang])),
                dropped=torch.tensor(int(dropped[lang])),
                **{k: torch.from_numpy(np.ascontiguousarray(v[lang])) for k, v in arrays.items()},
            )  # fmt: skip
            for lang in np.flatnonzero(count > 0)
        }
        res = np.full((len(SEL_VARS), count.size, stop - start), np.nan)
        for lang, sel in selectivity_from_stats(stats).items():
            res[:, lang] = [getattr(sel, name).numpy() for name in SEL_VARS]
        g = zarr.open_group(store, path=paths[p], mode="r+")
        for i, name in enumerate(SEL_VARS):
            g[name][t, m, s, :, sl] = res[i]
        width = (res[2] - res[1])[np.isfinite(res[2] - res[1])]
        widths = [
            max(widths[0], width.max(initial=0.0)),
            widths[1] + width.sum(),
            widths[2] + width.size,
        ]
    return [float(w) for w in widths]


def selectivity_pass(ray_start: Callable[[], Any], root: zarr.Group, store: str, family: str,
                     config: CollectConfig, num_cpus: float, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Pass 1 for one family: create the groups, run the block tasks, write n_pos / n_neg."""
    n_units = root[f"units/{family}/unit"].shape[0]
    block, poolings = unit_chunk(n_units, config.n_bins), config.poolings
    create_selectivity(root, store, family, poolings, block)
    count = root[f"stats/{family}/count"][...]  # [task, modality, language, step, pooling]
    conds = [at for at in np.ndindex(count.shape[0], count.shape[1], count.shape[3], count.shape[4])
             if (count[at[0], at[1], :, at[2], at[3]] > 0).sum() >= 2]  # fmt: skip
    jobs = [(at, a, min(a + block, n_units)) for at in conds for a in range(0, n_units, block)]
    # Tasks of >= _TASK_ELEMS histogram cells: a tiny store is one task, not many worker starts.
    per = max(1, _TASK_ELEMS // (block * count.shape[2] * (config.n_bins + 2)))
    out: list[list[float]] = []
    if jobs:
        ray = ray_start()
        task = ray.remote(num_cpus=num_cpus)(reduce_blocks)
        paths = [group_path("selectivity", family, q, poolings) for q in poolings]
        refs = [
            task.remote(store, family, paths, jobs[i : i + per]) for i in range(0, len(jobs), per)
        ]
        with tqdm(total=len(refs), desc=f"selectivity {family}", disable=not progress) as bar:
            while refs:
                done, refs = ray.wait(refs, num_returns=1)
                out += ray.get(done)
                bar.update(len(done))
    for q, pooling in enumerate(poolings):
        g = zarr.open_group(store, path=group_path("selectivity", family, pooling, poolings))
        c = count[..., q].transpose(0, 1, 3, 2)  # -> [task, modality, step, language]
        ok = (c > 0).sum(-1, keepdims=True) >= 2
        _put(g, "n_pos", np.where(ok, c, 0), COND)
        _put(g, "n_neg", np.where(ok & (c > 0), c.sum(-1, keepdims=True) - c, 0), COND)
    return {"blocks": len(jobs), "block": block, "finished": _now(),
            "max_ap_width": max([o[0] for o in out], default=0.0),
            "mean_ap_width": sum(o[1] for o in out) / max(1.0, sum(o[2] for o in out))}  # fmt: skip


# ----------------------------------------------------------------------------- pass 2


class ExactWorker:
    """One model replica: ``worker(unit)`` re-runs a work unit exactly as collect did and
    returns the per-example values of the candidate units only (style lesson 10).

    Args:
        config: the store's collect config.
        store: the store (the :class:`~crossmodal.collect.driver.Collector` reads nothing from it
            here, it only loads the model and the data the way collect did).
        candidates: ``{family: {"task/modality": {(step_i, pooling_i): sorted unit ids}}}``.
    """

    def __init__(self, config: CollectConfig, store: str, candidates: Candidates) -> None:
        from crossmodal.collect.driver import Collector

        self.collector = Collector(config, store)
        self.candidates = candidates

    def __call__(self, unit: WorkUnit) -> dict[str, Any]:
        col, cond, cfg = self.collector, unit.condition, self.collector.config
        key = f"{cond.task}/{cond.modality}"
        keep = {
            (f, si, pi): ExactValues.empty(
                col.slices[f].stop - col.slices[f].start, np.array(ids), col.device
            )  # fmt: skip
            for f, by in self.candidates.items()
            if applies(f, cond.modality)
            for (si, pi), ids in by.get(key, {}).items()
        }
        records, _ = col.load_records(cond.source, cond.modality, unit.example_ids)  # collect's data
        for res in col._capture(records, cond.modality, cond.target) if keep else ():
            for (f, si, pi), ex in keep.items():
                v = res.values[(cfg.poolings[pi], cfg.steps[si])]
                if len(v):
                    ex.update(v[:, col.slices[f]])
        values = {k: ex.values.cpu().numpy() for k, ex in keep.items()}
        return {"part": unit.index, "key": key, "language": cond.language, "values": values}


def candidates(views: Mapping[str, xr.Dataset], k: int, scopes: Sequence[str], widen: float
               ) -> tuple[dict[tuple[str, str], xr.Dataset], dict[str, dict[tuple, np.ndarray]]]:  # fmt: skip
    """Plans per (pooling, scope), and the union of their candidates per "task/modality" and
    (step index, pooling index): a unit is re-collected only where it is a candidate."""
    plans = {(p, s): plan_exact(ds, k=k, group=parse_scope(s)[0], layer=parse_scope(s)[1],
                                widen=widen)
             for p, ds in views.items() for s in scopes}  # fmt: skip
    union: dict[str, dict[tuple, list[np.ndarray]]] = {}
    for (pooling, _), plan in plans.items():
        steps, pi = list(plan["step"].values), list(views).index(pooling)
        for (task, modality, step), ids in exact_units(plan, ("task", "modality", "step")).items():
            if ids.size:
                at = (steps.index(step), pi)
                union.setdefault(f"{task}/{modality}", {}).setdefault(at, []).append(ids)
    cands = {key: {at: np.unique(np.concatenate(v)) for at, v in by.items()}
             for key, by in union.items()}  # fmt: skip
    return plans, cands


def work_units(root: zarr.Group) -> list[WorkUnit]:
    """The store's plan, as the collect job ran it (ids from the plan attrs)."""
    out = []
    for w in root["plan"].attrs["work_units"]:
        cond = Condition(w["task"], w["modality"], w["language"], w["source"], w["target"])
        out.append(WorkUnit(w["index"], cond, w["shard"], len(w["ids"]), tuple(w["ids"])))
    return out


def create_exact(store: str, family: str, cands: Mapping[str, Mapping[tuple, np.ndarray]],
                 lab: Mapping[str, Any], poolings: Sequence[str]) -> np.ndarray:  # fmt: skip
    """``exact/<family>``: ap/auroc ``[pooling, task, modality, step, language, unit]``
    over the union of candidates (NaN where a pair did not measure a unit); returns it."""
    ids = np.unique(np.concatenate([np.zeros(0, np.int64), *(v for by in cands.values()
                                                              for v in by.values())]))  # fmt: skip
    shape = (len(poolings), *(len(lab[d]) for d in COND), ids.size)
    g = zarr.open_group(store, path=f"exact/{family}", mode="w", zarr_format=3)
    for name in ("ap", "auroc"):
        g.create_array(name, shape=shape, dtype="float64", fill_value=np.nan,
                       chunks=(1, 1, 1, *shape[3:5], max(1, ids.size)),
                       dimension_names=["pooling", *COND, "unit"])  # fmt: skip
    for name, values in {"pooling": list(poolings), **{d: lab[d] for d in COND}}.items():
        _put(g, name, values, [name])
    _put(g, "unit", ids, ["unit"])
    return ids


def write_exact(store: str, family: str, key: str, rows: Mapping[str, Mapping[tuple, list]],
                cands: Mapping[tuple, np.ndarray], union: np.ndarray, lab: Mapping[str, Any]
                ) -> None:  # fmt: skip
    """Exact AP/AUROC of one (task, modality) from its languages' per-example values."""
    g = zarr.open_group(store, path=f"exact/{family}", mode="r+")
    t, m = (
        list(lab[d]).index(v) for d, v in zip(("task", "modality"), key.split("/"), strict=True)
    )
    shape = (g["ap"].shape[0], len(lab["step"]), len(lab["language"]), union.size)
    ap, auc = np.full(shape, np.nan), np.full(shape, np.nan)
    for (si, pi), ids in cands.items():
        ex = {lang: ExactValues(torch.as_tensor(ids), torch.from_numpy(np.concatenate(v)),
                                torch.tensor(0))
              for lang, by in rows.items() if (v := by.get((family, si, pi)))}  # fmt: skip
        ex = {lang: e for lang, e in ex.items() if e.n}
        pos = np.searchsorted(union, ids)
        for lang, sel in (exact_selectivity(ex) if len(ex) >= 2 else {}).items():
            li = list(lab["language"]).index(lang)
            ap[pi, si, li, pos], auc[pi, si, li, pos] = sel.ap.numpy(), sel.auroc.numpy()
    for pi in range(shape[0]):
        g["ap"][pi, t, m], g["auroc"][pi, t, m] = ap[pi], auc[pi]


def exact_pass(ray_start: Callable[[], Any], root: zarr.Group, store: str,
               config: CollectConfig, cands: Candidates,
               unions: Mapping[str, np.ndarray], labels: Mapping[str, Mapping[str, Any]],
               mark: Callable[[str], None], done: set[str], progress: bool) -> int:  # fmt: skip
    """Pass 2 over every family at once (one capture serves all); returns work units run."""
    keys = {key for by in cands.values() for key in by} - done
    units = [w for w in work_units(root) if f"{w.condition.task}/{w.condition.modality}" in keys]
    left = {key: sum(1 for w in units if w.key.startswith(key + "/")) for key in keys}
    for key in [k for k, n in left.items() if n == 0]:
        mark(key)  # candidates but no examples left to re-run: nothing to measure
    if not units:
        return 0
    ray = ray_start()
    from ray.util import ActorPool

    a = config.actors
    remote = ray.remote(num_cpus=a.num_cpus, num_gpus=a.num_gpus, max_restarts=a.max_restarts,
                        max_task_retries=a.max_task_retries)(ExactWorker)  # fmt: skip
    ref = ray.put(dict(cands))
    actors = [remote.remote(config, store, ref) for _ in range(min(a.count, len(units)))]
    acc: dict[str, dict[str, dict[tuple, list]]] = {}
    try:
        pool = ActorPool(actors)
        with tqdm(total=len(units), desc="exact pass", disable=not progress) as bar:
            for res in pool.map_unordered(lambda act, w: act.__call__.remote(w), units):
                by_lang = acc.setdefault(res["key"], {}).setdefault(res["language"], {})
                for k, v in res["values"].items():
                    by_lang.setdefault(k, []).append(v)
                left[res["key"]] -= 1
                bar.update(1)
                if left[res["key"]] == 0:
                    rows = acc.pop(res["key"])
                    for f, by in cands.items():
                        if res["key"] in by:
                            write_exact(store, f, res["key"], rows, by[res["key"]], unions[f],
                                        labels[f])  # fmt: skip
                    mark(res["key"])
    finally:
        for actor in actors:
            ray.kill(actor)
    return len(units)


# ----------------------------------------------------------------------------- pass 3


def final_sets(plans: Mapping[tuple[str, str], xr.Dataset], exact_ap: xr.DataArray,
               poolings: Sequence[str], scopes: Sequence[str]) -> xr.DataArray:  # fmt: skip
    """Exact sets ``[scope, pooling, task, modality, step, language, kind, rank]``."""
    per_scope = []
    for s in scopes:
        per_pool = [finalize_selection(plans[(p, s)], exact_ap.sel(pooling=p, drop=True))
                    for p in poolings]  # fmt: skip
        per_scope.append(xr.concat(per_pool, pd.Index(list(poolings), name="pooling"),
                                   combine_attrs="drop"))  # fmt: skip
    out = xr.concat(per_scope, pd.Index(list(scopes), name="scope"), combine_attrs="drop")
    return out.assign_coords(rank=np.arange(out.sizes["rank"])).transpose("scope", "pooling", ...)


def write_csvs(views: Mapping[str, xr.Dataset], sets: xr.DataArray, dest: Path) -> int:
    """One CSV per set (expertise-file columns, :data:`crossmodal.reduce.selection.CSV_COLUMNS`):
    ``dest/<pooling>/<scope>/<task>_<modality>_step<step>_<language>_<kind>.csv``."""
    n = 0
    cols = ["ap", "on_p50", "on_p90", "off_mean"]
    for pooling, ds in views.items():
        coords = {c: ("unit", ds[c].values) for c in UNIT_COORDS}
        for cond in np.ndindex(*(ds.sizes[d] for d in COND)):
            at = {d: ds[d].values[i] for d, i in zip(COND, cond, strict=True)}
            block = sets.sel(pooling=pooling, **at)
            if not (block >= 0).any():
                continue
            sub = ds[cols].reset_coords(drop=True).sel(at).load().assign_coords(coords)
            for scope in block["scope"].values:
                for kind in block["kind"].values:
                    name = "_".join([str(at["task"]), str(at["modality"]), f"step{at['step']}",
                                     str(at["language"]), str(kind)]) + ".csv"  # fmt: skip
                    path = dest / str(pooling) / str(scope) / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    sets_frame(sub, block.sel(scope=scope), kind=kind).to_csv(path, index=False)
                    n += 1
    return n


def write_analyses(store: str, family: str, views: Mapping[str, xr.Dataset],
                   sets: xr.DataArray, k: int) -> list[str]:  # fmt: skip
    """Roles and overlap groups; returns the groups written (none without paired tasks)."""
    from crossmodal.reduce.overlap import overlap, spearman_matrix
    from crossmodal.reduce.roles import ROLE_TASKS, roles

    written = []
    if set(ROLE_TASKS.values()) <= {str(t) for t in sets["task"].values}:
        write_dataset(store, f"roles/{family}", roles(sets).rename("units"))
        written.append(f"roles/{family}")
    poolings = list(views)
    n_pos = views[poolings[0]]["n_pos"].load()
    has = (n_pos > 0).any(["step", "language"])
    tasks = [str(t) for t in has["task"].values if bool(has.sel(task=t).all())]
    tasks = tasks if {"text", "speech"} <= {str(m) for m in has["modality"].values} else []
    if not tasks:
        return written

    def scoped(p: str, s: str) -> xr.DataArray:
        da = sets.sel(pooling=p, scope=s, task=tasks, drop=True)
        group, layer = parse_scope(s)
        return da.assign_attrs(k=int(k), group=group, layer="all" if layer is None else layer)

    idx = pd.Index(poolings, name="pooling")
    scopes = pd.Index([str(s) for s in sets["scope"].values], name="scope")
    by_set = xr.concat([xr.concat([overlap(scoped(p, s), views[p]) for s in scopes], scopes,
                                  combine_attrs="drop") for p in poolings], idx)  # fmt: skip
    by_layer = xr.concat([overlap(scoped(p, "all"), views[p], by_layer=True) for p in poolings],
                         idx, combine_attrs="drop") if "all" in scopes else None  # fmt: skip
    rho = xr.concat([xr.Dataset({
        "spearman": spearman_matrix(views[p]["ap"].sel(task=tasks)),
        "spearman_by_layer": spearman_matrix(views[p]["ap"].sel(task=tasks), by="layer"),
        "spearman_by_submodule": spearman_matrix(views[p]["ap"].sel(task=tasks), by="submodule"),
    }) for p in poolings], idx)  # fmt: skip
    for name, ds in {"sets": by_set, "sets_by_layer": by_layer, "spearman": rho}.items():
        if ds is not None:
            write_dataset(store, f"overlap/{family}/{name}", ds.assign_attrs(k=int(k)))
            written.append(f"overlap/{family}/{name}")
    return written


# ----------------------------------------------------------------------------- driver


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Callable[[], Any]]:
    """A function that connects to (or starts) Ray on first call; shuts down what it started."""
    started: list[bool] = []

    def start() -> Any:
        import ray

        if not started:
            for key, value in RAY_ENV.items():
                os.environ.setdefault(key, value)
            started.append(not ray.is_initialized())
            if started[0]:
                env = {
                    **RAY_ENV,
                    **{k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ},
                }
                ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env})
        return ray

    try:
        yield start
    finally:
        if started and started[0]:
            import ray

            ray.shutdown()


def open_reducible(store: str | Path) -> zarr.Group:
    """The store, if collect finished every condition of its plan."""
    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"store must be one of [a collect store], got {str(path)!r}; "
                         "run `crossmodal collect CONFIG` first")  # fmt: skip
    root = zarr.open_group(str(path), mode="r+")
    version = root.attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StoreError(f"store layout_version must be one of [{LAYOUT_VERSION}], got "
                         f"{version!r}; collect it again with this version")  # fmt: skip
    wanted = {
        f"{w['task']}/{w['modality']}/{w['language']}" for w in root["plan"].attrs["work_units"]
    }
    merged = set(root["manifest"].attrs["merged"])
    if not wanted <= merged:
        raise StoreError(
            f"store must be one of [finished by collect], got {len(wanted & merged)} of "
            f"{len(wanted)} conditions merged in {str(path)!r}; resume it with "
            "`crossmodal collect CONFIG` (its own config)"
        )
    return root


def _valid_scope(scope: str) -> bool:
    try:
        expand_scopes([scope], [0])
    except ValueError:
        return False
    return True


def run_reduce(
    store: str | Path,
    *,
    k: int = 1000,
    scopes: Sequence[str] = ("all", "attention", "ffn"),
    widen: float = 1e-6,
    csv_dir: str | Path | None = None,
    address: str | None = None,
    num_cpus: float = 0.25,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Reduce a finished collect store in place (resumable; see the module docstring).

    Args:
        k: units per side of each set (top-k, bottom-k; both = their union).
        scopes: unit groups each ranking runs over (:data:`crossmodal.reduce.selection.GROUPS`),
            optionally per layer: ``ffn@3``, or ``all@*`` for one scope per layer.
        widen: margin added to every AP interval before planning the exact pass (covers
            float differences between the collect run and the exact re-run).
        csv_dir: default ``<store parent>/<store name>-sets``.
        address: Ray address (``auto``: a running head); None: in-process or job cluster.
        num_cpus: Ray CPUs per selectivity task (fractional: many tasks per core).

    Returns:
        ``{"store", "ran": [passes run], "skipped": [...], "exact_units", "csv", "seconds"}``.
    """
    start, path = time.time(), str(Path(store).resolve())
    check_k(k)
    bad = [s for s in scopes if not _valid_scope(s)]
    if bad or not scopes:
        raise ValueError(
            f"scopes must be one of {list(GROUPS)}, optionally with '@<layer>' or '@*', got "
            f"{list(scopes)!r}; e.g. all,ffn,all@*"
        )
    root = open_reducible(path)
    with OutputLock(path, "reduce", echo=echo):  # one writer per store (lock.py)
        return _reduce(root, path, k, scopes, widen, csv_dir, address, num_cpus, progress, echo,
                       start)  # fmt: skip


def _reduce(root: zarr.Group, path: str, k: int, scopes: Sequence[str], widen: float,
            csv_dir: str | Path | None, address: str | None, num_cpus: float, progress: bool,
            echo: Callable[[str], None], start: float) -> dict[str, Any]:  # fmt: skip
    """The locked part of :func:`run_reduce`."""
    config = from_dict(root.attrs["config"])
    families = [f for f in config.families if f in root["stats"]]
    labels = {f: _labels(root, f) for f in families}  # unit coordinates, read once
    layers = sorted({int(x) for f in families for x in labels[f]["layer"] if x >= 0})
    scopes = expand_scopes(scopes, layers)  # group@* -> one scope per layer
    bad = [s for s in scopes if (layer := parse_scope(s)[1]) is not None and layer not in layers]
    if bad:
        raise ValueError(f"scopes must be one of [layers {layers}], got {bad!r}; pick a layer")
    state: dict[str, Any] = dict(root.attrs.get("reduce", {}))
    params = {"k": int(k), "scopes": list(scopes), "widen": float(widen)}
    out: dict[str, Any] = {"store": path, "ran": [], "skipped": [], "exact_units": 0, "csv": 0}

    def save(*keys: str, value: Any) -> None:
        node = state
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        root.attrs["reduce"] = jsonable(state)

    with ray_session(address) as ray_start:
        for f in families:
            if f in state.get("selectivity", {}):
                out["skipped"].append(f"selectivity/{f}")
                continue
            summary = selectivity_pass(ray_start, root, path, f, config, num_cpus, progress)
            save("selectivity", f, value=summary)
            out["ran"].append(f"selectivity/{f}")
        res = Results(Path(path))
        views = {f: {p: res.selectivity(f, p) for p in config.poolings} for f in families}
        pending = [f for f in families if state.get("sets", {}).get(f) != params]
        plans = {f: candidates(views[f], k, scopes, widen) for f in pending}
        for f in pending:  # new k/scopes/widen (or first run): other candidates, measure anew
            if state.get("exact", {}).get(f, {}).get("params") != params:
                create_exact(path, f, plans[f][1], labels[f], config.poolings)
                save("exact", f, value={"params": params, "done": []})
        done = set.intersection(*[set(state["exact"][f]["done"]) for f in pending] or [set()])

        def mark(key: str) -> None:
            for f in pending:
                save("exact", f, "done", value=sorted({*state["exact"][f]["done"], key}))

        unions = {f: zarr.open_array(path, path=f"exact/{f}/unit", mode="r")[...] for f in pending}
        cands = {f: plans[f][1] for f in pending}
        out["exact_units"] = exact_pass(ray_start, root, path, config, cands, unions, labels,
                                        mark, done, progress)  # fmt: skip
    csv_root = Path(csv_dir) if csv_dir else Path(path).parent / f"{Path(path).stem}-sets"
    for f in pending:
        sets = final_sets(plans[f][0], res.exact(f)["ap"].load(), config.poolings, scopes)
        sets = sets.rename("units").assign_attrs(**params, exact=True)
        write_dataset(path, f"sets/{f}", sets)
        out["csv"] += write_csvs(views[f], sets, csv_root / f)
        write_analyses(path, f, views[f], sets, k)
        save("sets", f, value=params)
        out["ran"].append(f"sets/{f}")
    out["skipped"] += [f"sets/{f}" for f in families if f not in pending]
    for f in (f for f in families if f in MODALITY_FAMILIES):
        if state.get("modality", {}).get(f, {}).get("k") == k:
            out["skipped"].append(f"modality/{f}")
            continue
        summary = modality_pass(root, path, f, labels[f], k)
        save("modality", f, value={**summary, "k": int(k)})
        out["ran"].append(f"modality/{f}")
    out["seconds"] = time.time() - start
    echo(f"reduced {path}: ran {', '.join(out['ran']) or 'nothing'}; exact pass re-ran "
         f"{out['exact_units']} work units; {out['csv']} CSVs in {csv_root}; "
         f"{out['seconds']:.1f} s")  # fmt: skip
    return out
