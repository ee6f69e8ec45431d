"""The pipeline config (collect -> reduce -> steer -> report) and its headline numbers.

Edge cases: a pipeline config naming a missing or invalid stage config lists every error at
once. The end-to-end run, as a `ray job submit` against a local head, is the README's
command in tests/test_documented_commands.py (its outputs read back by the README's
"Querying results" block).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crossmodal.pipeline import format_headline, load_pipeline, steering_headline
from crossmodal.schemas import ConfigError

REPO = Path(__file__).resolve().parent.parent


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


def test_headline_of_a_grid_without_cross_modal_control_cells_says_so() -> None:
    import pandas as pd

    summary = pd.DataFrame(  # representation units only: nothing to compare
        {
            "kind": ["selected", "random"],
            "role": ["representation", "representation"],
            "unit_modality": ["text", "text"],
            "input_modality": ["text", "text"],
            "target_share": [0.4, 0.1],
        }
    )
    h = {"control_steering": steering_headline(summary)}
    text = format_headline({"store": "s.zarr", "report": "r", "headline": h})
    assert "nan" not in text
    assert "this grid has no control units found on speech forced on text" in text
