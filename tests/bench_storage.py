"""Object-storage benchmark (docs/benchmarks.md, "Outputs on object storage"): against the
local S3 server of the tests (moto, 127.0.0.1, this process):

1. upload throughput of fsspec (s3fs, what zarr.storage.FsspecStore writes through) and
   obstore (zarr.storage.ObjectStore) for 1 MiB and 8 MiB objects;
2. collect and reduce of one organism config with the store on local disk and on the
   server, in the same run, and the S3 requests per work unit (the server's request log).

    PYTHONPATH=. python tests/bench_storage.py
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import collect_config  # noqa: E402
from s3_server import s3_server  # noqa: E402

REQUESTS: collections.Counter = collections.Counter()


class _Count(logging.Handler):
    """Counts the server's requests by method (LIST: a GET with list-type)."""

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r'"(\w+) (\S+) HTTP', record.getMessage())
        if m:
            REQUESTS["LIST" if "list-type" in m.group(2) else m.group(1)] += 1


def upload_rates(server, n_bytes: int, n: int) -> dict[str, float]:
    """MB/s of ``n`` PUTs of ``n_bytes`` each, through s3fs and through obstore."""
    import obstore
    import s3fs
    from obstore.store import S3Store

    bucket = server.bucket("bench")
    data = b"x" * n_bytes
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    start = time.perf_counter()
    for i in range(n):
        fs.pipe_file(f"{bucket}/fsspec/{i}", data)
    fsspec_s = time.perf_counter() - start
    store = S3Store(
        bucket, endpoint=server.endpoint, region="us-east-1", client_options={"allow_http": True}
    )
    start = time.perf_counter()
    for i in range(n):
        obstore.put(store, f"obstore/{i}", data)
    obstore_s = time.perf_counter() - start
    mb = n * n_bytes / 1e6
    return {"fsspec": mb / fsspec_s, "obstore": mb / obstore_s}


def collect_and_reduce(out: str, options: dict | None) -> dict[str, float]:
    """Seconds of collect and of reduce (in-process Ray) of the organism config into ``out``."""
    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect
    from crossmodal.organism import organism_path
    from crossmodal.reduce.driver import run_reduce

    raw = collect_config(organism_path(), out, modalities=["speech", "text"], keep_parts=False)
    if options:
        raw["storage_options"] = options
    quiet = {"progress": False, "echo": lambda _: None}
    REQUESTS.clear()
    start = time.perf_counter()
    done = run_collect(load_config(raw), **quiet)
    collect_s, collect_req = time.perf_counter() - start, sum(REQUESTS.values())
    start = time.perf_counter()
    run_reduce(done["store"], k=8, scopes=["all"], **quiet)
    reduce_s = time.perf_counter() - start
    units = done["work_units"]
    return {
        "work_units": units,
        "collect_s": collect_s,
        "reduce_s": reduce_s,
        "collect_requests_per_unit": collect_req / units,
        "reduce_requests_per_unit": (sum(REQUESTS.values()) - collect_req) / units,
        "requests": dict(REQUESTS),
    }


def main() -> None:
    log = logging.getLogger("werkzeug")
    log.setLevel(logging.INFO)
    log.addHandler(_Count())
    log.propagate = False
    with s3_server() as server, tempfile.TemporaryDirectory() as tmp:
        for size, n in ((1 << 20, 64), (8 << 20, 16)):
            rates = upload_rates(server, size, n)
            print(
                f"upload {size >> 20} MiB x {n}: "
                + ", ".join(f"{k} {v:.1f} MB/s" for k, v in rates.items())
            )
        local = collect_and_reduce(str(Path(tmp) / "c.zarr"), None)
        remote = collect_and_reduce(f"s3://{server.bucket('store')}/c.zarr", server.options)
        for name, r in (("local disk", local), ("S3 server", remote)):
            print(f"{name}: {r}")


if __name__ == "__main__":
    main()
