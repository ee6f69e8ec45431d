"""Ends the Ray processes an in-process ``ray.init()`` started when its driver dies.

Killed with SIGKILL (the OOM killer, ``kill -9``), a driver leaves Ray's processes behind:
the GCS server and the raylet notice within about 2 s and exit, and so do the actor
processes, but the dashboard agent and the runtime-env agent then report the raylet's death
to the (dead) GCS with a fixed 60-second RPC timeout before they exit, holding memory and
ports for about a minute (measured on Ray 2.60; docs/reliability.md). No Ray setting
shortens it (``RAY_gcs_rpc_server_reconnect_timeout_s`` does not apply to that call).

So :class:`~crossmodal.fleet.session.RaySession` starts this watcher next to an in-process
Ray: ``python -m crossmodal.fleet.reaper DRIVER_PID RAY_DIR``, reading a pipe whose only
writer is the driver. Every second it records the driver's Ray processes (children whose
command runs from ``RAY_DIR``, the ``ray`` package, and all their descendants, with their
start times); when the pipe ends without the driver's "clean shutdown" byte, the driver is
gone, and it SIGKILLs every recorded process that is still the same process (same pid and
start time), so nothing else is ever touched. A clean ``RaySession.close()`` sends the byte
after ``ray.shutdown()`` and the watcher exits.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

CLEAN = b"c"
INTERVAL_S = 1.0


def _stat(pid: int) -> tuple[int, int, str] | None:
    """``(parent pid, start time in clock ticks, state)`` from ``/proc/PID/stat``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19]), fields[0]


def _table() -> dict[int, tuple[int, int, str]]:
    """Every process's ``_stat``, by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (row := _stat(int(entry))) is not None:
            out[int(entry)] = row
    return out


def ray_processes(driver_pid: int, ray_dir: str) -> dict[int, int]:
    """``{pid: start time}`` of the driver's children whose command runs from ``ray_dir``,
    and of all their descendants."""
    table = _table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    for child in kids.get(driver_pid, []):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ray_dir not in command:
            continue
        stack = [child]
        while stack:
            pid = stack.pop()
            out[pid] = table[pid][1]
            stack += kids.get(pid, [])
    return out


def kill(tracked: dict[int, int]) -> int:
    """SIGKILL each tracked process that still runs with the same start time; how many."""
    killed = 0
    for pid, started in tracked.items():
        row = _stat(pid)
        if row is None or row[1] != started or row[2] == "Z":
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def watch(driver_pid: int, ray_dir: str, fd: int = 0) -> int:
    """Record the driver's Ray processes until ``fd`` ends; kill them unless it ended
    clean. Returns how many it killed."""
    tracked: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([fd], [], [], INTERVAL_S)
        if ready:
            data = os.read(fd, 1)
            if data == CLEAN:
                return 0
            if not data:
                return kill(tracked)
        tracked.update(ray_processes(driver_pid, ray_dir))


class Reaper:
    """The driver's end of the watcher: started after ``ray.init()``, released on close."""

    def __init__(self, ray_dir: str) -> None:
        read, self._write = os.pipe()  # the write end is not inherited (PEP 446)
        cmd = [sys.executable, "-m", "crossmodal.fleet.reaper", str(os.getpid()), ray_dir]
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen(cmd, stdin=read, env=env, process_group=0)
        os.close(read)

    def release(self) -> None:
        """Ray was shut down cleanly: the watcher exits without killing anything (a watcher
        that already ended, e.g. on a system without ``/proc``, is no error)."""
        if self._write < 0:
            return
        try:
            os.write(self._write, CLEAN)
        except OSError:
            pass
        finally:
            os.close(self._write)
            self._write = -1
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _pythonpath() -> str:
    """This package's parent first, so the watcher imports the same ``crossmodal``."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (here, rest) if p)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    watch(int(argv[0]), argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
