"""Ray on the rig: one Ray node per topology node, started inside its namespace and groups.

The head (the attention node) binds to its namespace address; every other node joins it from
its own namespace with `ray start --address`. Each offers `expertmesh_node_<name>` (what pins
its shards) and one CPU. Ray runs with its own temp dir (`/tmp/emrig`, so it never meets a
`ray.init()` cluster of this machine) and token authentication: the token is the rig's
(`/run/expertmesh-rig/auth_token`), and a driver gets it through `driver_env`.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

from expertmesh.cluster.pool import node_resource

from . import cgroups
from .plan import NodePlan, RigPlan
from .state import RigState
from .system import RigError

HEAD_PORT = 6379
TEMP_DIR = "/tmp/emrig"
OBJECT_STORE_BYTES = 96 * 2**20


def token_path(state: RigState) -> Path:
    return state.path.with_name("auth_token")


def driver_env(state: RigState) -> dict[str, str]:
    """What a process needs in its environment to join the rig's Ray (token auth)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path(state))}


def use_token(state: RigState) -> None:
    """Make this process present the rig's token to Ray (also when Ray was imported and
    configured before: Ray reads its auth mode once, so it is re-read here)."""
    os.environ.update(driver_env(state))
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ensure_token(state: RigState) -> None:
    path = token_path(state)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_command(plan: RigPlan, node: NodePlan) -> list[str]:
    head = plan.head
    argv = [
        _ray(),
        "start",
        f"--node-ip-address={node.ip}",
        "--num-cpus=1",
        f"--resources={json.dumps({node_resource(node.name): 1.0})}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--temp-dir={TEMP_DIR}",
        "--disable-usage-stats",
    ]
    if node is head:
        argv += [
            "--head",
            f"--port={HEAD_PORT}",
            "--include-dashboard=false",
        ]
    else:
        argv += [f"--address={head.ip}:{HEAD_PORT}"]
    return argv


def start_node(
    plan: RigPlan, node: NodePlan, state: RigState, timeout_s: float = 120.0
) -> subprocess.Popen[str]:
    """`ray start` for one node, inside its groups and namespace (returns at once)."""
    state.record("ray", node=node.name)
    ray_cmd = " ".join(shlex.quote(a) for a in start_command(plan, node))
    script = f"{cgroups.enter_command(node.name)}; exec ip netns exec {node.namespace} {ray_cmd}"
    env = {**os.environ, **driver_env(state), "RAY_USAGE_STATS_ENABLED": "0"}
    log = Path(TEMP_DIR) / f"start-{node.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True
    )


def wait_started(procs: dict[str, subprocess.Popen[str]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RigError(
                f"`ray start` for node {name!r} did not return in {timeout_s:.0f} s"
            ) from None
        if code != 0:
            log = Path(TEMP_DIR) / f"start-{name}.log"
            tail = "\n".join(log.read_text().splitlines()[-15:]) if log.exists() else ""
            raise RigError(f"`ray start` for node {name!r} failed ({code}):\n{tail}")


def ray_node_ids(infos: list[dict]) -> dict[str, str]:  # type: ignore[type-arg]
    """Topology node -> Ray node id of the live Ray nodes offering its resource."""
    from expertmesh.cluster.ray_nodes import nodes_offered, offering

    names = nodes_offered(infos)
    return {name: sorted(ids)[0] for name, ids in offering(names, infos).items() if ids}
