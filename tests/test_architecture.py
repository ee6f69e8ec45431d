"""The layout's rules (docs/design.md, "Layout"), checked on the source tree itself.

- no import circle between the library's modules (module-level imports);
- the library never imports its entry points (``jobs``);
- every function outside the numeric kernels is under 60 lines;
- comments and docstrings cite documents of this repository only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "crossmodal"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))
KERNELS = {"crossmodal/stats/kernel.py"}  # numba kernels: one loop nest reads best whole
MAX_LINES = 60


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, *, top_level: bool) -> set[str]:
    nodes = tree.body if top_level else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    names = {_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        tree = ast.parse(path.read_text())
        found = _imports(tree, _name(path), top_level=True)
        graph[_name(path)] = {n for n in found if n in names and n != _name(path)}
    return graph


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_entry_points(path: Path) -> None:
    found = _imports(ast.parse(path.read_text()), _name(path), top_level=False)
    assert not {n for n in found if n == "jobs" or n.startswith("jobs.")}


def test_functions_are_short() -> None:
    long = []
    for path in MODULES:
        rel = str(path.relative_to(REPO))
        if rel in KERNELS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - first + 1
                if n >= MAX_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions of 60+ lines:\n" + "\n".join(long)


OUTSIDE = re.compile(
    r"(?<!docs/)\b(method|platform|style)\.md\b|style lesson|\blesson \d|\bissue \d|shared/notes"
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_comments_cite_only_this_repository(path: Path) -> None:
    bad = [
        f"{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not bad, "pointers to documents outside the repository:\n" + "\n".join(bad)
