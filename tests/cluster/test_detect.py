"""The dispatcher's detectors on a real dispatcher and a real shard (in this process, emulating
its node): a slower link and a slower node are each detected as themselves. The fault-free
control is the chaos suite's (`tests/chaos`: three nodes, whose peers divide out what the
whole machine does); a lone in-process node has no peer, and on the shared 2-core machine
contention alone moves its timings several-fold."""

from __future__ import annotations

import time

import torch

from expertmesh.cluster.detect import DetectorConfig, DispatchDetectors
from expertmesh.cluster.dispatch import InProcessShardPool, RoutingTable
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard, NodeEmulation
from expertmesh.models.checkpoint import read_config
from expertmesh.observability.events import LINK_DEGRADED, NODE_SLOW, FaultEvent

BASE = NodeEmulation(slowdown=2.0, link_gbps=10.0, link_latency_us=200.0)


class ListSink:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.events.append(event)
        return event


def one_node_model(path):
    config = read_config(path)
    routes = {
        (la, e): [("a", 1.0)] for la in config.moe_layer_ids for e in range(config.moe.num_experts)
    }
    shard = ExpertShard("a", str(path), RoutingTable(routes).node_experts()["a"], emulation=BASE)
    return ExpertParallelModel.from_routes(path, routes, InProcessShardPool({"a": shard})), shard


def drive(ep, seconds: float) -> None:
    """Forward passes of mixed sizes (decode-like and prefill-like) for `seconds`."""
    g = torch.Generator().manual_seed(0)
    end = time.monotonic() + seconds
    i = 0
    with torch.no_grad():
        while time.monotonic() < end:
            n = 16 if i % 5 == 0 else 2
            ep.model(torch.randint(0, 256, (1, n), generator=g))  # one row: no micro-batches
            i += 1


def watched(path):
    ep, shard = one_node_model(path)
    sink = ListSink()
    detectors = DispatchDetectors(sink, DetectorConfig(baseline_s=30.0, min_samples=6))
    ep.dispatcher.observers.append(detectors)
    return ep, shard, sink


def test_added_link_latency_is_detected_as_link_degraded_then_recovered(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    ep, shard, sink = watched(path)
    drive(ep, 3.0)
    assert sink.events == []
    faulted = time.time_ns()
    shard.set_emulation(NodeEmulation(BASE.slowdown, BASE.link_gbps, BASE.link_latency_us + 20_000))
    drive(ep, 1.5)
    shard.set_emulation(BASE)
    drive(ep, 1.5)
    kinds = [(e.kind, e.failure_mode, e.source) for e in sink.events]
    assert kinds[0] == ("detected", LINK_DEGRADED, "cluster.dispatch"), kinds
    assert (sink.events[0].time_unix_nano - faulted) / 1e9 < 1.5
    assert ("recovered", LINK_DEGRADED, "cluster.dispatch") in kinds
    assert all(mode != NODE_SLOW for _, mode, _ in kinds)


def test_slower_compute_is_detected_as_node_slow_not_as_the_link(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    ep, shard, sink = watched(path)
    drive(ep, 3.0)
    shard.set_emulation(NodeEmulation(BASE.slowdown * 8, BASE.link_gbps, BASE.link_latency_us))
    drive(ep, 1.5)
    kinds = [(e.kind, e.failure_mode) for e in sink.events]
    assert ("detected", NODE_SLOW) in kinds and ("detected", LINK_DEGRADED) not in kinds, kinds
