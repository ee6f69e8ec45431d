"""The labels of a collect store's axes, as the reduce passes write and address them.

Collect labels its statistics ``[task, modality, language, step, pooling, unit]``; reduce
writes per-condition results ``[task, modality, step, language, unit]`` (:data:`COND` then
``unit``) and gives every unit the coordinates of :data:`UNIT_COORDS`, read from the unit
table (``units/<family>``): its layer, its submodule group (``self_attn``, ``cross_attn``,
``ffn`` or ``other``; docs/method.md, "Units"), its site address, its feature, and whether
its value is step-invariant (computed from the encoder output alone).
"""

from __future__ import annotations

import numpy as np
import zarr

from crossmodal.store.datasets import unicode
from crossmodal.store.names import stats_group, units_group

COND = ("task", "modality", "step", "language")
"""The condition axes of every reduce result, in order (``unit`` follows)."""
UNIT_COORDS = ("layer", "submodule", "site", "feature", "step_invariant")
"""The coordinates of the ``unit`` axis (``step_invariant``: the unit's value cannot depend on
the decoding step, :attr:`crossmodal.model.units.Site.step_invariant`)."""
SUBMODULES = ("self_attn", "cross_attn", "ffn")
"""The submodules selection ranks by; every other site's submodule is ``other``."""


def store_labels(root: zarr.Group, family: str) -> dict[str, np.ndarray]:
    """Every label of ``family``: the axes of :data:`COND`, ``unit`` and :data:`UNIT_COORDS`."""
    sg, ug = root[stats_group(family)], root[units_group(family)]
    site = ug["unit_site"][...]
    sub = unicode(ug["site_submodule"][...])[site]
    return {
        "task": sg["task"][...],
        "modality": sg["modality"][...],
        "step": sg["step"][...],
        "language": sg["language"][...],
        "unit": ug["unit"][...],
        "layer": ug["unit_layer"][...].astype(np.int32),
        "submodule": np.where(np.isin(sub, SUBMODULES), sub, "other"),
        "site": unicode(ug["site_name"][...])[site],
        "feature": ug["unit_feature"][...],
        "step_invariant": unicode(ug["site_positions"][...])[site] != "decoder",
    }
