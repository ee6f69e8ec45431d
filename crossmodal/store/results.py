"""Read a reduced store as labelled xarray objects, and its steering runs as pandas tables.

The store is the one ``crossmodal collect`` wrote and ``crossmodal reduce`` completed. Groups
(``<family>`` is decoder, ffn_act, speech_encoder or text_encoder):

  * ``stats/<family>``: merged statistics ``[task, modality, language, step, pooling, unit]``;
  * ``selectivity/<family>``: AP (+ bounds), AUROC (+ bounds), on_p50, on_p90, off_mean over
    ``(task, modality, step, language, unit)`` for the default pooling (``prefix_mean``, the
    reference's value); every other pooling in the subgroup ``selectivity/<family>/<pooling>``;
  * ``exact/<family>``: exact AP/AUROC of the units whose top/bottom-k membership the
    histogram intervals left open (``[pooling, task, modality, step, language, unit]``);
  * ``sets/<family>``: exact top/bottom/both sets, unit ids ``[scope, pooling, task,
    modality, step, language, kind, rank]`` (-1 padded);
  * ``roles/<family>``: the same sets relabelled ``role`` (representation = x2en, control = en2x);
  * ``overlap/<family>/{sets, sets_by_layer, spearman}``: cross-modal overlap with random
    baselines and Spearman of AP vectors;
  * ``exemplars/<family>``: per final-set unit, the examples with its highest and lowest
    values ``[pooling, task, modality, step, unit, side, rank]`` (:meth:`Results.exemplars`);
  * ``stability/<family>``: overlap of the top/bottom-k sets of two halves of the examples;
  * ``concentration/<family>`` (written by collect, one family: ffn_act, else decoder): sums
    of the per-example Gini of |activation| over each decoder layer's units, read as mean and
    std by :meth:`Results.concentration`;
  * ``modality/<family>``: v1 modality-selective units, AP of "speech task example" vs "text
    task example" over ``(task, step, language, unit)``, their top/bottom-k sets and counts
    per submodule and site kind (default pooling; others in ``modality/<family>/<pooling>``).

Example::

    from crossmodal.store import results
    r = results.open("results/organism.zarr")
    ds = r.selectivity("decoder")                     # the Dataset selection/report/steer take
    top = r.sets("decoder").sel(task="x2en", modality="speech", step=1, language="deu",
                                kind="top")          # unit ids, best first, -1 padded
    r.units("decoder").loc[top[top >= 0].values]      # which modules they are
    r.overlap("decoder")["diagonal"].sel(task="x2en", kind="top")   # same-language overlap
    r.concentration()["mean"].sel(task="x2en", step=1)                # Gini per language, layer
    r.modality("decoder")["by_submodule"].sel(kind="top")             # speech-selective units
    r.exemplars(unit=int(top[0]), task="x2en", modality="speech", step=1)  # what it fires on
    r.stability().sel(task="x2en", kind="top")["overlap"]             # halves agree on k?
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from crossmodal.store.datasets import read_dataset
from crossmodal.store.location import is_url, read_parquet, upath, zarr_store
from crossmodal.store.names import (
    CONCENTRATION,
    OVERLAP_KINDS,
    concentration_group,
    default_pooling,
    exact_group,
    exemplars_group,
    modality_group,
    overlap_group,
    roles_group,
    selectivity_group,
    sets_group,
    stability_group,
    stats_group,
    units_group,
)

__all__ = ["Results", "open"]


def open(path: str | Path) -> Results:  # noqa: A001 - the documented entry point
    """The results of the store at ``path`` (lazy: arrays load when their values are read).

    Raises:
        ValueError: ``path`` is not a collect store.
    """
    p = upath(path)
    if not (p / "zarr.json").is_file():
        raise ValueError(
            f"path must be one of [a store written by `crossmodal collect`], got {str(p)!r}; "
            "run `crossmodal collect CONFIG` and `crossmodal reduce STORE` first"
        )
    return Results(p)


@dataclass(frozen=True)
class Results:
    """Labelled views of one store; every method opens its group anew (no cached state)."""

    path: Path

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes: config, provenance, and ``reduce`` (what the reduce job did)."""
        return zarr.open_group(zarr_store(self.path), mode="r").attrs.asdict()

    @property
    def families(self) -> list[str]:
        return list(self.attrs["config"]["families"])

    @property
    def poolings(self) -> list[str]:
        return list(self.attrs["config"]["poolings"])

    def _pooling(self, pooling: str | None) -> str:
        pooling = default_pooling(self.poolings) if pooling is None else pooling
        if pooling not in self.poolings:
            raise ValueError(
                f"pooling must be one of {self.poolings}, got {pooling!r}; pick a collected one"
            )
        return pooling

    def _open(self, group: str, what: str) -> xr.Dataset:
        family = group.split("/")[1] if "/" in group else ""
        if family and family not in self.families:
            raise ValueError(f"family must be one of {self.families}, got {family!r}")
        if not (self.path / group / "zarr.json").is_file():
            raise ValueError(
                f"{what} must be one of [present in the store], got no group {group!r} in "
                f"{str(self.path)!r}; run `crossmodal reduce {self.path}`"
            )
        return read_dataset(self.path, group)

    def stats(self, family: str = "decoder") -> xr.Dataset:
        """Merged statistics ``[task, modality, language, step, pooling, unit(, bin)]``."""
        return self._open(stats_group(family), "stats")

    def selectivity(self, family: str = "decoder", pooling: str | None = None) -> xr.Dataset:
        """AP, bounds, AUROC, on_p50, on_p90, off_mean over ``(task, modality, step,
        language, unit)`` with unit coords layer, submodule, site, feature."""
        p = self._pooling(pooling)
        return self._open(selectivity_group(family, p, self.poolings), "selectivity")

    def exact(self, family: str = "decoder") -> xr.Dataset:
        """Exact AP/AUROC of the candidate units only (the exact pass)."""
        return self._open(exact_group(family), "exact")

    def sets(
        self, family: str = "decoder", pooling: str | None = None, scope: str | None = "all"
    ) -> xr.DataArray:
        """Exact selected sets: unit ids ``[task, modality, step, language, kind, rank]``.

        ``scope`` is the unit group the ranking ran over (all, attention, ffn); None keeps
        the ``scope`` dim. The result carries attrs ``k``, ``group``, ``layer`` for
        :func:`crossmodal.reduce.overlap.overlap` and :func:`crossmodal.report.selection.write_report`.
        """
        ds = self._open(sets_group(family), "sets")
        return _scoped(ds["units"].sel(pooling=self._pooling(pooling)), scope, ds.attrs["k"])

    def sets_table(self, family: str | None = None) -> pd.DataFrame:
        """The selected sets as one long table (``<store>-sets/<family>.parquet``; every
        family when None): one row per member with its unit coordinates, histogram AP and
        bounds and exact AP (docs/outputs.md, ``reduce/sets.parquet``)."""
        from crossmodal.reduce.sets import sets_table_path

        folder = sets_table_path(self.path, "-").parent
        path = folder if family is None else sets_table_path(self.path, family)
        if not path.exists() or (family is None and not any(folder.glob("*.parquet"))):
            raise ValueError(
                f"sets table must be one of [present], got none at {str(path)!r}; run "
                f"`crossmodal reduce {self.path}`"
            )
        return read_parquet(path)

    def roles(
        self, family: str = "decoder", pooling: str | None = None, scope: str | None = "all"
    ) -> xr.DataArray:
        """The sets by role: ``[role, modality, step, language, kind, rank]``."""
        ds = self._open(roles_group(family), "roles")
        return _scoped(ds["units"].sel(pooling=self._pooling(pooling)), scope, ds.attrs["k"])

    def overlap(
        self,
        family: str = "decoder",
        kind: str = "sets",
        pooling: str | None = None,
        scope: str | None = "all",
    ) -> xr.Dataset:
        """Cross-modal results: ``sets`` (intersection counts, expected k*k/N, hypergeometric
        p, diagonal, off-diagonal mean), ``sets_by_layer`` or ``spearman`` (all units, by
        layer, by submodule); rows ``text_language``, columns ``speech_language``."""
        if kind not in OVERLAP_KINDS:
            raise ValueError(f"kind must be one of {list(OVERLAP_KINDS)}, got {kind!r}")
        ds = self._open(overlap_group(family, kind), "overlap").sel(pooling=self._pooling(pooling))
        return ds.sel(scope=scope) if scope is not None and "scope" in ds.dims else ds

    def exemplars(
        self,
        family: str = "decoder",
        *,
        unit: int | None = None,
        task: str | None = None,
        modality: str | None = None,
        step: int | None = None,
        language: str | None = None,
        pooling: str | None = None,
    ) -> pd.DataFrame:
        """The examples with the highest (``side`` top) and lowest (bottom) values of the
        final-set units at their step: one row per (task, modality, step, unit, side, rank)
        with ``example_id``, ``language`` (of the example), ``input`` (the sentence; for
        speech the transcript of recording ``example_id``), ``output`` (generated text) and
        ``value``. Each argument given narrows the rows (``language``: examples of that
        language); ``exemplars/<family>`` holds every language of a (task, modality, step)."""
        ds = self._open(exemplars_group(family), "exemplars").sel(pooling=self._pooling(pooling))
        where = {"unit": unit, "task": task, "modality": modality, "step": step}
        ds = ds.sel({d: [v] for d, v in where.items() if v is not None})
        df = ds.to_dataframe().reset_index()
        df = df[df["value"].notna()]
        if language is not None:
            df = df[df["language"] == language]
        cols = ["task", "modality", "step", "unit", "side", "rank", "example_id", "language"]
        return df[[*cols, "input", "output", "value"]].reset_index(drop=True)

    def stability(
        self, family: str = "decoder", pooling: str | None = None, scope: str | None = "all"
    ) -> xr.Dataset:
        """Top/bottom-k overlap of the sets selected on two disjoint halves of the examples:
        ``overlap``, ``expected`` (k*k/N), ``k``, ``n_units`` over ``(task, modality, step,
        language, kind)``; present when the exact pass measured every unit."""
        ds = self._open(stability_group(family), "stability").sel(pooling=self._pooling(pooling))
        return ds.sel(scope=scope) if scope is not None else ds

    def concentration(self, pooling: str | None = None) -> xr.Dataset:
        """Gini of |activation| over each decoder layer's units, per example, aggregated per
        condition: ``mean``, ``std`` (ddof 1), ``count``, ``dropped`` over ``(task, modality,
        step, language, layer)``; attrs ``family`` (ffn_act, else decoder) and ``pooling``."""
        from crossmodal.stats.concentration import mean_std

        p = self._pooling(pooling)
        root = zarr.open_group(zarr_store(self.path), mode="r")
        groups = root[CONCENTRATION].group_keys() if CONCENTRATION in root else iter(())
        family = next(iter(groups), None)
        if family is None:
            raise ValueError(
                f"concentration must be one of [present in the store], got none in "
                f"{str(self.path)!r}; collect it again with this version (decoder or ffn_act)"
            )
        ds = self._open(concentration_group(family), "concentration").sel(pooling=p).load()
        mean, std = mean_std(ds["count"].values, ds["mean"].values, ds["m2"].values)
        out = xr.Dataset(
            {
                "mean": (ds["mean"].dims, mean),
                "std": (ds["mean"].dims, std),
                "count": ds["count"],
                "dropped": ds["dropped"],
            },
            coords={c: ds[c] for c in ds.coords if c != "pooling"},
        )
        out = out.transpose("task", "modality", "step", "language", "layer")
        return out.assign_attrs(family=family, pooling=p, n_units=ds["n_units"].values.tolist())

    def modality(self, family: str = "decoder", pooling: str | None = None) -> xr.Dataset:
        """v1 modality-selective units: ``ap``, ``ap_lo``, ``ap_hi`` of "speech task example"
        vs "text task example" over ``(task, step, language, unit)``; ``units`` (top =
        speech-selective, bottom = text-selective k-sets), ``by_submodule`` and ``by_site``
        (counts per submodule / site kind), ``n_speech``, ``n_text``."""
        p = self._pooling(pooling)
        return self._open(modality_group(family, p, self.poolings), "modality")

    def units(self, family: str = "decoder") -> pd.DataFrame:
        """The unit table, indexed by unit id: site (address), path, layer, submodule, type,
        positions, feature, step_invariant (the value cannot depend on the decoding step)."""
        u = self._open(units_group(family), "units").load()
        site = u["unit_site"].values
        cols = {
            "site": u["site_name"].values[site],
            "path": u["site_path"].values[site],
            "layer": u["unit_layer"].values,
            "submodule": u["site_submodule"].values[site],
            "type": u["site_type"].values[site],
            "positions": u["site_positions"].values[site],
            "feature": u["unit_feature"].values,
        }
        frame = pd.DataFrame({k: np.asarray(v) for k, v in cols.items()}, index=u["unit"].values)
        frame["step_invariant"] = frame["positions"] != "decoder"  # Site.step_invariant
        return frame.rename_axis("unit")

    def steering_runs(self) -> list[Path]:
        """The steer output directories that read this store, as the steer driver linked them
        in the root attribute ``steering`` (existing ones, in the order they were linked)."""
        runs = (self.attrs.get("steering") or {}).get("runs") or {}
        # relative to the store's folder; a run elsewhere (another bucket, local vs URL):
        # its absolute path or URL (steer/driver.py, run_link)
        paths = [
            upath(run) if is_url(run) or Path(run).is_absolute() else self.path.parent / run
            for run in runs
        ]
        return [p for p in paths if p.is_dir()]

    def steering(self, run: str | Path | None = None, table: str = "summary") -> pd.DataFrame:
        """A steer run's ``summary`` (per cell) or ``results`` (per cell and input) table.

        ``run``: the steer output directory; default: the only run of :meth:`steering_runs`
        (linked from the store's attrs by the steer driver).
        """
        if table not in ("summary", "results"):
            raise ValueError(f"table must be one of ['summary', 'results'], got {table!r}")
        if run is None:
            runs = self.steering_runs()
            if len(runs) != 1:
                raise ValueError(
                    f"run must be one of {[str(r) for r in runs]}, got None; pass the steer "
                    "output directory (run `crossmodal steer CONFIG` first if there is none)"
                )
            run = runs[0]
        path = upath(run) / f"{table}.parquet"
        if not path.is_file():
            raise ValueError(
                f"run must hold {table}.parquet, got {str(run)!r}; finish the steer run"
            )
        return pd.read_parquet(path)

    def report(
        self,
        out: str | Path | None = None,
        *,
        family: str = "decoder",
        pooling: str | None = None,
        scope: str = "all",
        figures: bool = True,
        fmt: str = "png",
        dpi: int = 150,
    ) -> list[Path]:
        """``crossmodal report``: :func:`crossmodal.report.store_report.write_store_report`."""
        from crossmodal.report.store_report import write_store_report

        return write_store_report(
            self,
            out,
            family=family,
            pooling=pooling,
            scope=scope,
            figures=figures,
            fmt=fmt,
            dpi=dpi,
        )


def _scoped(da: xr.DataArray, scope: str | None, k: int) -> xr.DataArray:
    """Select one scope and put the attrs :func:`crossmodal.reduce.selection.scope_of` reads."""
    if scope is None:
        return da.assign_attrs(k=int(k))
    scopes = [str(s) for s in da["scope"].values]
    if scope not in scopes:
        raise ValueError(f"scope must be one of {scopes}, got {scope!r}; reduce with that scope")
    from crossmodal.reduce.selection import parse_scope

    out = da.sel(scope=scope, drop=True)
    group, layer = parse_scope(scope)
    return out.assign_attrs(k=int(k), group=group, layer="all" if layer is None else layer)
