"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto's standalone
server (``moto[server]``), which speaks the S3 protocol over HTTP and honours conditional
writes (``If-None-Match: *``, ``If-Match``), in this process on a free port.

Credentials are dummies set in the environment (the chain every client reads); the endpoint
goes in ``storage_options.endpoint_url`` and in ``AWS_ENDPOINT_URL`` (for Ray actors and
subprocesses, which read the same environment).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """A running server: its endpoint, and a fresh bucket per call of :meth:`bucket`."""

    endpoint: str
    scheme: str = "s3"

    @property
    def options(self) -> dict[str, str]:
        """The ``storage_options`` of a config that writes here."""
        return {"endpoint_url": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, prefix: str = "t") -> str:
        """Create a new bucket; its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's server on a free port of 127.0.0.1 with the dummy credentials in the
    environment (restored after)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
