"""The output lock (crossmodal/store/lock.py): one writer per store or steering output.

Tricky cases: a holder in ANOTHER process (flock is per open file, so the holder runs in a
subprocess); a stale lock file of a dead pid on this host (taken over, with a message); a
pid that was reused by an unrelated process (its start time differs: stale); a pid that is
alive and the same process (refused even without a flock); a lock from another host
(refused: nothing here can check it); an empty lock file (a crash between create and
write); a release racing with an acquire (the inode check). The drivers' use of the lock
(collect, reduce, steer refuse a locked output before writing anything) is tested in
tests/test_bad_input.py and end to end in tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hold_lock

from crossmodal.store.lock import LOCK_NAME, LockError, LockInfo, OutputLock, pid_alive, read_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": 1,
        "host": socket.gethostname(),
        "started": "2026-01-01T00:00:00+00:00",
        "job": "collect",
        **fields,
    }
    (out / LOCK_NAME).write_text(json.dumps(info))


def test_acquire_writes_owner_and_release_removes_it(tmp_path):
    out = tmp_path / "store.zarr"
    with OutputLock(out, "collect") as lock:
        info = read_lock(out)
        assert info is not None and lock.held
        assert (info.pid, info.host, info.job) == (os.getpid(), socket.gethostname(), "collect")
        assert info.started.endswith("+00:00") and info.pid_start is not None
    assert not (out / LOCK_NAME).exists() and not lock.held
    lock.release()  # idempotent


def test_second_run_refuses_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "store.zarr"
    proc = hold_lock(out, "reduce")
    try:
        with pytest.raises(LockError) as err:
            OutputLock(out, "collect").acquire()
        message = str(err.value)
        assert "\n" not in message
        assert message == (
            f"output {str(out)!r} is locked by reduce run pid {proc.pid} on host "
            f"{socket.gethostname()!r} since {read_lock(out).started}; only one run may write "
            "an output at a time: wait for it to finish or choose another output"
        )
    finally:
        proc.communicate("")
    assert proc.returncode == 0
    with OutputLock(out, "collect") as lock:  # released: free again, and nothing taken over
        assert lock.took_over is None


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    out = tmp_path / "store.zarr"
    proc = hold_lock(out)
    proc.kill()  # SIGKILL: no release; the kernel drops the flock, the file stays
    proc.wait()
    assert read_lock(out).pid == proc.pid
    said: list[str] = []
    with OutputLock(out, "collect", echo=said.append) as lock:
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert read_lock(out).pid == os.getpid()
    assert said == [
        f"taking over the stale lock of {str(out)!r}: collect run pid {proc.pid} on host "
        f"{socket.gethostname()!r} since {lock.took_over.started} is gone (it did not finish; "
        "this run resumes what it left)"
    ]


def test_stale_lock_of_a_dead_pid_without_flock(tmp_path):
    out = tmp_path / "out"
    pid = _dead_pid()
    _write(out, pid=pid)
    said: list[str] = []
    with OutputLock(out, "steer", echo=said.append) as lock:
        assert lock.took_over.pid == pid and len(said) == 1 and f"pid {pid}" in said[0]


def test_a_reused_pid_is_stale_but_a_live_owner_is_not(tmp_path):
    out = tmp_path / "out"
    me = LockInfo(os.getpid(), socket.gethostname(), "t", "collect")
    own_start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert pid_alive(me.pid, own_start) and not pid_alive(me.pid, str(int(own_start) + 1))
    _write(out, pid=os.getpid(), pid_start=str(int(own_start) + 1))  # pid reused since
    with OutputLock(out, "collect", echo=lambda _: None) as lock:
        assert lock.took_over is not None
    _write(out, pid=os.getpid(), pid_start=own_start)  # alive, same process: refuse
    with pytest.raises(LockError, match=rf"is locked by collect run pid {os.getpid()} "):
        OutputLock(out, "collect").acquire()
    assert read_lock(out).pid_start == own_start  # untouched


def test_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    out = tmp_path / "out"
    _write(out, pid=_dead_pid(), host="gpu-node-7")
    with pytest.raises(LockError) as err:
        OutputLock(out, "collect").acquire()
    message = str(err.value)
    assert "was locked by collect run" in message and "on host 'gpu-node-7'" in message
    assert message.endswith(f"if that run is gone, delete {str(out / LOCK_NAME)!r}")
    (out / LOCK_NAME).unlink()
    with OutputLock(out, "collect") as lock:
        assert lock.took_over is None and read_lock(out).pid == os.getpid()


def test_empty_lock_file_is_no_owner(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("")  # a crash between creating and writing the file
    assert read_lock(out) is None
    with OutputLock(out, "collect") as lock:
        assert lock.took_over is None and read_lock(out).pid == os.getpid()


def test_release_racing_with_acquire_never_gives_two_holders(tmp_path):
    """Acquire opens the file, the holder releases (unlink + close), acquire gets the flock
    on the unlinked inode: the inode check makes it retry on the new file."""
    out = tmp_path / "out"
    first = OutputLock(out, "collect")
    first.acquire()
    stale_fd = os.open(out / LOCK_NAME, os.O_RDWR)  # what a racing acquire had opened
    first.release()
    import fcntl

    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds: the inode is unlinked
    from crossmodal.store.lock import _same_file

    assert not _same_file(stale_fd, out / LOCK_NAME)  # so acquire would not keep it
    with OutputLock(out, "collect") as second:  # a new file: locked for real
        assert second.held and read_lock(out).pid == os.getpid()
    os.close(stale_fd)
