"""What a rig for a topology consists of, computed before anything is created.

`plan_rig(topology, machine)` turns each topology node into a network namespace with an
address on the rig's bridge, a CPU quota proportional to its `speed` and a memory limit
proportional to its `memory_gb`, and each pair of nodes into a rate limit. Pure: no system
calls, so it is unit-tested anywhere.

Scaling (the rig is a scaled model of the cluster, and says so):
- CPU: quotas are proportional to speed; the fastest node gets `max_node_cores` (default one
  core: a shard computes on one thread) and the sum never exceeds the machine's cores.
- Memory: limits are proportional to `memory_gb`, scaled so that they sum to `memory_budget_bytes`.
- Links: rates are the declared bandwidths times `link_scale`; by default the fastest declared
  link is brought down to `max_link_gbps` (what veth pairs and a bridge carry reliably on a
  small machine), so that every link's rate is really enforced by tc and not by the CPU.
- Latency: not emulated. This kernel has no `netem`; the round trip is what the bridge and
  the stack really take, measured by calibration and reported beside the declared figure.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass
from typing import Any

from expertmesh.cluster.topology import Topology

PREFIX = "emrig"
"""Every namespace, interface and cgroup the rig makes starts with this (what `down` sweeps)."""
BRIDGE = f"{PREFIX}-br"
CGROUP = "expertmesh-rig"
DEFAULT_SUBNET = "10.213.0.0/24"
CFS_PERIOD_US = 20_000
"""A short CFS period: a throttled node stalls for at most a few ms, not 100 ms."""
MIN_QUOTA_US = 1_000
DEFAULT_MAX_LINK_GBPS = 1.0
DEFAULT_MEMORY_BUDGET_GB = 8.0
MIN_NODE_MEMORY_BYTES = 768 * 2**20
"""A Ray node (raylet, a shard and its standby) needs about this much to start at all."""


class RigPlanError(ValueError):
    """The rig cannot be planned as asked (the message names the option and the fix)."""


@dataclass(frozen=True)
class Machine:
    """What the rig may use of this machine."""

    cores: float
    memory_budget_bytes: int
    max_node_cores: float = 1.0
    max_link_gbps: float = DEFAULT_MAX_LINK_GBPS
    link_scale: float | None = None
    """Multiply every declared bandwidth by this; None: `max_link_gbps / fastest declared`."""
    subnet: str = DEFAULT_SUBNET


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    namespace: str
    ip: str
    host_veth: str
    """The bridge-side end of the node's veth pair (the namespace side is `eth0`)."""
    speed: float
    cpu_quota_us: int
    cpu_period_us: int
    memory_bytes: int
    attention: bool

    @property
    def cores(self) -> float:
        return self.cpu_quota_us / self.cpu_period_us


@dataclass(frozen=True)
class LinkPlan:
    """The link between two nodes: each sends to the other at `rate_gbps` (htb class)."""

    a: str
    b: str
    declared_gbps: float
    declared_latency_us: float
    rate_gbps: float
    """What tc enforces: declared_gbps * link_scale."""


@dataclass(frozen=True)
class RigPlan:
    topology: str
    bridge: str
    bridge_ip: str
    prefix_len: int
    link_scale: float
    cpu_scale: float
    """Cores per unit of speed."""
    memory_scale: float
    nodes: tuple[NodePlan, ...]
    links: tuple[LinkPlan, ...]

    @property
    def head(self) -> NodePlan:
        return next(n for n in self.nodes if n.attention)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(
            f"no node {name!r} on the rig; nodes: {', '.join(n.name for n in self.nodes)}"
        )

    def link(self, a: str, b: str) -> LinkPlan:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"no link {a}-{b} on the rig")

    def default_rate_gbps(self, name: str) -> float:
        """Rate of a node's traffic to addresses that are no node (the bridge's own): the
        slowest of its links, so nothing bypasses the shaping."""
        rates = [link.rate_gbps for link in self.links if name in (link.a, link.b)]
        return min(rates) if rates else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RigPlan:
        return cls(
            **{
                **data,
                "nodes": tuple(NodePlan(**n) for n in data["nodes"]),
                "links": tuple(LinkPlan(**link) for link in data["links"]),
            }
        )


def plan_rig(topology: Topology, machine: Machine) -> RigPlan:
    """The rig for `topology` on `machine`; RigPlanError names what does not fit."""
    if machine.cores <= 0 or machine.max_node_cores <= 0:
        raise RigPlanError("cores: must be > 0")
    if topology.nodes_to_measure:
        raise RigPlanError(
            f"nodes {', '.join(topology.nodes_to_measure)}: speed 'measure' cannot be set as a "
            "CPU quota; give the rig a number (the speed it should have)"
        )
    net = ipaddress.ip_network(machine.subnet)
    hosts = list(net.hosts())
    if len(hosts) < len(topology.nodes) + 1:
        raise RigPlanError(f"subnet {machine.subnet}: too small for {len(topology.nodes)} nodes")
    speeds = {n.name: float(n.speed or 1.0) for n in topology.nodes}
    # Cores per unit of speed: the fastest node gets max_node_cores, unless the sum would
    # pass the machine's cores.
    cpu_scale = min(
        machine.max_node_cores / max(speeds.values()), machine.cores / sum(speeds.values())
    )
    total_memory = sum(n.memory_bytes for n in topology.nodes)
    memory_scale = machine.memory_budget_bytes / total_memory
    nodes = []
    for i, node in enumerate(topology.nodes):
        quota = max(MIN_QUOTA_US, math.floor(speeds[node.name] * cpu_scale * CFS_PERIOD_US))
        memory = round(node.memory_bytes * memory_scale)
        if memory < MIN_NODE_MEMORY_BYTES:
            raise RigPlanError(
                f"memory budget: node {node.name!r} would get {memory / 2**20:.0f} MiB, less "
                f"than the {MIN_NODE_MEMORY_BYTES / 2**20:.0f} MiB a Ray node needs; raise "
                "--memory-gb"
            )
        nodes.append(
            NodePlan(
                name=node.name,
                index=i,
                namespace=f"{PREFIX}-{node.name}",
                ip=str(hosts[i + 1]),
                host_veth=f"{PREFIX}-h{i}",
                speed=speeds[node.name],
                cpu_quota_us=quota,
                cpu_period_us=CFS_PERIOD_US,
                memory_bytes=memory,
                attention=node.name == topology.attention_nodes[0].name,
            )
        )
    pairs = [
        (a.name, b.name, topology.link(a.name, b.name))
        for i, a in enumerate(topology.nodes)
        for b in topology.nodes[i + 1 :]
    ]
    fastest = max((link.bandwidth_gbps for _, _, link in pairs), default=1.0)
    scale = (
        machine.link_scale
        if machine.link_scale is not None
        else min(1.0, machine.max_link_gbps / fastest)
    )
    if not scale > 0:
        raise RigPlanError(f"--link-scale: must be > 0, got {scale}")
    links = tuple(
        LinkPlan(a, b, link.bandwidth_gbps, link.latency_us, link.bandwidth_gbps * scale)
        for a, b, link in pairs
    )
    return RigPlan(
        topology=topology.name,
        bridge=BRIDGE,
        bridge_ip=str(hosts[0]),
        prefix_len=net.prefixlen,
        link_scale=scale,
        cpu_scale=cpu_scale,
        memory_scale=memory_scale,
        nodes=tuple(nodes),
        links=links,
    )
