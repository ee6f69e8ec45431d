"""Several Ray nodes on one machine: actors spread, a whole node lost mid-run, unshared outputs.

The cluster is three ``ray start --block`` processes (a head and two workers), each with its
OWN ``--temp-dir`` (sessions, sockets, logs, spilled objects), its own ports and its own
process group, so nothing can rely on a path only the driver's node sees. Killing a node
SIGKILLs its ``ray start`` process group and every descendant of it (Ray's worker processes
run in groups of their own): its raylet, its agents and its actors die at once, as when a
machine is lost. The head runs the GCS with a short health check (``RAY_health_check_*``),
so a killed node is declared dead within about 5 s instead of Ray's default 30 s.

Integration (marked):
- collect: three Collector actors land on three different nodes (each node's own log
  directory shows one); a worker node is killed right after the first work unit is
  recorded; the run finishes on the two nodes left and the store (every array, attribute
  and manifest entry, parts kept) is identical to a clean in-process run;
- steer: the same for the steering fleet, its output in a bucket of the local S3 server
  (tests/s3_server.py): three SteerWorkers on three nodes, a worker node killed after the
  first part landed; results and summary tables identical to a clean local run;
- a node that does not see the local output (``CROSSMODAL_FAULT_NODE_ROOT``, the test switch
  in crossmodal/fleet/faults.py) makes collect and steer refuse in one line naming the fix,
  before any actor starts; the store records no work.
Unit: the check's switches (URL outputs and one-node clusters are not probed) and the node
view.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import zarr
from helpers import free_ports
from s3_server import S3Server, s3_server

from crossmodal.fleet.faults import NODE_ROOT_ENV, node_view
from crossmodal.fleet.shared import CHECK_PREFIX, check_output_shared, is_local

RAY = str(Path(sys.executable).parent / "ray")
# A killed node refuses the check's connection at once, so it is declared dead after about
# threshold x period (5 s); a live node starved of CPU (2 cores, a Torch run beside it) must
# miss threshold checks of timeout each (25 s) in a row before it is wrongly declared dead.
FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
}


NODE_PORTS = (
    "node-manager-port",  # first: it names the node in ``ray.nodes()`` (NodeManagerPort)
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Ray's workers leave the node's process group)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    kids: dict[int, list[int]] = {}
    for row in rows.splitlines():
        child, parent = (int(x) for x in row.split())
        kids.setdefault(parent, []).append(child)
    out, stack = [], [pid]
    while stack:
        out.append(stack.pop())
        stack += kids.get(out[-1], [])
    return out


class LocalCluster:
    """A head and worker nodes as ``ray start --block`` processes under ``root``, one
    temp dir and one process group per node; :meth:`kill` loses a whole node."""

    def __init__(self, root: Path) -> None:
        self.port, client, dashboard = free_ports(3)
        self.root = root
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}  # the live ones
        self.names: list[str] = []  # every node started, in order
        self.manager_port: dict[str, int] = {}
        head = [
            "--head",
            f"--port={self.port}",
            f"--ray-client-server-port={client}",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=false",
        ]
        self._start("head", head, FAST_HEALTH_CHECK)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not start; see {root / 'head.log'}")

    def temp_dir(self, name: str) -> Path:
        return Path(f"/tmp/cmn{os.getpid()}{name}")  # short: unix socket paths are limited

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        cmd = [RAY, "start", "--block", "--num-cpus=1", "--num-gpus=0", *args]
        cmd += [f"--temp-dir={self.temp_dir(name)}", "--node-ip-address=127.0.0.1"]
        ports = free_ports(len(NODE_PORTS))  # several nodes share this machine
        cmd += ["--disable-usage-stats"]
        cmd += [f"--{flag}={port}" for flag, port in zip(NODE_PORTS, ports, strict=True)]
        self.names.append(name)
        self.manager_port[name] = ports[0]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the node
        self.nodes[name] = subprocess.Popen(
            cmd, env={**self.env, **env}, start_new_session=True, stdout=log, stderr=log
        )
        log.close()

    def add_worker(self, name: str, env: dict[str, str] | None = None) -> None:
        self._start(name, [f"--address={self.address}"], env or {})

    def alive_names(self) -> set[str]:
        """The nodes the GCS counts alive (a short-lived driver connection)."""
        script = (
            "import ray; ray.init(log_to_driver=False); "
            "print('alive', *[n['NodeManagerPort'] for n in ray.nodes() if n['Alive']])"
        )
        env = {**self.env, "RAY_ADDRESS": self.address}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("alive")]
        ports = {int(port) for port in rows[-1]} if rows else set()  # Ray prints lines too
        return {name for name, port in self.manager_port.items() if port in ports}

    def alive(self) -> int:
        return len(self.alive_names())

    def wait_alive(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while self.alive() != n:
            if time.time() > deadline:
                raise RuntimeError(f"expected {n} alive Ray nodes; logs under {self.root}")
            time.sleep(1)

    def kill_lost(self, timeout: float = 60) -> None:
        """Kill every started node the GCS has not counted alive within ``timeout`` (a node
        it declared dead never rejoins, even if its processes run on)."""
        deadline = time.time() + timeout
        while (lost := set(self.nodes) - self.alive_names()) and time.time() < deadline:
            time.sleep(1)
        for name in lost:
            self.kill(name)

    def kill(self, name: str) -> None:
        """SIGKILL the node's process group and every descendant: the whole node at once."""
        proc = self.nodes.pop(name)
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def actor_nodes(self, actor: str) -> set[str]:
        """The nodes whose own log directory shows an ``actor`` actor (Ray's
        ``:actor_name:`` line in the worker's output file)."""
        marker = f":actor_name:{actor}"
        return {
            name
            for name in self.names
            if any(
                marker in p.read_text(errors="replace")
                for p in self.temp_dir(name).glob("session_*/logs/worker-*")
                if p.is_file()
            )
        }

    def close(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        for name in self.names:
            subprocess.run(["rm", "-rf", str(self.temp_dir(name))], check=False)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """The local S3 server (tests/s3_server.py), started before the cluster so every node's
    environment holds its (dummy) credentials, as a cloud node's provider chain would."""
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.add_worker("w1")
        c.add_worker("w2")
        c.wait_alive(3)
        yield c
    finally:
        c.close()


def _kill_when(cluster: LocalCluster, ready: Callable[[], bool], actor: str) -> threading.Thread:
    """A thread that kills the first worker node running an ``actor`` once ``ready()``."""

    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            spread = cluster.actor_nodes(actor)
            victims = sorted(spread & set(cluster.nodes) - {"head"})
            if victims and _safe(ready):
                cluster.kill(victims[0])
                watch.killed, watch.spread = victims[0], spread  # type: ignore[attr-defined]
                return
            time.sleep(0.1)

    watch.killed, watch.spread = None, set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=watch, daemon=True)
    thread.watch = watch  # type: ignore[attr-defined]
    thread.start()
    return thread


