"""The click CLI: every subcommand has --help ending with a runnable example; validate works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from crossmodal.cli import main

REPO = Path(__file__).resolve().parent.parent
COMMANDS = sorted(main.commands)


def test_expected_subcommands_exist() -> None:
    assert {"run", "collect", "reduce", "steer", "report", "validate", "organism", "bench"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help_with_example(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and name in result.output.split("Example")[1]


def test_bench_help_is_plain_click_help_with_its_flags() -> None:
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("Usage: ") and "Options:" in out  # click's help, not argparse's
    assert "--batch-sizes INT,..." in out and "--device" in out and "--out" in out
    assert "\x1b[" not in out and "[bold" not in out and "[/" not in out  # no markup


def test_bench_flags_reach_the_benchmark(monkeypatch) -> None:
    import crossmodal.bench

    seen = {}
    cells = [{"modality": "text", "batch_size": 8}]

    def bench(out, **options):  # noqa: ANN001, ANN202
        seen.update(options, out=out)
        return {"cells": cells}

    monkeypatch.setattr(crossmodal.bench, "bench", bench)
    args = ["bench", "--batch-sizes", "8,32", "--modalities", "text", "--reducer", "false"]
    result = CliRunner().invoke(main, [*args, "--threads", "1", "--out", "b.json"])
    assert result.exit_code == 0, result.output
    assert seen["batch_sizes"] == (8, 32) and seen["modalities"] == ("text",)
    assert seen["reducer"] is False and seen["threads"] == 1 and seen["out"] == "b.json"
    assert seen["device"] is None and seen["repeats"] is None  # unset: the config's default
    cells.append({"modality": "text", "batch_size": 32, "error": "OutOfMemoryError: ..."})
    assert CliRunner().invoke(main, args).exit_code == 1  # a failed cell fails the command
    bad = CliRunner().invoke(main, ["bench", "--batch-sizes", "x"])
    assert bad.exit_code == 2 and "--batch-sizes': must be one of [INT,...], got 'x'" in bad.output


HEAVY = ("torch", "ray", "zarr", "transformers", "numpy", "xarray", "pyarrow", "numba")


def test_help_imports_nothing_heavy() -> None:
    """``--help`` of the group and of every subcommand loads none of the heavy libraries
    (lazy imports: it answers at once); checked on sys.modules in a fresh interpreter."""
    code = (
        "import sys\n"
        "from crossmodal.cli import main\n"
        "for args in [[]] + [[name] for name in sorted(main.commands)]:\n"
        "    try:\n"
        "        main([*args, '--help'], standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-2000:]


def test_validate_every_shipped_config() -> None:
    configs = sorted(str(p) for p in (REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    result = CliRunner().invoke(main, ["validate", *configs])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok") == len(configs)


def test_validate_reports_every_violation(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: organism\nsteps: [0]\ntasks: [x2y]\nbatch_size: -1\n")
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "INVALID" in result.output
    assert all(word in result.output for word in ("steps", "x2y", "batch_size"))
