"""Shared fixtures. No hub and no Ray auth in tests (docs/platform.md, "Ray").

Plain builders several test modules share (model directories, configs, the collect driver
without Ray, a lock holder) live in tests/helpers.py: ``from helpers import ...``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs asks a gs:// bucket's type over gRPC (zonal buckets), which the test GCS server
# (tests/gcs_server.py) does not speak: one 60 s timeout per bucket. Plain JSON API only.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import free_ports  # noqa: E402

from crossmodal.fleet.head import wait_ready  # noqa: E402
from crossmodal.model.load import LoadedModel, build_random_model  # noqa: E402

# Unit tests run tiny models: one thread avoids oversubscription on small CI machines
# (2 cores), where two threads per test process made tiny-model tests up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """A random tiny SeamlessM4T v2 (about 0.6M parameters), eval mode, six language tags."""
    torch.manual_seed(0)
    return build_random_model("tiny", seed=0)


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of process group ``pgid``."""
    rows = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True)
    return [
        r
        for r in rows.stdout.splitlines()
        if int(r.split()[1]) == pgid and not r.split()[2].startswith("Z")
    ]


def kill_group(pgid: int) -> None:
    """SIGTERM a process group, then SIGKILL until nothing of it is left (15 s)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 15
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(1)
        if time.time() > deadline - 12:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A `ray start --head --block` in its own process group, stopped (and checked gone) after.

    Yields ``{"gcs", "dashboard", "env"}``: the GCS address for ``--address``/``RAY_ADDRESS``,
    the dashboard URL for ``ray job submit``, and the environment to run clients with.
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, dash, client, agent = free_ports(4)
    temp = Path(f"/tmp/cmray{os.getpid()}")  # short: unix socket paths are limited
    env = {**os.environ, **RAY_ENV}
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",  # the default 52365 clashes with other heads
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        "--dashboard-host=127.0.0.1",
    ]
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        wait_ready(proc.pid, [gcs, dash, agent], timeout=180, log=log.name)  # the job agent too
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert group_alive(proc.pid) == [], "ray head processes left behind"


@pytest.fixture(scope="session")
def shipped_organism() -> Path:
    """The shipped organism directory (git-tracked: a missing one is a failure, whose message
    names the directory and the rebuild command)."""
    from crossmodal.organism import OrganismMissingError, organism_path

    try:
        return organism_path()
    except OrganismMissingError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def gcs():
    """A GCS server on 127.0.0.1 for the module (tests/gcs_server.py)."""
    from gcs_server import gcs_server

    with gcs_server() as server:
        yield server


@pytest.fixture(params=["s3", "gs"])
def service(request):
    """Each object-storage service in turn: the module's ``s3`` server, then ``gcs``."""
    return request.getfixturevalue("s3" if request.param == "s3" else "gcs")