def _safe(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except Exception:  # a file the driver is writing right now
        return False


def _three_nodes(cluster: LocalCluster) -> None:
    """Back to a head and two workers: a new worker for each one an earlier test killed or
    the GCS declared dead."""
    cluster.kill_lost()
    assert "head" in cluster.nodes, f"the Ray head was lost; logs under {cluster.root}"
    while len(cluster.nodes) < 3:
        cluster.add_worker(f"w{len(cluster.names)}")
    cluster.wait_alive(3)


# ------------------------------------------------------------------------------ unit


def test_the_node_view_switch_reroots_paths():
    assert node_view("/data/out.zarr", {}) == Path("/data/out.zarr")
    assert node_view("/data/out.zarr", {NODE_ROOT_ENV: "/tmp/x"}) == Path("/tmp/x/data/out.zarr")
    assert node_view("rel/out", {NODE_ROOT_ENV: "/tmp/x"}) == Path("rel/out")


def test_urls_and_one_node_clusters_are_not_probed(tmp_path):
    assert is_local(tmp_path) and is_local("results/x.zarr")
    assert not is_local("s3://bucket/x.zarr") and not is_local("gs://b/x")
    check_output_shared(None, "s3://bucket/x.zarr")  # would fail on touching ray
    one = SimpleNamespace(
        get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "a"),
        nodes=lambda: [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}],
        remote=lambda **_: pytest.fail("a one-node cluster was probed"),
    )
    check_output_shared(one, tmp_path / "out")
    assert not list(tmp_path.rglob(f"{CHECK_PREFIX}*"))


