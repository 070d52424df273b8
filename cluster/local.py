"""The embedded cluster: a real multi-node Ray cluster on one machine, one Ray node per
topology node (`ray.cluster_utils.Cluster`), each offering a custom resource that pins that
node's actors to it.

On one machine every Ray node shares the same CPU, so node speed and link bandwidth/latency
are *emulated* by the shards (see `cluster/shard.py`): a node of speed 0.5 next to one of
speed 1.0 sleeps as long again as it computed, and a shard sleeps for its link's latency plus
the bytes it exchanged divided by the bandwidth. On a real cluster none of this applies: the
same placement and dispatch code runs against real nodes with `NodeEmulation()` (no sleeps).
"""

from __future__ import annotations

from typing import Any

from .devices import embedded_gpus
from .pool import node_resource
from .shard import NodeEmulation
from .topology import Topology

# Faster failure detection than Ray's defaults (about 16 s to declare a node dead): the
# supervisor's targets need node loss noticed within seconds on the embedded cluster.
FAST_HEALTH_CHECKS: dict[str, Any] = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_timeout_ms": 500,
}


def attention_node(topology: Topology) -> str:
    return topology.attention_nodes[0].name


def emulation_for(topology: Topology) -> dict[str, NodeEmulation]:
    """Per-node emulation relative to the fastest node and to the attention node's links."""
    speeds = {n.name: (n.speed if n.speed is not None else 1.0) for n in topology.nodes}
    fastest = max(speeds.values())
    head = attention_node(topology)
    out = {}
    for node in topology.nodes:
        link = topology.link(head, node.name)
        out[node.name] = NodeEmulation(
            slowdown=fastest / speeds[node.name],
            link_gbps=link.bandwidth_gbps,
            link_latency_us=link.latency_us,
        )
    return out


class LocalCluster:
    """Start/stop the embedded Ray cluster for a topology; the attention node is the head."""

    def __init__(
        self,
        topology: Topology,
        object_store_mb: int = 128,
        system_config: dict[str, Any] | None = None,
    ) -> None:
        self.topology = topology
        self.object_store_mb = object_store_mb
        self.system_config = dict(FAST_HEALTH_CHECKS if system_config is None else system_config)
        self.cluster: Any = None
        self.ray_nodes: dict[str, Any] = {}

    def _node_args(self, name: str) -> dict[str, Any]:
        import torch

        return {
            "num_cpus": 1,
            # Explicit, never Ray's detection (which would give every emulated node the
            # machine's GPUs): only GPU nodes get them (`devices.embedded_gpus`).
            "num_gpus": embedded_gpus(self.topology.node(name), torch.cuda.device_count()),
            "resources": {node_resource(name): 1.0},
            "object_store_memory": self.object_store_mb * 1024 * 1024,
        }

    def start(self) -> str:
        """Start every node and connect this process (the driver) to the cluster."""
        import ray
        from ray.cluster_utils import Cluster

        head = attention_node(self.topology)
        head_args = self._node_args(head)
        head_args["_system_config"] = self.system_config
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        self.ray_nodes[head] = self.cluster.head_node
        for node in self.topology.nodes:
            if node.name != head:
                self.ray_nodes[node.name] = self.cluster.add_node(**self._node_args(node.name))
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        return str(self.cluster.address)

    def remove_node(self, name: str, allow_graceful: bool = False) -> None:
        """Take a node away (node-loss fault injection)."""
        self.cluster.remove_node(self.ray_nodes.pop(name), allow_graceful=allow_graceful)

    def add_node(self, name: str) -> None:
        self.ray_nodes[name] = self.cluster.add_node(**self._node_args(name))

    def stop(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
