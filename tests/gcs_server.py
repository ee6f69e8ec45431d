"""A Google Cloud Storage server on 127.0.0.1 for the ``gs://`` tests: the JSON API of
``gcp-storage-emulator`` (PyPI), in this process on a free port.

The emulator implements uploads, downloads, listings and deletes, but not request
preconditions, which the output lock stands on, nor suffix ranges (``Range: bytes=-N``, how
Zarr reads a shard's index). :class:`_PreconditionRouter` adds both: the precondition GCS
defines for writes and reads (docs: cloud.google.com/storage/docs/request-preconditions):
a request with ``ifGenerationMatch=G`` proceeds only if the object's generation is G (``0``:
only if no object exists), else it is answered ``412 Precondition Failed``. The server
handles one request at a time, so the check and the write are atomic, as on GCS.

Clients reach it anonymously (``storage_options.anon``), through ``endpoint_url``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class GcsServer:
    """A running server: its endpoint, and a fresh bucket per call of :meth:`bucket`."""

    endpoint: str
    scheme: str = "gs"

    @property
    def options(self) -> dict[str, object]:
        """The ``storage_options`` of a config that writes here."""
        return {"endpoint_url": self.endpoint, "anon": True}

    def bucket(self, prefix: str = "t") -> str:
        """Create a new bucket; its name."""
        import requests

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        url = f"{self.endpoint}/storage/v1/b"
        requests.post(url, params={"project": "test"}, json={"name": name}, timeout=10)
        return name


def _target(path: str, query: dict[str, list[str]]) -> tuple[str, str] | None:
    """(bucket, object) a request names: an upload's ``?name=``, else the ``/o/<name>`` path."""
    parts = path.split("/b/", 1)[-1].split("/o", 1)
    if len(parts) != 2:
        return None
    bucket, rest = parts
    if "name" in query:
        return bucket, query["name"][0]
    return (bucket, unquote(rest[1:])) if rest.startswith("/") and rest[1:] else None


def _router_class():
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound

    class _PreconditionRouter(server.Router):
        def handle(self, method):
            handler = self._request_handler
            url = urlparse(handler.path)
            query = parse_qs(url.query)
            target = _target(url.path, query)
            suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", handler.headers.get("Range") or "")
            if suffix and target:  # GCS serves the last N bytes; the emulator only start-end
                try:
                    size = int(handler.storage.get_file_obj(*target)["size"])
                except NotFound:
                    size = 0
                del handler.headers["Range"]
                handler.headers["Range"] = f"bytes={max(size - int(suffix[1]), 0)}-"
            if "ifGenerationMatch" in query and target:
                try:
                    now = str(handler.storage.get_file_obj(*target)["generation"])
                except NotFound:
                    now = "0"
                if now != query["ifGenerationMatch"][0]:
                    if method in ("POST", "PUT") and int(
                        handler.headers.get("Content-Length") or 0
                    ):
                        handler.rfile.read(int(handler.headers["Content-Length"]))
                    response = server.Response(handler)
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                    response.close()
                    return
            super().handle(method)

    return _PreconditionRouter


@contextmanager
def gcs_server() -> Iterator[GcsServer]:
    """Start the emulator (with preconditions) on a free port of 127.0.0.1."""
    import logging

    from gcp_storage_emulator import server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server.Router = _router_class()  # RequestHandler looks the name up per request
    running = server.create_server("127.0.0.1", 0, in_memory=True)
    # In memory there is nothing to persist, but the emulator re-serialises every object's
    # metadata after each write (quadratic in the objects a run writes): skip it.
    running._storage._write_config_to_file = lambda: None
    running.start()
    host, port = running._api._httpd.server_address[:2]
    try:
        yield GcsServer(f"http://{host}:{port}")
    finally:
        running.stop()
