"""Which Ray node stands for which topology node, and asking Ray to drain one.

Every topology node's shards are pinned by a custom resource that only its Ray node offers
(`pool.node_resource`: `expertmesh_node_<name>`, set by `cluster/local.py` on the embedded
cluster and by each KubeRay worker group's `rayStartParams`). The supervisor reads liveness and
drains from Ray's node table through these functions; `expertmesh cluster nodes|drain` and the
worker pods' preStop hook use them too.

    offering(["gpu-0", "cpu-fast"], ray.nodes())   # {"gpu-0": {"<hex id>"}, "cpu-fast": set()}
    draining_ray_nodes()                           # {"<hex id>": deadline_unix_ms (0: none)}
    request_drain("<hex id>", "maintenance", deadline_s=600, address="10.0.0.1:6379")
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .pool import node_resource

DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
"""Ray accepts a preemption drain whatever runs on the node (an idle-termination drain is
refused while actors live there, and our shards always do)."""


class DrainRefused(RuntimeError):
    """Ray did not accept a drain request (the message is Ray's)."""


def offering(names: Iterable[str], infos: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Topology node -> ids of the *live* Ray nodes (from `ray.nodes()`) offering its resource.
    An empty set: no live Ray node stands for it (it is dead, or not started yet)."""
    out: dict[str, set[str]] = {name: set() for name in names}
    for info in infos:
        if not info.get("Alive"):
            continue
        offered = info.get("Resources", {})
        for name, ids in out.items():
            if node_resource(name) in offered:
                ids.add(str(info["NodeID"]))
    return out


def nodes_offered(infos: Sequence[Mapping[str, Any]]) -> list[str]:
    """Topology node names some live Ray node offers a pinning resource for."""
    prefix = node_resource("")
    names = {
        key[len(prefix) :]
        for info in infos
        if info.get("Alive")
        for key in info.get("Resources", {})
        if key.startswith(prefix)
    }
    return sorted(names)


def draining_ray_nodes() -> dict[str, int]:
    """Ray node id -> drain deadline (Unix ms; 0: none) of the nodes Ray is draining. Needs a
    connected driver. Ray has no public API for this list yet: this reads Ray's own state
    accessor (what `ray drain-node` and KubeRay's autoscaler write)."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())


def request_drain(
    ray_node_id: str, message: str, deadline_s: float | None = None, address: str | None = None
) -> None:
    """Ask Ray to drain a node (`ray drain-node`, reason preemption). Every supervisor sees it
    within a check interval and moves the node's experts off. DrainRefused if Ray says no."""
    argv = [
        _ray_cli(),
        "drain-node",
        "--node-id",
        ray_node_id,
        "--reason",
        DRAIN_REASON,
        "--reason-message",
        message,
    ]
    if address:
        argv += ["--address", address]
    if deadline_s is not None:
        argv += ["--deadline-remaining-seconds", str(max(0, round(deadline_s)))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise DrainRefused(reason[-1] if reason else f"ray drain-node exited {done.returncode}")


def deadline_in_s(deadline_ms: int) -> float | None:
    """Seconds until a drain deadline (None for no deadline)."""
    return deadline_ms / 1000 - time.time() if deadline_ms else None


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the venv's own, then PATH
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise DrainRefused("the `ray` command is not installed beside this Python or on PATH")
    return found
