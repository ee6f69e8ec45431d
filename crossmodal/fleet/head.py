"""A local Ray head as one process group: wait until it takes jobs, stop only it.

``make cluster-up`` starts ``ray start --head --block`` in its own process group and then
waits here until the GCS, the dashboard and the dashboard agent answer: a head whose
dashboard is up but whose agent is not yet answers ``ray job submit`` with "No available
agent to submit job" (docs/platform.md, "Ray"). ``make cluster-down`` ends that group only;
``ray stop`` would end every Ray on the host. The tests' head fixture uses the same two
functions.

Example::

    python -m crossmodal.fleet.head wait --pid 1234 --ports 6379,8265,52365
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), 1).close()
        return True
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_ready(pid: int, ports: Sequence[int], *, timeout: float = 180.0, log: str = "") -> None:
    """Block until every port of ``ports`` accepts (GCS, dashboard, dashboard agent) and
    the dashboard (the second port) answers ``/api/version``.

    Raises:
        RuntimeError: the head's process ended, or ``timeout`` passed (one line naming the log).
    """
    deadline = time.time() + timeout
    dashboard = f"http://127.0.0.1:{ports[1]}/api/version" if len(ports) > 1 else None
    while time.time() < deadline:
        if not group_alive(pid):
            raise RuntimeError(f"ray head (pid {pid}) exited; see {log or 'its log'}")
        if all(port_open(p) for p in ports) and (dashboard is None or _answers(dashboard)):
            return
        time.sleep(0.5)
    raise RuntimeError(f"ray head (pid {pid}) not ready after {timeout:.0f} s; see {log}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(pgid: int, *, timeout: float = 20.0) -> None:
    """SIGTERM process group ``pgid``, then SIGKILL what is left, until none of it runs."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while group_alive(pgid):
        if time.time() > deadline - timeout / 2:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
        if time.time() > deadline:
            raise RuntimeError(f"ray head group {pgid} still running after {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossmodal.fleet.head", description=__doc__)
    parser.add_argument("action", choices=["wait", "stop"])
    parser.add_argument("--pid", type=int, required=True, help="the head's process group id")
    parser.add_argument("--ports", default="", help="wait: comma-separated GCS,dashboard,agent")
    parser.add_argument("--log", default="", help="wait: the head's log, named on failure")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="default: 180 s (wait), 20 s (stop)"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "wait":
            ports = [int(p) for p in args.ports.split(",") if p]
            wait_ready(args.pid, ports, timeout=args.timeout or 180.0, log=args.log)
        else:
            stop_group(args.pid, timeout=args.timeout or 20.0)
    except RuntimeError as err:
        print(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
