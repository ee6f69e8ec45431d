"""Ray job entry points (recipes: wiring only; the logic lives in ``crossmodal``)."""
