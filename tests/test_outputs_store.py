"""Every group and array of a collected and reduced store is declared, with its dims and dtype.

A tiny store (3 languages, speech and text, x2en + en2x, 3 examples each;
:func:`helpers.local_collect`) is reduced in-process (Ray replaced by stand-ins, as
tests/test_reduce_faults.py does), then compared with ``store.schema.json`` (the collect
groups) and ``outputs.schema.json`` (the groups reduce adds), the two sources of
docs/outputs.md: a group or array the code writes and the reference does not name fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from crossmodal.schemas import load_schema

pytestmark = pytest.mark.integration
FAMILY = "decoder"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> Path:
    from helpers import LocalSession, build_model_dir, collect_config, local_collect

    from crossmodal.reduce import driver

    root = tmp_path_factory.mktemp("outputs")
    model = build_model_dir(root / "model")
    raw = collect_config(
        model, root / "s.zarr", modalities=["speech", "text"], families=[FAMILY], keep_parts=False
    )
    with pytest.MonkeyPatch.context() as mp:
        local_collect(mp, raw)
        mp.setattr(driver, "RaySession", LocalSession)
        driver.run_reduce(raw["output"], k=2, scopes=("all",), progress=False, echo=lambda _: None)
    return Path(raw["output"])


def _declared() -> dict[str, dict]:
    groups = {**load_schema("store")["x-groups"], **load_schema("outputs")["x-groups"]}
    return {g.replace("<family>", FAMILY): spec for g, spec in groups.items()}


def _dtype(arr: zarr.Array) -> str:
    return "string" if arr.dtype.kind in "OUT" else str(arr.dtype)


def test_every_group_of_a_reduced_store_is_declared(reduced) -> None:
    root = zarr.open_group(str(reduced), mode="r")
    declared = _declared()
    written = {path for path, node in root.members(max_depth=None) if isinstance(node, zarr.Group)}
    undeclared = sorted(
        g
        for g in written
        if g not in declared
        and not any(d.startswith(f"{g}/") for d in declared)  # parents like stats/
        and not (g.count("/") == 2 and g.rsplit("/", 1)[0] in declared)  # <group>/<pooling>
    )
    assert undeclared == [], "declare these groups in crossmodal/schemas/outputs.schema.json"


def test_declared_reduce_arrays_match_the_store(reduced) -> None:
    root = zarr.open_group(str(reduced), mode="r")
    for group, spec in load_schema("outputs")["x-groups"].items():
        g = root[group.replace("<family>", FAMILY)]
        names = {name for name, _ in g.arrays()}
        assert names == set(spec["arrays"]), (group, names ^ set(spec["arrays"]))
        for name, doc in spec["arrays"].items():
            arr = g[name]
            assert tuple(arr.metadata.dimension_names) == tuple(doc["dims"]), (group, name)
            assert _dtype(arr) == doc["dtype"], (group, name, arr.dtype)
