"""A local output must be the same directory on every Ray node: checked before any actor works.

Each collector writes the shards of its own work units, and each steering worker its own
part files, straight into the output the driver names. On a cluster whose nodes do not
share that path (each pod or VM has its own disk), those writes land on the node that made
them, and the driver finds the parts missing only when it merges. So before a stage starts
its fleet on more than one node, the driver writes a token file into the output directory
and one zero-CPU task pinned to each alive node reads it back; a node that reads no file or
another token is refused in one line naming the fix: an ``s3://`` URL, or a volume
every node mounts at the same path (docs/reliability.md, "Node loss and unshared outputs").

Not checked: a URL output (every node reaches it), and a cluster whose only alive node is
the driver's own. On one machine, a node with another view of the filesystem is made with
the test switch :data:`crossmodal.fleet.faults.NODE_ROOT_ENV`.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from types import ModuleType
from typing import Any

from crossmodal.fleet.faults import node_view

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CHECK_PREFIX = "crossmodal.node-check."
TIMEOUT_S = 300.0
"""How long a node may take to run its check (a fresh worker process on a busy node)."""


class UnsharedOutputError(ValueError):
    """A local output that some alive Ray node does not see (one line, exit status 2)."""


def is_local(output: Any) -> bool:
    """Whether ``output`` is a filesystem path (not an ``s3://``, ``gs://``, ... URL)."""
    return not URL.match(str(output))


def read_token(path: str) -> str | None:
    """The content of ``path`` as this node sees it (None: no such file); runs on each node."""
    try:
        return node_view(path).read_text()
    except OSError:
        return None


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (id {str(node['NodeID'])[:8]})"


def _probe_all(ray: ModuleType, nodes: list[dict[str, Any]], path: str) -> dict[str, str | None]:
    """``read_token(path)`` on every node but the driver's, by node id; a node that died
    meanwhile is left out (it runs nothing)."""
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(read_token)
    refs = {
        n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path)
        for n in nodes
    }
    seen: dict[str, str | None] = {}
    for node in nodes:
        try:
            seen[node["NodeID"]] = ray.get(refs[node["NodeID"]], timeout=TIMEOUT_S)
        except GetTimeoutError as err:
            raise UnsharedOutputError(
                f"Ray node {_node_name(node)} did not run the shared-output check within "
                f"{TIMEOUT_S:.0f} s; check that node (ray status), then re-run"
            ) from err
        except RayError:
            continue  # the node is gone: it will run no actor either
    return seen


def check_output_shared(ray: ModuleType, output: Any) -> None:
    """Refuse a local ``output`` that an alive Ray node other than the driver's does not see.

    Args:
        ray: the connected ``ray`` module.
        output: the stage's output (a store or steering directory; a URL is not checked).

    Raises:
        UnsharedOutputError: one line: the output, which nodes do not see it, the fix.
    """
    if not is_local(output):
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    directory = Path(output).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    check = directory / f"{CHECK_PREFIX}{token}"
    check.write_text(token)
    try:
        seen = _probe_all(ray, others, str(check))
    finally:
        os.unlink(check)
    blind = [n for n in others if n["NodeID"] in seen and seen[n["NodeID"]] != token]
    if blind:
        total = len(others) + 1
        names = ", ".join(_node_name(n) for n in blind[:3]) + (" ..." if len(blind) > 3 else "")
        raise UnsharedOutputError(
            f"output {str(directory)!r} is a local path that {len(blind)} of {total} Ray "
            f"nodes do not see ({names} found no check file there), so their actors' parts "
            "would be missing at the merge; use an s3:// or gs:// URL for output, or a "
            "volume every node mounts at that same path"
        )
