"""The field-level difference between two configs, for a refusal a user can act on.

A resume compares config hashes; a bare hash mismatch does not say what changed. This lists
each changed leaf as ``config.steps: [1, 6, 11] -> [1, 6]`` (lists compared whole, mappings
field by field), so the user sees which edit made the store someone else's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_ABSENT = "(absent)"


def config_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "config"
) -> list[str]:
    """``<prefix>.<field>: <old> -> <new>`` for every field that differs, sorted by field;
    a field on one side only shows ``(absent)`` on the other."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}.{key}"
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += config_diff(a, b, where)
        elif a != b:
            lines.append(f"{where}: {_show(a)} -> {_show(b)}")
    return lines


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value)
