"""The documented commands: found in README.md, docs/*.md, configs/ and cluster/ headers and the
``--help`` examples, in the order the documented-commands test runs them.

Conventions (README.md, "Commands"): a fenced block with info string ``sh`` (or ``python``)
is a runnable block; an HTML comment ``<!-- doc-test: gpu -->`` or ``<!-- doc-test: cloud -->``
on the line before it marks a block this machine cannot run (checked for syntax and for the
configs it names), ``<!-- doc-test: suite -->`` a block that is the test suite itself (checked
with ``make -n``). In configs/ and cluster/, a header comment line ``#   $ <command>`` is a
command; a trailing ``# doc-test: gpu`` or ``# doc-test: cloud`` marks one, and every one in
cluster/ is ``cloud``. Each click command's help ends with ``Example:`` lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!--\s*doc-test:\s*(\w+)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
HEADER = re.compile(r"^#\s+\$ (.+?)\s*$")
TRAILING = re.compile(r"\s+#\s*doc-test:\s*(\w+)\s*$")
MODES = ("run", "gpu", "cloud", "suite")
FIRST = "ray job submit"
"""A run block with this runs first: it does the demo's work inside a Ray job (the path that
must be exercised for real); every later block resumes its outputs."""
HELP_ORDER = ("main", "run", "collect", "steer", "validate", "verify", "organism", "bench")
"""Help examples in this order, the rest (reduce, report: they redo the demo's sets) last."""


@dataclass(frozen=True)
class Block:
    """One documented block: where it is, its language (``sh``/``python``), text and mode."""

    file: str
    line: int
    lang: str
    text: str
    mode: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def markdown_blocks(path: Path, name: str) -> list[Block]:
    """The ``sh`` and ``python`` fenced blocks of a Markdown file, with their markers."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        lang = fence.group(1)
        if lang in ("sh", "python"):
            before = next((s for s in reversed(lines[:i]) if s.strip()), "")
            marker = MARKER.match(before.strip())
            mode = marker.group(1) if marker else "run"
            if mode not in MODES:
                raise ValueError(f"{name}:{i}: doc-test marker must be one of {MODES}, got {mode}")
            blocks.append(Block(name, i + 2, lang, "\n".join(lines[i + 1 : end]) + "\n", mode))
        i = end + 1
    return blocks


def header_blocks(path: Path, name: str) -> list[Block]:
    """The ``#   $ <command>`` lines of a config's or cluster file's leading comments."""
    blocks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = HEADER.match(line)
        if not match:
            continue
        command = match.group(1)
        trailing = TRAILING.search(command)
        mode = trailing.group(1) if trailing else "run"
        if name.startswith("cluster/"):
            mode = "cloud"
        blocks.append(Block(name, number, "sh", command + "\n", mode))
    return blocks


def help_blocks(repo: Path) -> list[Block]:
    """Each click command's ``Example:`` lines, located in crossmodal/cli.py."""
    from crossmodal.cli import main

    source = (repo / "crossmodal" / "cli.py").read_text().splitlines()
    commands = {"main": main, **main.commands}
    order = sorted(commands, key=lambda n: (HELP_ORDER + (n,)).index(n))
    blocks = []
    for name in order:
        help_text = (commands[name].help or "").splitlines()
        start = next((i for i, s in enumerate(help_text) if s.strip().startswith("Example")), None)
        if start is None:
            raise ValueError(f"crossmodal/cli.py: `{name}` help must end with Example: lines")
        for example in (s.strip() for s in help_text[start + 1 :] if s.strip()):
            number = next(i for i, s in enumerate(source, 1) if s.strip() == example)
            blocks.append(Block("crossmodal/cli.py", number, "sh", example + "\n", "run"))
    return blocks


def documented_blocks(repo: Path) -> list[Block]:
    """Every documented block of the repository, in the order they are run."""
    blocks = markdown_blocks(repo / "README.md", "README.md")
    for path in sorted((repo / "docs").glob("*.md")):
        blocks += markdown_blocks(path, f"docs/{path.name}")
    for folder in ("configs", "cluster"):
        for path in sorted((repo / folder).iterdir()):
            if path.is_file():
                blocks += header_blocks(path, f"{folder}/{path.name}")
    blocks += help_blocks(repo)
    ordered = sorted(blocks, key=lambda b: b.mode != "run" or FIRST not in b.text)
    seen: set[str] = set()
    unique = []
    for block in ordered:  # a command documented twice runs once (where it comes first)
        commands = [f"{block.mode}:{c}" for c in commands_of(block.text).splitlines()]
        if len(commands) == 1 and commands[0] in seen:
            continue
        seen.update(commands)
        unique.append(block)
    return unique


def commands_of(text: str) -> str:
    """The block's commands without comments and blank lines (to spot the same command)."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#"))


def named_files(text: str) -> list[str]:
    """Config-like files a command names: ``*.yaml``, ``*.yml`` and ``*.json`` tokens."""
    return sorted(set(re.findall(r"[\w./-]+\.(?:ya?ml|json)\b", text)))
