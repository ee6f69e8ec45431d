"""Where an output lives: a local path or an object-storage URL, opened one way everywhere.

An output (the collect store, the steering directory, the report) is a local path or an
``s3://`` URL. This module is the one place that turns it into what the code writes through:

- :func:`upath`: a :class:`pathlib.Path` for a local path (unchanged behaviour), a
  :class:`upath.UPath` over s3fs for a URL (the same ``/``, ``open``, ``exists``, ``glob``);
- :func:`zarr_store`: the string path for a local store (Zarr's ``LocalStore``, as before), a
  :class:`zarr.storage.FsspecStore` on that UPath's filesystem for a URL.

``storage_options`` (a config field, :class:`StorageOptions`) names only the endpoint, the
region and anonymous reads; credentials come from the environment and the provider chain
(docs/design.md, "Object storage"). Options are registered per URL prefix by the driver
(:func:`register`) and travel to Ray actors inside the stage config, which registers them
again there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SUPPORTED = ("s3",)


@dataclass(frozen=True)
class StorageOptions:
    """The validated ``storage_options`` of a config (schema: ``storage_options``)."""

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False

    @classmethod
    def of(cls, raw: Mapping[str, Any] | StorageOptions | None) -> StorageOptions:
        """From a config mapping (missing keys: defaults), or as it is."""
        if isinstance(raw, StorageOptions):
            return raw
        raw = raw or {}
        return cls(
            endpoint_url=raw.get("endpoint_url"),
            region=raw.get("region"),
            anon=bool(raw.get("anon", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fsspec(self) -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem`` (only what is set)."""
        out: dict[str, Any] = {}
        if self.anon:
            out["anon"] = True
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        if self.region:
            out["client_kwargs"] = {"region_name": self.region}
        return out


def scheme(output: Any) -> str | None:
    """The URL scheme of ``output`` (``s3``), or None for a local path."""
    m = URL.match(str(output))
    return m.group(1).lower() if m else None


def is_url(output: Any) -> bool:
    return scheme(output) is not None
