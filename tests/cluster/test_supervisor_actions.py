"""Supervisor actions on in-process shards (no Ray): a drained node stays out of later
rebalances, rejoins on request, and greedy output never changes."""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.cluster.dispatch import InProcessShardPool
from expertmesh.cluster.placement import PlacementOptions
from expertmesh.cluster.planning import embedded_reference_tflops, plan_for_topology
from expertmesh.cluster.rebalance import Rebalancer
from expertmesh.cluster.runtime import ExpertParallelModel, routes_from_placement
from expertmesh.cluster.shard import ExpertShard
from expertmesh.cluster.supervisor import Supervisor, SupervisorConfig
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.observability.events import EventLog, read_events

# Three equal nodes: a rebalance after a drain has every reason to use the drained one again.
TOPOLOGY = """
version: 1
name: three-equal
nodes:
  - {name: node-a, kind: cpu, speed: 1.0, memory_gb: 8, attention: true}
  - {name: node-b, kind: cpu, speed: 1.0, memory_gb: 8}
  - {name: node-c, kind: cpu, speed: 1.0, memory_gb: 8}
links:
  default: {bandwidth_gbps: 10, latency_us: 50}
"""
PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8], [100, 3, 250, 12, 7, 7, 7, 9]]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def greedy(model) -> list[list[int]]:
    return [c.token_ids for c in Generator(model).generate(PROMPTS, PARAMS)]


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "topology.yaml").write_text(TOPOLOGY)
    topology = load_topology(tmp_path / "topology.yaml")
    config = read_config(DEMO_MODEL_DIR)
    # as `expertmesh up` plans the embedded cluster: CPU-speed nodes get experts too
    placement = plan_for_topology(
        topology, config, reference_tflops=embedded_reference_tflops(topology)
    )
    routes = routes_from_placement(placement)
    held = {n: {} for n in (node.name for node in topology.nodes)}
    for (layer, expert), replicas in routes.items():
        for node, _ in replicas:
            held[node].setdefault(layer, []).append(expert)
    shards = {n: ExpertShard(n, str(DEMO_MODEL_DIR), experts) for n, experts in held.items()}
    ep = ExpertParallelModel.from_routes(
        DEMO_MODEL_DIR, routes, InProcessShardPool(shards), placement=placement
    )
    # Slow nodes (compute, not link latency, dominates) and a rebalance at every check: the
    # planner spreads a hot expert over every node it is given.
    ep.plan_options = PlacementOptions(reference_tflops=1e-4)
    rebalancer = Rebalancer(ep, topology, threshold=1.0, min_tokens=1)
    events = EventLog(tmp_path / "events.jsonl")
    sup = Supervisor(
        ep, topology, SupervisorConfig(rebalance_every_s=1e-9), events=events, rebalancer=rebalancer
    )
    yield ep, sup, tmp_path / "events.jsonl"
    events.close()


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return greedy(load_model(DEMO_MODEL_DIR))


def test_a_drained_node_gets_no_experts_from_a_later_rebalance(cluster, expected):
    ep, sup, _ = cluster
    assert ep.placement.experts_on("node-b")
    sup.drain("node-b")
    assert greedy(ep.model) == expected
    for layer in ep.config.moe_layer_ids:  # routing drifts: two experts take nearly every token
        ep.dispatcher.stats.tokens[layer] = np.array([1e5, 5e4] + [10.0] * 6)
    sup._last_rebalance = 0.0
    sup.check()
    assert sup.stats.rebalances == 1  # applied, on the two nodes in service (it used node-b)
    assert ep.placement.experts_on("node-b") == []
    assert "node-b" not in ep.dispatcher.table.nodes
    assert greedy(ep.model) == expected


def test_a_drained_node_rejoins_and_serves_the_same_output(cluster, expected):
    ep, sup, events_path = cluster
    sup.drain("node-b")
    assert greedy(ep.model) == expected
    sup.rejoin("node-b")
    assert "node-b" not in sup.removed
    assert sup.stats.rejoins == 1
    assert greedy(ep.model) == expected
    sup._last_rebalance = 0.0
    sup.check()  # the returned node may now take experts again
    assert greedy(ep.model) == expected
    actions = [e.detail for e in read_events(events_path) if e.kind == "action"]
    assert any(d.startswith("rejoined") for d in actions)


def test_only_a_node_out_of_service_can_rejoin(cluster):
    _, sup, _ = cluster
    with pytest.raises(ValueError, match="'node-a' is serving"):
        sup.rejoin("node-a")


def test_the_serving_engine_reports_nodes_out_of_service(cluster, tmp_path):
    import asyncio

    from prometheus_client import generate_latest

    from expertmesh.models.tokenizer import Tokenizer
    from expertmesh.observability import TelemetryConfig, configure_telemetry
    from expertmesh.serving.config import SupervisorSpec
    from expertmesh.serving.local_engine import ExpertMeshEngine

    ep, _, _ = cluster
    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    engine = ExpertMeshEngine(
        "demo", ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR), owner=ep, meter=telemetry.meter
    )

    def out_of_service() -> float:
        text = generate_latest(telemetry.prometheus_registry).decode()
        (line,) = [x for x in text.splitlines() if x.startswith("expertmesh_nodes_out_of_service")]
        return float(line.rsplit(" ", 1)[1])

    try:
        topology = load_topology(tmp_path / "topology.yaml")
        logs = tmp_path / "logs"
        sup = engine.supervise(ep, topology, SupervisorSpec(rebalance_every_s=0), log_dir=logs)
        assert out_of_service() == 0
        sup.drain("node-b")
        assert out_of_service() == 1
        assert engine.health().extra["supervisor"]["out_of_service"] == ["node-b"]
        sup.rejoin("node-b")
        assert out_of_service() == 0
        assert engine.health().extra["supervisor"]["rejoins"] == 1
        events = read_events(logs / "events.jsonl")  # the replica's fault events file
        assert [e.kind for e in events if e.failure_mode == "node_drained"][:2] == [
            "detected",
            "action",
        ]
    finally:
        asyncio.run(engine.shutdown())
    assert engine.supervisor is None  # stopped with the engine
