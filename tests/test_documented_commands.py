"""Every documented command runs as written (tests/documented.py has the conventions).

The blocks run in order in ONE fresh copy of the repository (the files git tracks or would
track, plus a view of this interpreter's virtual environment as ``.venv``) with the venv
first on PATH, against the shipped organism, each with a timeout. Ray is isolated from the
host's other clusters: ``RAY_TMPDIR`` is this test's own directory, and the ports
``make cluster-up`` uses (``RAY_PORT``, ``RAY_DASHBOARD_PORT``, ``RAY_CLIENT_PORT``,
``RAY_AGENT_PORT``) and ``RAY_API_SERVER_ADDRESS`` (which ``ray job submit`` prefers to its
``--address``) are free ones. The README's ``ray job submit`` block runs first and does the
demo's work inside a Ray job; every later block (``make demo`` included) resumes its outputs.
``gpu``/``cloud`` blocks are checked with ``bash -n`` (or compiled) and every config they name
must validate (``crossmodal validate``; other YAML must parse). A failure names the file and
line of the command.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from documented import Block, documented_blocks, named_files
from helpers import free_ports

from crossmodal.cli import main

REPO = Path(__file__).resolve().parent.parent
BLOCKS = documented_blocks(REPO)
TIMEOUT_S = 300
LONG_TIMEOUT_S = 1800
"""The block that does the demo's work (collect, reduce, steer, report: ~3 min on 2 cores)."""


def _venv_view(dest: Path) -> None:
    """``dest`` as this interpreter's venv (every entry linked) with a fresh install stamp,
    so ``make`` targets that depend on ``setup`` find it done and never run pip."""
    dest.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed-stamp":
            (dest / entry.name).symlink_to(entry)
    (dest / ".installed-stamp").touch()


@pytest.fixture(scope="module")
def fresh_repo(tmp_path_factory):
    """A copy of the repository's files as a fresh clone has them, and the environment."""
    root = tmp_path_factory.mktemp("clone") / "crossmodal"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    _venv_view(root / ".venv")
    ray_tmp = Path(f"/tmp/cmdoc{os.getpid()}")  # short: unix socket paths are limited
    ray_tmp.mkdir(exist_ok=True)
    names = ("PORT", "DASHBOARD_PORT", "CLIENT_PORT", "AGENT_PORT")
    ports = {k: str(p) for k, p in zip(names, free_ports(len(names)), strict=True)}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CROSSMODAL_"))},
        "PATH": f"{root / '.venv' / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
        **{f"RAY_{k}": v for k, v in ports.items()},
    }
    for key in ("VIRTUAL_ENV", "PWD", "OLDPWD"):
        env.pop(key, None)
    yield root, env
    pid = ray_tmp / "ray" / "crossmodal-head.pid"
    if pid.is_file() and pid.read_text().strip():  # a block failed between up and down
        subprocess.run(["make", "cluster-down"], cwd=root, env=env, capture_output=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _check_configs(block: Block, root: Path) -> list[str]:
    """Problems with the files a gpu/cloud block names: configs/ ones must validate, cluster/
    ones must exist and parse, any other that exists must parse."""
    problems = []
    for name in named_files(block.text):
        path = root / name
        if name.startswith(("configs/", "cluster/")) and not path.is_file():
            problems.append(f"names {name}, which does not exist")
        elif name.startswith("configs/"):
            result = CliRunner().invoke(main, ["validate", str(path)])
            if result.exit_code != 0:
                problems.append(f"{name} does not validate: {result.output.strip()}")
        elif path.is_file():
            try:
                list(yaml.safe_load_all(path.read_text()))
            except yaml.YAMLError as err:
                problems.append(f"{name} does not parse: {err}")
    return problems


def _check_only(block: Block, root: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        compile(block.text, block.where, "exec")
        problems = []
    elif block.mode == "suite":
        cmd = ["bash", "-c", block.text.replace("make ", "make -n ")]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        problems = [] if proc.returncode == 0 else [f"make -n: {proc.stderr.strip()}"]
    else:
        proc = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
        problems = [] if proc.returncode == 0 else [f"bash -n: {proc.stderr.strip()}"]
    problems += _check_configs(block, root)
    assert not problems, f"{block.where}: {block.mode} block:\n{block.text}" + "\n".join(problems)


def _run(block: Block, root: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        cmd = [str(root / ".venv" / "bin" / "python"), "-c", block.text]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    limit = LONG_TIMEOUT_S if "ray job submit" in block.text else TIMEOUT_S
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends all it started
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"{block.where}: documented command ran past {limit} s:\n{block.text}"
            f"{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    output = (stdout[-4000:] + "\n" + stderr[-4000:]).strip()
    assert proc.returncode == 0, (
        f"{block.where}: documented command failed (exit {proc.returncode}):\n{block.text}"
        f"--- output ---\n{output}"
    )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode != "run"], ids=lambda b: b.where)
def test_documented_block_is_valid(block, monkeypatch):
    """gpu/cloud/suite blocks: shell syntax (or Python that compiles) and the configs they name
    (stage paths in a pipeline config are relative to the repository root)."""
    monkeypatch.chdir(REPO)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    _check_only(block, REPO, env)


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "run"], ids=lambda b: b.where)
def test_documented_command_runs(block, fresh_repo):
    root, env = fresh_repo
    _run(block, root, env)
