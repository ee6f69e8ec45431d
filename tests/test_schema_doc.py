"""docs/config-reference.md is exactly what the schemas generate (no drift)."""

from pathlib import Path

from crossmodal.schemas.doc import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"


def test_config_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "run `make docs` to regenerate docs/config-reference.md"


def test_every_top_level_field_is_documented() -> None:
    text = render()
    for field in (
        "`collect`",
        "`model`",
        "`steps`",
        "`data.audio_root`",
        "`set_sizes`",
        "`forcing`",
    ):
        assert field in text