# ------------------------------------------------------------------------------ collect


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from helpers import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model"))


def _collect_raw(model_dir: Path, out: Path) -> dict:
    """4 conditions x 3 one-example work units, 3 actors of a quarter CPU."""
    from helpers import collect_config

    actors = {"count": 3, "num_cpus": 0.25, "max_restarts": 1, "max_task_retries": 1}
    return collect_config(model_dir, out, shard_size=1, actors=actors)


@pytest.mark.integration
def test_collect_survives_losing_a_worker_node(cluster, model_dir, tmp_path, capfd):
    from compare_runs import compare_store
    from helpers import local_collect

    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect
    from crossmodal.store.verify import verify_store

    _three_nodes(cluster)
    clean, out = tmp_path / "clean.zarr", tmp_path / "nodes.zarr"
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, _collect_raw(model_dir, clean))

    def one_unit_recorded() -> bool:
        return len(zarr.open_group(str(out), mode="r")["manifest"].attrs["parts"]) >= 1

    killer = _kill_when(cluster, one_unit_recorded, "Collector")
    config = load_config(_collect_raw(model_dir, out))
    result = run_collect(config, address=cluster.address, progress=False, echo=lambda _: None)
    killer.join(timeout=5)
    assert killer.watch.killed is not None, "no worker node was killed"
    assert len(killer.watch.spread) == 3, killer.watch.spread  # one Collector per node
    assert result["ran"] == result["work_units"] == 12
    assert "ran again on a restarted Collector actor" in capfd.readouterr().err
    roots = sorted([str(clean), str(out)], key=len, reverse=True)
    assert compare_store(clean, out, roots) == []
    assert verify_store(out).ok


# ------------------------------------------------------------------------------ steer


@pytest.fixture(scope="module")
def steer_root(model_dir, tmp_path_factory) -> Path:
    """``root/model`` (the tiny model) and ``root/sel.zarr`` (synthetic selectivity)."""
    from helpers import steer_selectivity

    from crossmodal.model.load import load_model

    root = tmp_path_factory.mktemp("steer")
    (root / "model").symlink_to(model_dir)
    steer_selectivity(load_model(str(model_dir)).model, root / "sel.zarr")
    return root


STEER_ACTORS = {"count": 3, "num_cpus": 0.25, "num_gpus": 0, "max_restarts": 1}


