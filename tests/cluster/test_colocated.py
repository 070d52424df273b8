"""The attention node's experts in the attention worker's process (`cluster/colocated.py`),
and the planner's cost model for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertmesh.cluster.colocated import ColocatedPool, ColocatedTransport, local_shard
from expertmesh.cluster.dispatch import InProcessShardPool, RoutingTable
from expertmesh.cluster.placement import (
    ExpertShape,
    NodeCapacity,
    PlacementOptions,
    plan_placement,
)
from expertmesh.cluster.placement_model import cost_model, layer_times
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8], [100, 3, 250, 12]]


class CountingPool(InProcessShardPool):
    """In-process remote shards that count the requests that reach them per node."""

    def __init__(self, shards):
        super().__init__(shards)
        self.requests: dict[str, int] = {}

    def submit_request(self, node, request, trace=None):
        self.requests[node] = self.requests.get(node, 0) + 1
        return super().submit_request(node, request, trace)


def colocated_model(path, local_node: str = "head"):
    config = read_config(path)
    routes = {
        (layer, e): [("head" if e % 2 == 0 else "far", 1.0)]
        for layer in config.moe_layer_ids
        for e in range(config.moe.num_experts)
    }
    held = RoutingTable(routes).node_experts()
    far = ExpertShard("far", str(path), held["far"], torch_threads=torch.get_num_threads())
    remote = CountingPool({"far": far})
    shard = local_shard(local_node, str(path), held["head"], "float32", "cpu")
    pool = ColocatedPool(remote, local_node, shard)
    return ExpertParallelModel.from_routes(path, routes, pool), remote, shard


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_colocated_experts_give_single_process_output_and_never_cross_the_transport(
    family, hf_checkpoint
):
    path, _ = hf_checkpoint(family)
    single = load_model(path)
    threads = torch.get_num_threads()
    ep, remote, shard = colocated_model(path)
    assert torch.get_num_threads() == threads  # the local shard keeps this process's threads
    assert isinstance(ep.dispatcher.transport, ColocatedTransport)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert shard.tokens > 0 and remote.shards["far"].tokens > 0
    assert set(remote.requests) == {"far"}  # the local node's rows were computed here
    assert (
        "head" not in ep.dispatcher.stats.bytes_by_node
        or not ep.dispatcher.stats.bytes_by_node["head"]
    )


def test_colocated_shard_cannot_be_killed_alone_but_rebalances(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    ep, _, shard = colocated_model(path)
    with pytest.raises(ValueError, match="node 'head': its experts run in the attention worker"):
        ep.pool.kill("head")  # type: ignore[attr-defined]
    layer = read_config(path).moe_layer_ids[0]
    ep.pool.load_many({"head": {layer: [1]}})  # type: ignore[attr-defined]
    assert 1 in shard.experts()[layer]
    ep.pool.drop_many({"head": {layer: [1]}})  # type: ignore[attr-defined]
    assert 1 not in shard.experts()[layer]
    statuses = ep.pool.statuses()  # type: ignore[attr-defined]
    assert set(statuses) == {"head"}  # the in-process remote pool has no statuses: only ours


SHAPE = ExpertShape(num_layers=2, num_experts=8, top_k=2, hidden_size=256, expert_bytes=300_000)


def _nodes(local_speed: float = 1.0) -> list[NodeCapacity]:
    return [
        NodeCapacity("head", local_speed, 16, math.inf, 0.0),
        NodeCapacity("far-1", 1.0, 16, 10.0, 20.0),
        NodeCapacity("far-2", 1.0, 16, 10.0, 20.0),
    ]


def test_in_process_layer_time_is_local_plus_calls_or_the_slowest_remote_plus_one_call():
    options = PlacementOptions(call_overhead_us=100.0, colocate=True, tokens_per_step=8)
    cost = cost_model(_nodes(), SHAPE, options)
    tokens = np.array([[4.0, 6.0, 6.0]])  # the head serves 4, two remote nodes 6 each
    node_s = tokens * cost.token_s + (tokens > 0) * cost.latency_s
    want = max(node_s[0, 0] + 2 * 1e-4, node_s[0, 1:].max() + 1e-4)
    assert layer_times(tokens, cost)[0] == pytest.approx(want)
    alone = np.array([[16.0, 0.0, 0.0]])  # the head alone: no call at all
    assert layer_times(alone, cost)[0] == pytest.approx(16 * cost.token_s[0])
    called = cost_model(_nodes(), SHAPE, PlacementOptions(call_overhead_us=100.0))
    # As a shard, the head is called too: one more call, serial with the others.
    assert layer_times(alone, called)[0] == pytest.approx(16 * called.token_s[0] + 1e-4)


def test_planner_keeps_experts_in_process_when_calls_cost_more_than_remote_compute_saves():
    costly = PlacementOptions(
        call_overhead_us=2000.0, colocate=True, tokens_per_step=32, reference_tflops=0.01
    )
    plan = plan_placement(_nodes(), SHAPE, None, costly)
    assert set(plan.slots_used) >= {"head"}
    assert plan.node_tokens["far-1"] == 0 and plan.node_tokens["far-2"] == 0
    # Slow compute: the remote nodes take work, and the head keeps a share it computes while
    # theirs is in flight, less than an equal third (it pays the calls to them too).
    slow = PlacementOptions(
        call_overhead_us=2000.0, colocate=True, tokens_per_step=32, reference_tflops=0.001
    )
    spread = plan_placement(_nodes(), SHAPE, None, slow)
    total = sum(spread.node_tokens.values())
    assert spread.node_tokens["far-1"] > 0 and spread.node_tokens["far-2"] > 0
    assert 0 < spread.node_tokens["head"] < total / 3 * 0.9
    cost = cost_model(_nodes(), SHAPE, slow)
    alone = np.zeros((SHAPE.num_layers, 3))
    alone[:, 0] = total / SHAPE.num_layers
    assert spread.step_time_s < layer_times(alone, cost).sum() * 0.6


def _all_here(path):
    config = read_config(path)
    routes = {
        (layer, e): [("head", 1.0)]
        for layer in config.moe_layer_ids
        for e in range(config.moe.num_experts)
    }
    held = RoutingTable(routes).node_experts()
    shard = local_shard("head", str(path), held["head"], "float32", "cpu")
    remote = CountingPool({})
    return ExpertParallelModel.from_routes(
        path, routes, ColocatedPool(remote, "head", shard)
    ), remote


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_layer_held_whole_here_runs_as_one_process_does(family, hf_checkpoint):
    """Every expert of every layer in this process: no request is built or sent, the model's
    own expert code runs on the local bank, and the logits equal one process's exactly."""
    path, _ = hf_checkpoint(family)
    single = load_model(path)
    ep, remote = _all_here(path)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ep.model(ids), single(ids))
    transport = ep.dispatcher.transport
    assert isinstance(transport, ColocatedTransport) and transport.local_s == 0.0
    assert remote.requests == {}
    stats, layers = ep.dispatcher.stats, read_config(path).moe_layer_ids
    assert stats.calls == stats.steps == len(layers)
    assert all(int(stats.tokens[layer].sum()) == 3 * 17 * 2 for layer in layers)  # top-2
    assert stats.bytes_sent == 0


def test_experts_computed_here_are_not_counted_as_waiting_for_shards(hf_checkpoint):
    """The overlap policy reads the wait: experts in this process are compute, not waiting,
    so with every expert here there is nothing to hide and overlap stays off."""
    path, _ = hf_checkpoint("mixtral")
    ep, _ = _all_here(path)
    ep.model.overlap_policy.mode = "auto"  # type: ignore[attr-defined]
    Generator(ep.model).generate(PROMPTS * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    assert ep.dispatcher.stats.compute_s > 0
    assert ep.dispatcher.stats.wait_s < 0.2 * ep.dispatcher.stats.compute_s
    assert ep.model.overlap_policy.passes_on == 0  # type: ignore[attr-defined]
    # Half the experts elsewhere: the local half goes through the transport, not counted
    # as waiting either.
    ep2, _, _ = colocated_model(path)
    Generator(ep2.model).generate(PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
    transport = ep2.dispatcher.transport
    assert isinstance(transport, ColocatedTransport) and transport.local_s > 0
