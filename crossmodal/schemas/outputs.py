"""The output reference (docs/outputs.md), generated from the store and output schemas.

``store.schema.json`` declares the collect store (root attributes, every group and array);
``outputs.schema.json`` declares the rest once: what each dimension means and in which unit,
the groups reduce adds to the store, and the columns of the steering Parquet tables and the
set CSVs. This renders both as Markdown, so a researcher reads one page that cannot drift
from the code (tests regenerate it and compare, and compare the declared columns with the
tables the code builds).

Run: ``python -m crossmodal.schemas.outputs > docs/outputs.md`` (``make docs``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from crossmodal.schemas import load_schema

PLACEHOLDERS = ("<backend>", "<lang>", "<script>")
"""The placeholders a declared column name may hold (one column per value)."""


def _cell(text: Any) -> str:
    """One Markdown table cell: whitespace collapsed, pipes escaped, and ``<`` outside code
    spans escaped (``<family>`` is a placeholder, not an HTML tag)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


def _coordinate_text(name: str, spec: Mapping[str, Any], dims: Mapping[str, Any]) -> str:
    """An array's description; a label array without one gets its dimension's meaning."""
    if "description" in spec:
        return spec["description"]
    if list(spec["dims"]) == [name] and name in dims:
        return f"Labels of the {name} dimension (a coordinate): {dims[name]['description']}"
    raise ValueError(
        f"array description must be one of [given, or a label array of a declared dimension], "
        f"got neither for {name!r}; describe it in crossmodal/schemas/"
    )


def _attr_rows(props: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for name, spec in props.items():
        kind = spec.get("type", f"`{spec['const']}`" if "const" in spec else "any")
        yield f"| `{prefix}{name}` | {kind} | {_cell(spec.get('description', ''))} |"
        if "properties" in spec:
            yield from _attr_rows(spec["properties"], prefix=f"{prefix}{name}.")


def _group_section(name: str, spec: Mapping[str, Any], dims: Mapping[str, Any]) -> list[str]:
    out = [f"### `{name}`", "", _cell(spec.get("description", "")), ""]
    if not spec["arrays"]:
        return [*out, "Attributes only (no arrays).", ""]
    out += ["| array | dims | dtype | unit | description |", "| --- | --- | --- | --- | --- |"]
    for array, a in spec["arrays"].items():
        text = _coordinate_text(array, a, dims)
        if "fill" in a:
            text += f" Fill: {a['fill']}."
        shape = ", ".join(a["dims"])
        unit = a.get("unit") or dims.get(array, {}).get("unit", "")
        out.append(f"| `{array}` | `[{shape}]` | {a['dtype']} | {_cell(unit)} | {_cell(text)} |")
    return [*out, ""]


def _table_section(name: str, spec: Mapping[str, Any]) -> list[str]:
    out = [f"### `{name}`", "", _cell(spec["description"]), ""]
    out += [f"- path: `{spec['path']}`", f"- rows: {spec['rows']}"]
    out += [f"- written by: `{spec['writer']}`", ""]
    out += ["| column | type | unit | description |", "| --- | --- | --- | --- |"]
    for c in spec["columns"]:
        row = f"| `{c['name']}` | {c['type']} | {_cell(c.get('unit', ''))} |"
        out.append(f"{row} {_cell(c['description'])} |")
    return [*out, ""]


def render() -> str:
    """Markdown: dimensions, the collect store, the reduce groups, the tables."""
    store, outputs = load_schema("store"), load_schema("outputs")
    dims = outputs["x-dimensions"]
    out = [
        "# Output reference",
        "",
        "Generated from `crossmodal/schemas/store.schema.json` and "
        "`crossmodal/schemas/outputs.schema.json` by `make docs`; do not edit.",
        "",
        _cell(outputs["description"]),
        "",
        "## Dimensions",
        "",
        "Every array of the store carries `dimension_names`, and a label array of the same name "
        "(a coordinate) gives the values along each dimension.",
        "",
        "| dimension | meaning | unit |",
        "| --- | --- | --- |",
    ]
    out += [
        f"| `{d}` | {_cell(s['description'])} | {_cell(s.get('unit', ''))} |"
        for d, s in dims.items()
    ]
    out += ["", f"## Collect store: {store['title']}", "", _cell(store["description"]), ""]
    out += ["### Root attributes", "", "| attribute | type | description |", "| --- | --- | --- |"]
    out += [*_attr_rows(store["properties"]), ""]
    for name, spec in store["x-groups"].items():
        out += _group_section(name, spec, dims)
    out += ["## Groups reduce adds to the store", ""]
    for name, spec in outputs["x-groups"].items():
        out += _group_section(name, spec, dims)
    out += [
        "## Tables",
        "",
        "A column name with a placeholder stands for one column per value:",
        "",
    ]
    out += [f"- `{k}`: {_cell(v)}" for k, v in outputs["x-placeholders"].items()]
    out.append("")
    for name, spec in outputs["x-tables"].items():
        out += _table_section(name, spec)
    return "\n".join(out)


def declared_columns(
    table: str,
    *,
    backends: Sequence[str] = (),
    languages: Sequence[str] = (),
    scripts: Sequence[str] = (),
) -> list[str]:
    """The column names ``table`` (a key of ``x-tables``) has for these placeholder values,
    in declared order: ``lid_<backend>_p_<lang>`` becomes one column per (backend, language).

    Raises:
        KeyError: ``table`` is not declared.
    """
    spec = load_schema("outputs")["x-tables"][table]
    values = {"<backend>": backends, "<lang>": languages, "<script>": scripts}
    names: list[str] = []
    for column in spec["columns"]:
        held = [p for p in PLACEHOLDERS if p in column["name"]]
        for combo in itertools.product(*(values[p] for p in held)):
            name = column["name"]
            for placeholder, value in zip(held, combo, strict=True):
                name = name.replace(placeholder, value)
            names.append(name)
    return names


def dimension_names() -> list[str]:
    """Every dimension ``outputs.schema.json`` declares."""
    return list(load_schema("outputs")["x-dimensions"])


if __name__ == "__main__":
    print(render(), end="")