def _tables(out: str, options: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and summary tables of the steering run at ``out`` (a path or a URL)."""
    res = pd.read_parquet(f"{out}/results.parquet", storage_options=options)
    summ = pd.read_parquet(f"{out}/summary.parquet", storage_options=options)
    return (
        res.sort_values(["cell_id", "input_id"]).reset_index(drop=True),
        summ.sort_values("cell_id").reset_index(drop=True),
    )


@pytest.mark.integration
def test_steer_survives_losing_a_worker_node(cluster, steer_root, s3, capfd):
    """The steering output is on the local S3 server: part files land in the bucket from
    every node, and the resubmitted tasks' parts replace nothing already there."""
    from helpers import steer_config

    from crossmodal.steer.driver import consolidate, run_steer
    from crossmodal.steer.grid import expand, tasks
    from crossmodal.steer.parts import done_cells
    from crossmodal.steer.source import selectivity_digest
    from crossmodal.steer.worker import SteerWorker
    from crossmodal.store.location import register

    _three_nodes(cluster)
    clean = steer_config(steer_root, "clean", cells_per_task=1)
    worker = SteerWorker(clean, device="cpu")
    cells = expand(clean, selectivity_digest(clean.selectivity))
    for task in tasks(cells, clean.cells_per_task):
        worker(task)
    consolidate(clean, cells)

    actors = {**STEER_ACTORS, "max_task_retries": 1}
    url = f"s3://{s3.bucket()}/nodes"
    register(url, s3.options)  # for the watcher's listing of the parts
    config = steer_config(
        steer_root, "nodes", cells_per_task=1, actors=actors, output=url, storage_options=s3.options
    )
    killer = _kill_when(cluster, lambda: len(done_cells(config.output)) >= 1, "SteerWorker")
    result = run_steer(config, address=cluster.address, progress=False, echo=lambda _: None)
    killer.join(timeout=5)
    assert killer.watch.killed is not None, "no worker node was killed"
    assert len(killer.watch.spread) == 3, killer.watch.spread  # one SteerWorker per node
    assert result["ran"] == len(cells) and len(tasks(cells, 1)) >= 6
    assert "ran again on a restarted SteerWorker actor" in capfd.readouterr().err
    for got, want in zip(_tables(url, s3.options), _tables(clean.output), strict=True):
        pd.testing.assert_frame_equal(got, want)


# ------------------------------------------------------------------------------ refusal


@pytest.mark.integration
def test_an_output_a_node_does_not_see_is_refused_before_any_actor(
    cluster, model_dir, steer_root, tmp_path, monkeypatch
):
    """A fourth node whose filesystem is elsewhere (the test switch): collect, a standalone
    reduce and steer refuse in one line, exit status 2, before any actor or task starts;
    nothing is recorded."""
    from helpers import local_collect, steer_config

    from crossmodal.collect.config import load_config
    from crossmodal.collect.driver import run_collect
    from crossmodal.errors import explain
    from crossmodal.fleet.shared import UnsharedOutputError
    from crossmodal.reduce.driver import run_reduce
    from crossmodal.steer.driver import run_steer
    from crossmodal.steer.parts import done_cells

    _three_nodes(cluster)
    collected = tmp_path / "collected.zarr"  # finished without Ray, before the fourth node
    local_collect(monkeypatch, _collect_raw(model_dir, collected))
    monkeypatch.undo()  # the collects below use Ray again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cluster.add_worker("private", {NODE_ROOT_ENV: str(elsewhere)})
    try:
        cluster.wait_alive(4)
        out = tmp_path / "unshared.zarr"
        config = load_config(_collect_raw(model_dir, out))
        with pytest.raises(UnsharedOutputError) as err:
            run_collect(config, address=cluster.address, progress=False, echo=lambda _: None)
        failure = explain(err.value)
        assert failure.code == 2 and "\n" not in failure.line
        assert failure.line.startswith(f"output {str(out)!r} is a local path that 1 of 4 Ray ")
        assert failure.line.endswith(
            "use an s3:// or gs:// URL for output, or a volume every node mounts at that same path"
        )
        manifest = zarr.open_group(str(out), mode="r")["manifest"].attrs.asdict()
        assert manifest["parts"] == {} and manifest["edges"] == {}
        assert not list(out.rglob(f"{CHECK_PREFIX}*"))  # the check file is gone
        with pytest.raises(UnsharedOutputError) as err:
            run_reduce(collected, address=cluster.address, progress=False, echo=lambda _: None)
        assert explain(err.value).line.startswith(f"output {str(collected)!r} is a local path")
        assert "reduce" not in zarr.open_group(str(collected), mode="r").attrs
        assert not list(collected.rglob(f"{CHECK_PREFIX}*"))
        steer = steer_config(steer_root, "unshared", actors={**STEER_ACTORS, "count": 1})
        with pytest.raises(UnsharedOutputError, match="1 of 4 Ray nodes do not see"):
            run_steer(steer, address=cluster.address, progress=False, echo=lambda _: None)
        assert done_cells(steer.output) == set()
        assert cluster.actor_nodes("Collector") <= set(cluster.names) - {"private"}
    finally:
        cluster.kill("private")
        cluster.wait_alive(3)
