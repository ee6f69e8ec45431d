"""Representation and control roles of selected units (docs/method.md, "Roles").

Representation units for language L are the selected set of the ``x2en`` condition for L
(selective for the input language while the output is English); control units for L are the
selected set of the ``en2x`` condition for L (selective for the requested output language
while the input is English). Both exist per modality, step and set kind.

Input: sets from :func:`crossmodal.reduce.selection.select_sets` or
:func:`crossmodal.reduce.selection.finalize_selection` (unit ids, -1 padded, dims
``[task, modality, step, language, kind, rank]``).
"""

from __future__ import annotations

import pandas as pd
import xarray as xr

ROLE_TASKS: dict[str, str] = {"representation": "x2en", "control": "en2x"}
"""Role -> the task whose selected sets define it."""


def roles(sets: xr.DataArray) -> xr.DataArray:
    """Sets relabelled by role: dims ``[role, modality, step, language, kind, rank]``.

    Languages absent from a task (``eng`` in en2x) are all -1 for that role.
    """
    tasks = [str(t) for t in sets["task"].values] if "task" in sets.coords else []
    missing = [t for t in ROLE_TASKS.values() if t not in tasks]
    if missing:
        raise ValueError(
            f"task must be one of {tasks}, got missing {missing!r}; select sets for "
            "x2en (representation) and en2x (control)"
        )
    parts = [sets.sel(task=t, drop=True) for t in ROLE_TASKS.values()]
    out = xr.concat(parts, dim=pd.Index(list(ROLE_TASKS), name="role"), fill_value=-1)
    out.attrs.update(sets.attrs)
    return out.transpose("role", ...)


def role_table(sets: xr.DataArray) -> pd.DataFrame:
    """Tidy table of role membership: one row per (role, modality, step, language, kind, unit).

    ``rank`` is the position in the set (0 = best for top, worst for bottom).
    """
    da = roles(sets)
    df = da.to_dataframe(name="unit").reset_index()
    df = df[df["unit"] >= 0]
    cols = [c for c in ("role", "modality", "step", "language", "kind", "rank", "unit") if c in df]
    return df[cols].reset_index(drop=True)
