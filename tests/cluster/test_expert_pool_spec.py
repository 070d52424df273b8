"""`PoolSpec` (no Ray): attention and experts apart (`expert_nodes`), and bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.cluster.dispatch import RoutingTable
from expertmesh.cluster.planning import plan_for_topology
from expertmesh.cluster.pool_spec import PoolSpec
from expertmesh.cluster.rig.plan import Machine, plan_rig
from expertmesh.cluster.runtime import routes_from_placement
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import read_config
from expertmesh.models.paths import DEMO_MODEL_DIR

TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "pool-3attn.yaml"
EXPERTS = ("expert-0", "expert-1")


def test_expert_nodes_keep_every_expert_off_the_attention_nodes():
    topology = load_topology(TOPOLOGY)
    spec = PoolSpec(str(DEMO_MODEL_DIR), topology, expert_nodes=EXPERTS)
    planned = spec.placement_topology
    assert [n.weight_bytes for n in planned.nodes if n.attention] == [0, 0, 0]
    assert [n.memory_bytes for n in planned.nodes] == [n.memory_bytes for n in topology.nodes]
    placement = plan_for_topology(planned, read_config(DEMO_MODEL_DIR))
    held = RoutingTable(routes_from_placement(placement)).node_experts()
    assert set(held) <= set(EXPERTS)
    config = read_config(DEMO_MODEL_DIR)
    for layer in config.moe_layer_ids:  # every expert of every MoE layer still has a home
        homes = {e for node in held.values() for e in node.get(layer, [])}
        assert homes == set(range(config.moe.num_experts))
    assert PoolSpec(str(DEMO_MODEL_DIR), topology).placement_topology is topology


def test_unknown_or_empty_expert_nodes_are_named():
    topology = load_topology(TOPOLOGY)
    with pytest.raises(ValueError, match="expert pool expert_nodes: unknown nodes gpu-9"):
        PoolSpec("ckpt", topology, expert_nodes=("gpu-9",))
    with pytest.raises(ValueError, match="expert pool controller_node: unknown nodes x"):
        PoolSpec("ckpt", topology, controller_node="x")
    with pytest.raises(ValueError, match="expert_nodes: empty"):
        PoolSpec("ckpt", topology, expert_nodes=())


def test_the_pool_topology_gives_each_attention_node_its_own_rig_node_and_quota():
    plan = plan_rig(load_topology(TOPOLOGY), Machine(cores=1.5, memory_budget_bytes=14 * 2**30))
    attention = [n for n in plan.nodes if n.name.startswith("attn-")]
    assert len({n.namespace for n in attention}) == 3  # one network namespace each
    assert [n.cores for n in attention] == [0.25, 0.25, 0.25]
    assert [n.cores for n in plan.nodes if n.name in EXPERTS] == [0.375, 0.375]
    assert sum(n.cores for n in plan.nodes) <= 1.5
