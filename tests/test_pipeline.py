"""The pipeline (collect -> reduce -> steer -> report) and its end-to-end `ray job submit` run.

Edge cases: a pipeline config naming a missing or invalid stage config lists every error at
once; stage paths resolve against the working directory first (what `--working-dir .` ships);
the job's outputs are read back from outside the job with xarray and pyarrow; the Ray head is
stopped and leaves no process behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import xarray as xr
import yaml
from conftest import submit_job

from crossmodal.pipeline import format_headline, load_pipeline, steering_headline
from crossmodal.schemas import ConfigError
from crossmodal.store import results

REPO = Path(__file__).resolve().parent.parent


def _small_pipeline(tmp_path: Path) -> Path:
    """The demo pipeline shrunk to a few sentences, one steering language pair, k=50."""
    collect = yaml.safe_load((REPO / "configs" / "organism.yaml").read_text())
    collect["data"]["examples_per_language"] = 8
    collect.update(output=str(tmp_path / "organism.zarr"), shard_size=8, pilot_size=24)
    collect["actors"] = {**collect["actors"], "count": 1}
    steer = yaml.safe_load((REPO / "configs" / "steer-organism.yaml").read_text())
    steer.update(
        roles=["control"],
        unit_modalities=["speech"],
        input_modalities=["text"],
        steps=[1],
        languages=["deu"],
        set_sizes=[50],
        random_seeds=[0],
        n_inputs=8,
        output=str(tmp_path / "steer"),
    )
    steer["selectivity"]["path"] = str(tmp_path / "organism.zarr")
    steer["actors"] = {**steer["actors"], "count": 1}
    (tmp_path / "collect.yaml").write_text(yaml.safe_dump(collect))
    (tmp_path / "steer.yaml").write_text(yaml.safe_dump(steer))
    pipeline = {
        "collect": str(tmp_path / "collect.yaml"),
        "reduce": {"k": 50, "scopes": ["all"]},
        "steer": str(tmp_path / "steer.yaml"),
        "report": {"out": str(tmp_path / "report")},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_pipeline_config_reports_every_error(tmp_path) -> None:
    bad_collect = tmp_path / "c.yaml"
    bad_collect.write_text(yaml.safe_dump({"model": "organism", "steps": [0], "tasks": ["x2y"]}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"collect": str(bad_collect), "reduce": {"k": 0}}))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert len(err.value.errors) == 1 and "reduce.k" in err.value.errors[0]
    path.write_text(yaml.safe_dump({"collect": str(bad_collect)}))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    joined = "\n".join(err.value.errors)
    assert "x2y" in joined and "steps" in joined and all("\n" not in e for e in err.value.errors)


def test_shipped_pipeline_configs_validate() -> None:
    for name in ("pipeline-organism.yaml", "pipeline-reference.yaml"):
        config = load_pipeline(REPO / "configs" / name)
        assert config.collect_path.is_file()


def test_steering_headline_compares_selected_with_random() -> None:
    import pandas as pd

    summary = pd.DataFrame(
        {
            "kind": ["selected", "selected", "random", "baseline", "selected"],
            "role": ["control", "control", "control", None, "representation"],
            "unit_modality": ["speech", "speech", "speech", None, "speech"],
            "input_modality": ["text", "text", "text", "text", "text"],
            "target_share": [0.8, 0.6, 0.1, 0.0, 0.3],
        }
    )
    h = steering_headline(summary)
    assert h["selected_target_share"] == pytest.approx(0.7)
    assert h["random_target_share"] == pytest.approx(0.1)
    assert (h["n_selected_cells"], h["n_random_cells"]) == (2, 1)


@pytest.mark.integration
def test_ray_job_submit_pipeline_end_to_end(shipped_organism, ray_head, tmp_path) -> None:
    """Start a head, submit the organism pipeline, read results back, stop the head."""
    config = _small_pipeline(tmp_path)
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = submit_job(
        [
            ray_bin,
            "job",
            "submit",
            "--address",
            ray_head["dashboard"],
            "--working-dir",
            ".",
            "--",
            sys.executable,
            "-m",
            "jobs.pipeline",
            str(config),
            "--no-progress",
        ],
        cwd=REPO,
        env=ray_head["env"],
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "succeeded" in proc.stdout and "== done ==" in proc.stdout
    store = tmp_path / "organism.zarr"
    sel = results.open(store).selectivity()
    xr.open_zarr(store, group="stats/decoder", consolidated=False)  # labelled without the API
    assert {"task", "modality", "step", "language", "unit"} <= set(sel.dims)
    ap = sel["ap"].sel(task="x2en", modality="text", step=1, language="deu").values
    assert ((ap >= 0) & (ap <= 1)).all()
    table = pq.read_table(tmp_path / "steer" / "results.parquet")
    assert table.num_rows > 0 and "text" in table.column_names
    assert (tmp_path / "report" / "summary.md").is_file()
    assert "step-1 speech/text overlap" in proc.stdout


def test_format_headline_lists_paths_and_numbers() -> None:
    text = format_headline(
        {
            "store": "s.zarr",
            "report": "r",
            "steer": "st",
            "headline": {
                "overlap_step1_x2en": {
                    "diagonal_mean": 12.0,
                    "random_expected": 0.5,
                    "offdiag_mean": 3.0,
                },
                "control_steering": {"selected_target_share": 0.7, "random_target_share": 0.05},
                "capture_examples_per_s": 42.0,
            },
        }
    )
    assert "same language 12.0 units vs random 0.50" in text
    assert "70% vs random units 5%" in text and "42.0 examples/s" in text
