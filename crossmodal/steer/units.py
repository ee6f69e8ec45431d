"""Which units a grid cell forces, with which constants: cells -> per-row interventions.

A ``selected`` cell forces the top/bottom/both set of the task of its role (x2en
representation, en2x control) for its language, unit modality and identification step,
ranked by ``ap`` within its scope (:func:`crossmodal.reduce.selection.select_sets`); a
``random`` cell forces ``n_units`` units drawn from the same scope with its seed (one draw
for every language and step); a ``baseline`` cell forces nothing. Each unit is set to its
``on_p50``/``on_p90``/``off_mean`` of that same condition, or zero; units whose value is NaN
(never observed) are dropped and counted (docs/method.md, "Interventions"). The hooks that
apply the forcing are :mod:`crossmodal.model.forcing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from torch import nn

from crossmodal.model.forcing import NO_FORCING, Intervention, SteeringError
from crossmodal.steer.grid import Cell

SCOPES = ("all", "attention", "ffn")
"""The unit groups a cell's units are drawn from (a random cell's draw is seeded by the index)."""


@dataclass(frozen=True)
class CellForcing:
    """What one cell forces, and the bookkeeping its result rows carry.

    Attributes:
        intervention: module path -> (features, constants); empty for a baseline.
        n_forced: units forced, after dropping those whose value was never observed (NaN).
        mean_ap: their mean AP in the cell's condition (NaN when none is forced).
    """

    intervention: Intervention
    n_forced: int
    mean_ap: float


class UnitForcing:
    """Cells -> per-row interventions, from the selectivity Dataset and the model's modules.

    Args:
        ds: variables ``ap``, ``on_p50``, ``on_p90``, ``off_mean`` over ``(task, modality,
            step, language, unit)``; unit coords ``site`` (site name or module path),
            ``feature``, ``submodule``, ``layer``.
        model: the model whose module paths the sites resolve to; None: only count the
            units each cell forces (:meth:`n_forced`, the driver's check before any model).
    """

    def __init__(self, ds: xr.Dataset, model: nn.Module | None) -> None:
        from crossmodal.reduce.selection import scope_mask, unit_ids

        extra = set(ds["ap"].dims) - {"task", "modality", "step", "language", "unit"}
        if extra:
            raise ValueError(
                f"selectivity dims must be one of ['task', 'modality', 'step', 'language', "
                f"'unit'], got extra {sorted(extra)}; select one value of each before steering"
            )
        self.ds = ds
        self._ids = unit_ids(ds)
        self._pos = {int(u): i for i, u in enumerate(self._ids)}
        self._scopes = {s: np.flatnonzero(scope_mask(ds, s)) for s in SCOPES}
        self._paths = None
        if model is not None:
            sites = np.asarray(ds["site"].values).astype(str)
            names, codes = np.unique(sites, return_inverse=True)
            self._paths = np.array(_module_paths(model, names.tolist()), dtype=object)[codes]
        self._features = np.asarray(ds["feature"].values).astype(np.int64)
        self._cache: dict[tuple, np.ndarray] = {}

    def _vector(self, var: str, cell: Cell) -> np.ndarray:
        key = (var, cell.task, cell.unit_modality, cell.step, cell.language)
        if key not in self._cache:
            values = self.ds[var].sel(_condition(cell)).values
            self._cache[key] = np.asarray(values, dtype=np.float64)
        return self._cache[key]

    def positions(self, cell: Cell) -> np.ndarray:
        """Positions (along ``unit``) of the cell's units, before dropping NaN values."""
        if cell.kind == "baseline":
            return np.zeros(0, dtype=np.int64)
        pool = self._scopes[cell.scope or "all"]
        if cell.kind == "random":
            scope_code = SCOPES.index(cell.scope or "all")
            rng = np.random.default_rng([int(cell.seed or 0), int(cell.n_units), scope_code])
            return np.sort(rng.choice(pool, size=min(cell.n_units, pool.size), replace=False))
        from crossmodal.reduce.selection import select_sets, set_ids

        ap = self.ds["ap"].sel(_condition(cell))
        sets = select_sets(ap.load(), k=int(cell.k or 1), group=cell.scope or "all")
        return np.array(
            [self._pos[int(u)] for u in set_ids(sets, kind=cell.set_kind)], dtype=np.int64
        )

    def _forced(self, cell: Cell) -> tuple[np.ndarray, np.ndarray]:
        """Positions and constants of the units the cell forces (NaN-valued ones dropped)."""
        pos = self.positions(cell)
        if pos.size == 0:
            return pos, np.zeros(0)
        values = (
            np.zeros(pos.size) if cell.forcing == "zero" else self._vector(cell.forcing, cell)[pos]
        )
        keep = np.isfinite(values)
        return pos[keep], values[keep]

    def n_forced(self, cell: Cell) -> int:
        """How many units the cell forces (what its rows' ``n_forced`` will say)."""
        return int(self._forced(cell)[0].size)

    def cell_forcing(self, cell: Cell) -> CellForcing:
        """The cell's forcing: its units by module path with their constants, and how many."""
        pos, values = self._forced(cell)
        if pos.size == 0:
            return CellForcing(NO_FORCING, n_forced=0, mean_ap=float("nan"))
        if self._paths is None:
            raise ValueError("model must be one of [a model], got None; pass it to UnitForcing")
        # grouped by module path as arrays, not unit by unit: plan_batch takes arrays whole
        paths = self._paths[pos].tolist()
        first = {path: n for n, path in enumerate(dict.fromkeys(paths))}  # first appearance
        codes = np.array([first[path] for path in paths], dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        cuts = np.cumsum([0, *np.bincount(codes, minlength=len(first))])
        feats, vals = self._features[pos][order], values[order]
        out = {
            path: (feats[cuts[n] : cuts[n + 1]], vals[cuts[n] : cuts[n + 1]])
            for path, n in first.items()
        }
        ap = self._vector("ap", cell)[pos]
        mean_ap = float(np.nanmean(ap)) if pos.size else float("nan")
        return CellForcing(out, n_forced=int(pos.size), mean_ap=mean_ap)


def _module_paths(model: nn.Module, sites: Sequence[str]) -> list[str]:
    """Site names (``decoder.layers.0.ffn.fc1``) or module paths -> module paths."""
    modules = dict(model.named_modules())
    index = None
    out = []
    for site in sites:
        if "@" in site:
            raise SteeringError(
                f"site must be one of [sites of modules run once per forward], got {site!r}; "
                "a module called twice per forward cannot be forced per call"
            )
        if site not in modules and index is None:
            from crossmodal.model.units import FAMILIES, UnitIndex

            index = UnitIndex.from_model(model, FAMILIES)
        out.append(site if site in modules else index.site(site).module_path)
    return out


def _condition(cell: Cell) -> dict[str, object]:
    """The selectivity condition a cell's units and values come from (a ``.sel`` mapping)."""
    return {
        "task": cell.task,
        "modality": cell.unit_modality,
        "step": cell.step,
        "language": cell.language,
    }
