"""xarray Datasets as store groups: write them as Zarr groups with dimension names, read back.

Zarr v3 keeps each array's ``dimension_names``, which is all xarray needs to rebuild a
Dataset from a group (``xr.open_zarr``); coordinates that are not dimensions are listed in
each variable's ``coordinates`` attribute (the CF convention xarray reads). Strings are
stored as variable-length strings and come back as numpy's StringDType, which
:func:`decode_strings` turns into ordinary strings (docs/platform.md, "Zarr").
Only the driver of a stage writes groups this way: one writer per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from crossmodal.store.layout import jsonable
from crossmodal.store.location import zarr_store


def put_array(group: zarr.Group, name: str, data: Any, dims: Sequence[str], **attrs: Any) -> None:
    """Replace array ``name`` of ``group`` with ``data`` (strings: variable-length)."""
    data = np.asarray(data)
    dtype = str if data.dtype.kind in "UOT" else data.dtype
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        dimension_names=list(dims),
        attributes=attrs,
        overwrite=True,
    )
    if data.size:
        arr[...] = data


def write_dataset(store: str | Path, path: str, ds: xr.Dataset | xr.DataArray) -> None:
    """Replace group ``path`` with ``ds``: dimension names, non-index coords listed in each
    variable's ``coordinates`` attr, variable-length strings, ``ds.attrs`` as the group's
    attrs (variable attrs are not kept)."""
    if isinstance(ds, xr.DataArray):  # a named DataArray: its attrs become the group's
        ds = ds.to_dataset().assign_attrs(ds.attrs)
    g = zarr.open_group(zarr_store(store), path=path, mode="w", zarr_format=3)
    g.attrs.update(jsonable(ds.attrs))
    aux = [c for c in ds.coords if c not in ds.dims]
    for name, var in ds.variables.items():
        coords = [c for c in aux if name in ds.data_vars and set(ds[c].dims) <= set(var.dims)]
        attrs = {"coordinates": " ".join(map(str, coords))} if coords else {}
        put_array(g, str(name), var.values, [str(d) for d in var.dims], **attrs)


def unicode(values: Any) -> np.ndarray:
    """Strings as a fixed-width ``<U`` array (numpy cannot cast StringDType to it directly)."""
    return np.asarray(np.asarray(values, dtype=object).tolist(), dtype=str)


def decode_strings(ds: xr.Dataset) -> xr.Dataset:
    """Zarr strings come back as numpy StringDType, which numpy cannot ``.astype(str)`` and
    whose elements have no ``.item()``: label axes become ``<U``, other string coords object.
    Apply it to any ``xr.open_zarr`` result before selection/overlap/steering code."""
    strings = [c for c in ds.coords if ds[c].dtype.kind == "T"]
    return ds.assign_coords(
        {
            c: (
                ds[c].dims,
                unicode(ds[c].values) if c in ds.dims else np.asarray(ds[c].values, dtype=object),
            )
            for c in strings
        }
    )


def read_dataset(store: str | Path, path: str) -> xr.Dataset:
    """Group ``path`` as a lazy Dataset with its strings decoded (:func:`decode_strings`)."""
    return decode_strings(xr.open_zarr(zarr_store(store), group=path, consolidated=False))
