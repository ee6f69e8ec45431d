"""Google Cloud Storage's JSON API, the few calls the lock, the up-front checks and the input
cache need (docs/design.md, "Object storage").

Zarr and UPath reach ``gs://`` through gcsfs; what gcsfs does not expose is a write that the
service refuses unless the object is still at a given generation (``ifGenerationMatch``:
``0`` = "only if absent", GCS's form of S3's ``If-None-Match: *``) and the service's own
clock (the ``Date`` header) that the lock's lease is measured on. :class:`GcsClient` sends
those requests through google-auth's authorised session, so credentials come from the
standard chain (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default
login``, a workload identity), never from a config.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

PUBLIC_ENDPOINT = "https://storage.googleapis.com"


class GcsError(Exception):
    """A JSON API error: its HTTP status (412 = a precondition failed, 404 = not found)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:200]}")
        self.status = status


@dataclass(frozen=True)
class Stat:
    """An object's generation, size, last write and the service's clock when asked."""

    generation: str
    size: int
    updated: datetime
    server_now: datetime


def endpoint(endpoint_url: str | None) -> str:
    """The JSON API's base URL: ``storage_options.endpoint_url``, else
    ``STORAGE_EMULATOR_HOST`` (the variable Google's own clients read), else GCS."""
    found = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or PUBLIC_ENDPOINT
    return found if "://" in found else f"http://{found}"


class GcsClient:
    """One bucket of one endpoint; each method is one request (two for a paged listing).

    Raises:
        google.auth.exceptions.DefaultCredentialsError: no credentials in the chain (and
            not ``anon``), on construction.
        requests.RequestException: the endpoint does not answer.
    """

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, anon: bool = False):
        import google.auth
        from google.auth.credentials import AnonymousCredentials
        from google.auth.transport.requests import AuthorizedSession

        scope = ["https://www.googleapis.com/auth/devstorage.read_write"]
        creds = AnonymousCredentials() if anon else google.auth.default(scopes=scope)[0]
        self.session = AuthorizedSession(creds)
        self.base = endpoint(endpoint_url).rstrip("/")
        self.bucket = bucket

    def _object(self, key: str) -> str:
        return f"{self.base}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", (10, 60))
        response = self.session.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise GcsError(response.status_code, response.text)
        return response

    def bucket_exists(self) -> None:
        """Raises :class:`GcsError` (404: no such bucket, 401/403: denied)."""
        self._send("GET", f"{self.base}/storage/v1/b/{quote(self.bucket, safe='')}")

    def stat(self, key: str) -> Stat | None:
        """The object's metadata, or None when there is none."""
        try:
            response = self._send("GET", self._object(key))
        except GcsError as err:
            if err.status == 404:
                return None
            raise
        meta = response.json()
        return Stat(
            generation=str(meta["generation"]),
            size=int(meta.get("size") or 0),
            # whole seconds, like the Date header it is compared with (the lock's lease)
            updated=datetime.fromisoformat(meta["updated"].replace("Z", "+00:00")).replace(
                microsecond=0
            ),
            server_now=parsedate_to_datetime(response.headers["Date"]),
        )

    def read(self, key: str, generation: str | None = None, *, stream: bool = False) -> Any:
        """The object's bytes (a streaming response when ``stream``); refused (412) unless
        it is still at ``generation``, when given."""
        params = {"alt": "media", **({"ifGenerationMatch": generation} if generation else {})}
        response = self._send("GET", self._object(key), params=params, stream=stream)
        return response if stream else response.content

    def put(self, key: str, body: bytes, *, if_generation: str | None = None) -> str:
        """Write the object whole (one request); its new generation. ``if_generation``:
        ``"0"`` = only if absent, else only if still at that generation (else 412)."""
        params = {"uploadType": "media", "name": key}
        if if_generation is not None:
            params["ifGenerationMatch"] = if_generation
        url = f"{self.base}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        response = self._send("POST", url, params=params, data=body)
        return str(response.json()["generation"])

    def delete(self, key: str, *, if_generation: str | None = None) -> None:
        params = {"ifGenerationMatch": if_generation} if if_generation else {}
        self._send("DELETE", self._object(key), params=params)

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix``: its JSON resource (``name``, ``generation``,
        ``size``)."""
        url = f"{self.base}/storage/v1/b/{quote(self.bucket, safe='')}/o"
        params = {"prefix": prefix}
        while True:
            page = self._send("GET", url, params=params).json()
            yield from page.get("items", [])
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]
