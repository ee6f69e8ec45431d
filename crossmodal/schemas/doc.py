"""The config reference (docs/config-reference.md), generated from the JSON Schemas.

The schemas in ``crossmodal/schemas/`` are the single source of every field's type, default and
description; this renders them as Markdown tables so the README can link to a reference
that cannot drift (a test regenerates it and compares).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from crossmodal.schemas import CONFIG_SCHEMAS, load_schema


def _type(spec: Mapping[str, Any]) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    if "anyOf" in spec or "oneOf" in spec:
        return " or ".join(_type(s) for s in spec.get("anyOf", spec.get("oneOf", [])))
    kind = spec.get("type", "any")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and isinstance(spec.get("items"), Mapping):
        return f"list of {_type(spec['items'])}"
    return kind


def _rows(props: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, spec in props.items():
        key = f"{prefix}{name}"
        default = json.dumps(spec["default"]) if "default" in spec else "(required)"
        text = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
        yield key, _type(spec), default, text
        if spec.get("type") == "object" and "properties" in spec:
            yield from _rows(spec["properties"], prefix=f"{key}.")


def render(names: tuple[str, ...] = CONFIG_SCHEMAS) -> str:
    """Markdown: one section per schema, one table row per (nested) field."""
    out = [
        "# Config reference",
        "",
        "Generated from `crossmodal/schemas/` by `make docs`; do not edit.",
        "",
    ]
    for name in names:
        schema = load_schema(name)
        out += [f"## {schema.get('title', name)} (`crossmodal/schemas/{name}.schema.json`)", ""]
        out += [" ".join(str(schema.get("description", "")).split()), ""]
        out += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        out += [f"| `{k}` | {t} | `{d}` | {x} |" for k, t, d, x in _rows(schema["properties"])]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
