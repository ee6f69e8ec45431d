"""The click CLI: every subcommand has --help ending with a runnable example; validate works."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "bench"])
def test_every_subcommand_has_help_with_example(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and name in result.output.split("Example")[1]


def test_bench_help_lists_its_flags(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"], standalone_mode=False)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--batch-sizes" in out and "--device" in out


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
