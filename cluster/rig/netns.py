"""Network namespaces on a Linux bridge: one namespace per node, joined by a veth pair.

    bridge emrig-br (10.213.0.1/24, in the root namespace)
      |-- emrig-h0 <veth> eth0 in namespace emrig-gpu-0    (10.213.0.2)
      |-- emrig-h1 <veth> eth0 in namespace emrig-cpu-fast (10.213.0.3)

The bridge has an address so that this (root) namespace reaches every node (the serving API
on the head, `ray` commands); drivers run *inside* the head's namespace (`entered`), beside
its raylet, so that the attention worker's traffic to the shards leaves through the head's
own shaped veth, as it would leave a real attention node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .plan import NodePlan, RigPlan
from .state import RigState
from .system import HOME_NETNS, RigError, in_netns, quiet, run, setns

NETNS_DIR = Path("/run/netns")


def create_bridge(plan: RigPlan, state: RigState) -> None:
    state.record("bridge", name=plan.bridge)
    run(["ip", "link", "add", plan.bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{plan.bridge_ip}/{plan.prefix_len}", "dev", plan.bridge])
    run(["ip", "link", "set", plan.bridge, "up"])


def create_node_netns(plan: RigPlan, node: NodePlan, state: RigState) -> None:
    """The node's namespace, its veth pair onto the bridge, its address, lo up."""
    state.record("netns", name=node.namespace)
    run(["ip", "netns", "add", node.namespace])
    state.record("veth", name=node.host_veth)
    peer = f"{node.host_veth}n"
    run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", node.namespace])
    ns = node.namespace
    run(in_netns(ns, ["ip", "link", "set", peer, "name", "eth0"]))
    run(in_netns(ns, ["ip", "addr", "add", f"{node.ip}/{plan.prefix_len}", "dev", "eth0"]))
    run(in_netns(ns, ["ip", "link", "set", "eth0", "up"]))
    run(in_netns(ns, ["ip", "link", "set", "lo", "up"]))
    run(["ip", "link", "set", node.host_veth, "master", plan.bridge])
    run(["ip", "link", "set", node.host_veth, "up"])


def delete_netns(name: str) -> bool:
    return quiet(["ip", "netns", "del", name])


def delete_link(name: str) -> bool:
    return quiet(["ip", "link", "del", name])


def set_link(node: NodePlan, up: bool) -> None:
    """Take a node's cable out (`down`) or plug it back (`up`): its bridge-side veth."""
    run(["ip", "link", "set", node.host_veth, "up" if up else "down"])


def namespaces(prefix: str) -> list[str]:
    listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(prefix)]


def links(prefix: str) -> list[str]:
    listed = run(["ip", "-o", "link", "show"], check=False).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in listed if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


@contextlib.contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Run this thread (and the threads it starts) in `namespace`: sockets opened inside are
    the namespace's. Enter before `ray.init`, so Ray's threads are started inside too."""
    target = NETNS_DIR / namespace
    if not target.exists():
        raise RigError(f"no network namespace {namespace!r} (is the rig up? `expertmesh rig up`)")
    with open("/proc/thread-self/ns/net") as home, open(target) as ns:
        HOME_NETNS.append(home.fileno())
        setns(ns.fileno())
        try:
            yield
        finally:
            setns(home.fileno())
            HOME_NETNS.remove(home.fileno())
