"""What names, starts and describes a shared expert pool (`cluster/expert_pool.py`): the pool's
Ray namespace and actor names, the `PoolSpec` it is started from and the `PoolSnapshot` a
replica dispatches by. No Ray calls here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .dispatch import Replica
from .supervisor import SupervisorConfig
from .topology import Topology

NAMESPACE_PREFIX = "expertmesh-pool-"
CONTROLLER_NAME = "controller"
SHARD_PREFIX = "shard"
STATE_KEY = b"expertmesh-pool-state"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class PoolError(RuntimeError):
    """An expert pool cannot be found, started or attached; the message says what to do."""


def pool_namespace(pool: str) -> str:
    """The Ray namespace of pool `pool` (its controller and shards live there)."""
    if not _NAME.match(pool):
        raise ValueError(
            f"expert_pool: {pool!r} is not a pool name; use letters, digits, '.', '_' or '-' "
            "(at most 63, starting with a letter or digit)"
        )
    return NAMESPACE_PREFIX + pool


@dataclass(frozen=True)
class PoolSpec:
    """How a pool is started (by whoever attaches first with `create=True`)."""

    checkpoint: str
    topology: Topology
    dtype: str = "auto"
    emulate: bool = False
    """Emulate node speeds and links (the embedded cluster `expertmesh up` starts)."""
    min_replicas: int = 1
    standby: bool = True
    telemetry: Mapping[str, Any] | None = None
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    rebalance_threshold: float = 1.2
    rebalance_min_tokens: int = 512
    events_path: str | None = None
    """JSONL file of the controller's fault events (`expertmesh fmea`); None: kept in memory."""
    poll_timeout_s: float = 2.0
    """How long a replica's long-poll waits for a new version before it asks again."""
    replica_timeout_s: float = 6.0
    """A replica that has not polled for this long is taken as gone (not waited for)."""
    ack_timeout_s: float = 10.0
    """Longest wait for every live replica to adopt a new version before dropping experts."""
    expert_nodes: tuple[str, ...] | None = None
    """The topology nodes that hold experts (disaggregated: attention nodes run replicas only);
    the others get no shard and no expert slots. None: every node, as the planner sees fit."""
    controller_node: str | None = None
    """Pin the controller to this topology node's Ray node (None: wherever Ray puts it)."""

    def __post_init__(self) -> None:
        names = [n.name for n in self.topology.nodes]
        for field_name, wanted in (
            ("expert_nodes", self.expert_nodes or ()),
            ("controller_node", (self.controller_node,) if self.controller_node else ()),
        ):
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ValueError(
                    f"expert pool {field_name}: unknown nodes {', '.join(unknown)}; the "
                    f"topology has {', '.join(names)}"
                )
        if self.expert_nodes is not None and not self.expert_nodes:
            raise ValueError("expert pool expert_nodes: empty; name a node, or None for all")

    @property
    def placement_topology(self) -> Topology:
        """The topology the pool plans on: nodes outside `expert_nodes` have no expert slots."""
        if self.expert_nodes is None:
            return self.topology
        nodes = tuple(
            n
            if n.name in self.expert_nodes
            else replace(n, kv_bytes=n.memory_bytes, weight_bytes=0)
            for n in self.topology.nodes
        )
        return replace(self.topology, nodes=nodes)


@dataclass(frozen=True)
class PoolSnapshot:
    """What a replica needs to dispatch: one version of the routing table, and the shards."""

    version: int
    routes: Mapping[tuple[int, int], tuple[Replica, ...]]
    shards: Mapping[str, Any]
    """node -> the Ray actor handle of its serving shard."""
    generations: Mapping[str, int]
    """node -> how many times its shard was replaced (a failure report names the one it saw)."""
    placement: Any
    secret: bytes
    """The pool's channel secret: every replica opens its channels with it, so a shard keeps
    one listener for all of them (`cluster/transport_channel.py`)."""
    dtype: str
    checkpoint: str
    topology: Topology
    out_of_service: tuple[str, ...] = ()
    """Nodes the controller took out of service (lost or drained), for the replicas' health."""
    spin_us: float = 0.0
    """How long a replica's channels poll for replies before sleeping
    (`transport.CHANNEL_SPIN_US` where the shards have CPUs of their own, 0 when emulated)."""
