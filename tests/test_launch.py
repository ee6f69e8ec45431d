"""Launching: joining a Ray job's session without a runtime_env clash, the output root, the
refusal of an output inside a job's temporary working directory, and a stage config given to
the pipeline runner. The documented launches themselves run in test_documented_commands.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from ray.runtime_env.runtime_env import _merge_runtime_env

from crossmodal.cli import main
from crossmodal.fleet.faults import ENV_VARS as FAULT_VARS
from crossmodal.fleet.session import JOB_CONFIG_ENV, QUIET, actor_env, session_runtime_env
from crossmodal.pipeline import load_pipeline
from crossmodal.store.output_root import (
    OUTPUT_ROOT_ENV,
    OutputRootError,
    in_ray_job_copy,
    resolve_output,
)

REPO = Path(__file__).resolve().parent.parent
FAULT = FAULT_VARS[0]


def _job(env_vars: dict[str, str]) -> str:
    """What Ray's job supervisor puts in a job driver's environment."""
    return json.dumps({"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": env_vars}})


def test_outside_a_job_the_session_forwards_everything() -> None:
    environ = {"HF_HUB_OFFLINE": "1", FAULT: "collector:1"}
    env = session_runtime_env(environ, progress=False)
    assert env == {"env_vars": actor_env(environ, progress=False)}
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"][FAULT] == "collector:1"
    assert QUIET.items() <= env["env_vars"].items()


def test_inside_a_job_the_session_adds_only_what_the_job_leaves_unset() -> None:
    job_vars = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    environ = {**job_vars, FAULT: "collector:1", JOB_CONFIG_ENV: _job(job_vars)}
    env = session_runtime_env(environ)
    assert env["env_vars"].keys().isdisjoint(job_vars)
    assert env["env_vars"][FAULT] == "collector:1" and env["env_vars"]["RAY_AUTH_MODE"]
    merged = _merge_runtime_env(json.loads(environ[JOB_CONFIG_ENV])["runtime_env"], env)
    assert merged is not None  # what ray.init does in a job; None is "Failed to merge"
    assert merged["env_vars"] == {**job_vars, **env["env_vars"]}
    # the old behaviour, every variable passed again, is what Ray refuses
    assert _merge_runtime_env({"env_vars": job_vars}, {"env_vars": actor_env(environ)}) is None


def test_a_job_that_sets_everything_gets_no_runtime_env_from_the_session() -> None:
    job_vars = actor_env({"HF_HUB_OFFLINE": "1"})
    environ = {**job_vars, JOB_CONFIG_ENV: _job(job_vars)}
    assert session_runtime_env(environ) == {}


def test_relative_outputs_resolve_against_the_output_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_output("/abs/out.zarr", "/root") == "/abs/out.zarr"
    assert resolve_output("s3://bucket/out.zarr") == "s3://bucket/out.zarr"
    assert resolve_output("r/o.zarr", "/shared") == "/shared/r/o.zarr"
    assert resolve_output("r/o.zarr", environ={OUTPUT_ROOT_ENV: "/env"}) == "/env/r/o.zarr"
    assert resolve_output("r/o.zarr", "/cfg", environ={OUTPUT_ROOT_ENV: "/env"}) == "/cfg/r/o.zarr"
    assert resolve_output("r/o.zarr", environ={}) == str(tmp_path / "r/o.zarr")


def test_a_relative_output_in_a_jobs_temporary_copy_is_refused(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert in_ray_job_copy(copy) and not in_ray_job_copy(tmp_path)
    with pytest.raises(OutputRootError, match=OUTPUT_ROOT_ENV):
        resolve_output("results/o.zarr", environ={})
    assert resolve_output("results/o.zarr", environ={OUTPUT_ROOT_ENV: str(tmp_path)}) == str(
        tmp_path / "results/o.zarr"
    )


def test_collect_in_a_jobs_temporary_copy_fails_with_one_line(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    copy.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "configs" / "organism.yaml").read_text())
    (copy / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(copy)
    monkeypatch.delenv(OUTPUT_ROOT_ENV, raising=False)
    result = CliRunner().invoke(main, ["collect", "c.yaml", "--dry-run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: output must be one of") and OUTPUT_ROOT_ENV in lines[-1]
    assert "results/organism.zarr" in lines[-1]
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path / "kept"))
    result = CliRunner().invoke(main, ["collect", "c.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "kept" / "results" / "organism.zarr") in result.output


def test_the_pipeline_runner_refuses_a_collect_config_in_one_line() -> None:
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / "organism.yaml")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "got a collect config" in line and "`crossmodal collect " in line
    assert "configs/pipeline-organism.yaml" in line


def test_the_pipelines_output_root_wins_over_the_stage_configs(tmp_path) -> None:
    pipeline = yaml.safe_load((REPO / "configs" / "pipeline-organism.yaml").read_text())
    pipeline.update(
        collect=str(REPO / "configs" / "organism.yaml"),
        steer=str(REPO / "configs" / "steer-organism.yaml"),
        output_root=str(tmp_path),
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    config = load_pipeline(path)
    assert config.collect.output_root == config.steer.output_root == str(tmp_path)
    assert config.output_root == str(tmp_path)
    assert load_pipeline(REPO / "configs" / "pipeline-organism.yaml").collect.output_root is None
