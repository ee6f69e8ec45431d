"""The installed wheel works on its own: package data ships, nothing reads the source tree.

A wheel is built (non-editable) from a copy of the repository, installed with ``--no-deps``
into a fresh virtual environment, and run from a working directory outside the repository.
The dependencies come from the project's environment through a ``.pth`` line naming its
site-packages directory: a path added that way is put on ``sys.path`` without its own ``.pth``
files being run, so the editable install's import hook stays off and ``crossmodal`` is imported
from the wheel. Nothing touches the network (``--no-index``, ``--no-deps``, no build isolation).

Marked integration: copying, building and installing take about 10 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "crossmodal", "jobs")
"""What the build needs: a copy keeps ``build/`` and ``*.egg-info`` out of the checkout."""

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import crossmodal
    from crossmodal.collect.config import load_config
    from crossmodal.organism import organism_path
    from crossmodal.schemas import load_schema

    venv, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    here = Path(crossmodal.__file__).resolve()
    assert here.is_relative_to(venv), f"crossmodal imported from {here}, not from {venv}"
    assert not Path.cwd().resolve().is_relative_to(repo), Path.cwd()
    cfg = load_config("organism.yaml")
    assert cfg.model == "organism" and cfg.steps == (1, 6, 11), cfg
    store = load_schema("store")
    assert store["type"] == "object" and store["properties"], sorted(store)
    assert organism_path().resolve().is_relative_to(venv), organism_path()
    print("ok", here)
    """
)


def _pip(*args: str, cwd: Path) -> None:
    """This environment's pip, offline; a failure shows pip's output."""
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert run.returncode == 0, f"pip {' '.join(args)}\n{run.stdout}\n{run.stderr}"


def _build_wheel(tmp: Path) -> Path:
    """A wheel of a copy of the repository, built with this environment's setuptools."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(dist),
        str(src),
        cwd=tmp,
    )
    (wheel,) = dist.glob("crossmodal-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv with only the wheel installed; this environment's packages visible through a .pth."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel), cwd=tmp)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_project_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return env_dir


@pytest.mark.integration
def test_installed_wheel_validates_configs_outside_the_repository(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("store.schema.json", "collect.schema.json", "steer.schema.json"):
        assert f"crossmodal/schemas/{data}" in names, data
    assert "crossmodal/organism_model/model.safetensors" in names
    env_dir = _fresh_venv(tmp_path, wheel)

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy2(REPO / "configs" / "organism.yaml", work / "organism.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", CHECK, str(env_dir), str(REPO)],
        cwd=work,
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok "), run.stdout
