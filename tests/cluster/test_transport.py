"""Persistent channels (`ChannelTransport`) to in-process shards over real TCP sockets: the
same outputs as one process, failover when a channel dies, two calls in flight at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from expertmesh.cluster.dispatch import Dispatcher, InProcessShardPool, RoutingTable, ShardLost
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard
from expertmesh.cluster.transport import ChannelTransport
from expertmesh.cluster.transport_channel import ChannelClosed, connect
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams

from .test_dispatch import NODES, PROMPTS, spread_routes


class ShardsByNode(InProcessShardPool):
    """In-process shards that a ChannelTransport reaches through their own TCP listeners."""

    @property
    def handles(self) -> dict[str, ExpertShard]:
        return {n: s for n, s in self.shards.items() if n not in self.dead}


def _open(shard: ExpertShard, secret: bytes, timeout_s: float) -> tuple[str, int]:
    return shard.open_channel(secret)


def channel_model(
    path, routes, dtype: str = "float32", spin_us: float = 0.0
) -> ExpertParallelModel:
    assignment = RoutingTable(routes).node_experts()
    shards = {n: ExpertShard(n, str(path), assignment.get(n, {}), dtype) for n in NODES}
    pool = ShardsByNode(shards)
    ep = ExpertParallelModel.from_routes(path, routes, pool, dtype)
    ep.dispatcher.transport = ChannelTransport(
        pool, reply_timeout_s=20, open_channel=_open, spin_us=spin_us
    )
    return ep


def test_channel_output_equals_single_process(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    single = load_model(path)
    ep = channel_model(path, spread_routes(read_config(path)))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert ep.dispatcher.stats.calls > 0
    assert all(s.calls > 0 for s in ep.pool.shards.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("spin_us", [1.0, 1e6])
def test_polling_for_replies_changes_no_output_and_falls_back_to_waiting(
    hf_checkpoint, spin_us, monkeypatch
):
    """Polling (`spin_us`) reads the same replies: 1 us polls once and then waits in select
    (every reply of a real layer call comes later), 1 s reads them all by polling."""
    import select as select_module

    path, _ = hf_checkpoint("mixtral")
    single = load_model(path)
    ep = channel_model(path, spread_routes(read_config(path)), spin_us=spin_us)
    waits: list[float] = []
    real_select = select_module.select

    def counting_select(r, w, x, timeout=None):
        waits.append(timeout)
        return real_select(r, w, x, timeout)

    monkeypatch.setattr("expertmesh.cluster.transport.select.select", counting_select)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    blocking = [t for t in waits if t]
    if spin_us >= 1e6:
        assert waits and not blocking  # every reply found by a zero-timeout poll
    else:
        assert blocking  # the poll gave up and the transport slept until the reply came


def test_a_channel_refuses_the_wrong_secret(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    shard = ExpertShard("a", str(path), {})
    address = shard.open_channel(b"right" * 8)
    connect(address, b"right" * 8, 5).close()
    with pytest.raises(ChannelClosed):
        connect(address, b"wrong" * 8, 5)


def test_a_closed_channel_fails_over_to_a_replica_and_output_is_unchanged(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    routes = {k: [("a", 1.0), ("b", 1.0)] for k in spread_routes(read_config(path))}
    single = load_model(path)
    ep = channel_model(path, routes)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ep.model(ids)  # channels open
        shard_a = ep.pool.shards["a"]  # type: ignore[attr-defined]
        shard_a._channel.close()  # as if its process died: connections drop
        ep.pool.dead.add("a")  # type: ignore[attr-defined]  # and Ray has no actor for it
        before = shard_a.calls
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    assert ep.dispatcher.stats.failovers > 0
    assert shard_a.calls == before


def test_a_shard_whose_channel_died_is_recovered_not_skipped(hf_checkpoint):
    """No replica: the dispatcher recovers the shard (here: reopens its channel) and retries."""
    path, _ = hf_checkpoint("mixtral")
    single = load_model(path)
    ep = channel_model(path, spread_routes(read_config(path), replicate_every=1000))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ep.model(ids)
        ep.pool.shards["b"]._channel.close()  # type: ignore[attr-defined]
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    assert ep.dispatcher.stats.recoveries >= 1
    assert ep.dispatcher.transport.reconnects >= 1  # type: ignore[attr-defined]


def test_two_large_calls_in_flight_on_one_channel_complete(hf_checkpoint):
    """Micro-batch overlap sends a second request before reading the first reply; frames of
    several MB each way must not deadlock on full socket buffers."""
    path, _ = hf_checkpoint("mixtral")
    config = read_config(path)
    routes = {k: [("a", 1.0)] for k in spread_routes(config)}
    ep = channel_model(path, routes)
    d: Dispatcher = ep.dispatcher
    layer = config.moe_layer_ids[0]
    n = 8192  # rows: 8192 x hidden fp32 each way, twice in flight
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n, config.hidden_size)).astype(np.float32))
    experts = np.sort(rng.integers(0, config.moe.num_experts, n))
    counts = np.bincount(experts, minlength=config.moe.num_experts).tolist()
    token = np.arange(n)
    result: dict[str, torch.Tensor] = {}

    def work() -> None:
        first = d.start(layer, x, token, experts, counts)
        second = d.start(layer, x * 2, token, experts, counts)
        result["first"] = d.finish(first)
        result["second"] = d.finish(second)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "two calls in flight deadlocked"
    alone = d.finish(d.start(layer, x, token, experts, counts))
    assert torch.equal(result["first"], alone)
    assert not torch.equal(result["second"], alone)


def test_bf16_model_over_bf16_wire_equals_single_process_with_half_the_bytes(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2_moe")
    routes = spread_routes(read_config(path))
    single = load_model(path, "bfloat16")
    ep = channel_model(path, routes, "bfloat16")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    bf16_bytes = ep.dispatcher.stats.bytes_sent
    ep.dispatcher.wire = "fp32"
    ep.dispatcher.stats.bytes_sent = 0
    Generator(ep.model).generate(PROMPTS, params)
    assert ep.dispatcher.stats.bytes_sent > 1.8 * bf16_bytes


def test_lost_channel_with_no_live_shard_fails_loudly(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    ep = channel_model(path, spread_routes(read_config(path), replicate_every=1000))
    pool = ep.pool

    def never_back(node, experts, timeout_s):
        raise ShardLost(node, "gone for good")

    pool.recover = never_back  # type: ignore[method-assign]
    pool.dead.add("c")  # type: ignore[attr-defined]
    ep.dispatcher.recovery_timeout_s = 1.0
    with pytest.raises(ShardLost, match="'c'"), torch.no_grad():
        ep.model(torch.randint(0, 256, (2, 12)))


@pytest.mark.e2e
def test_ray_shards_default_to_channels_and_a_killed_shard_is_reached_again(hf_checkpoint):
    """Real Ray actors: the pool's default transport is the channel; a killed shard's standby
    is promoted, its channel reopened, the output unchanged; the actor-call fallback agrees."""
    import ray

    from expertmesh.cluster.dispatch import PoolTransport
    from expertmesh.cluster.pool import RayShardPool, node_resource

    path, _ = hf_checkpoint("mixtral")
    routes = {
        k: [("a", 1.0)] if k[1] % 2 else [("b", 1.0)] for k in spread_routes(read_config(path))
    }
    single = load_model(path)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [c.token_ids for c in Generator(single).generate(PROMPTS, params)]
    ray.init(address="local", num_cpus=2, resources={node_resource("a"): 1, node_resource("b"): 1})
    try:
        pool = RayShardPool(str(path), RoutingTable(routes).node_experts())
        ep = ExpertParallelModel.from_routes(path, routes, pool)
        assert isinstance(ep.dispatcher.transport, ChannelTransport)
        assert [c.token_ids for c in Generator(ep.model).generate(PROMPTS, params)] == want
        pool.kill("a")
        assert [c.token_ids for c in Generator(ep.model).generate(PROMPTS, params)] == want
        assert pool.promotions >= 1 and ep.dispatcher.transport.reconnects >= 1
        ep.dispatcher.transport = PoolTransport(pool)
        assert [c.token_ids for c in Generator(ep.model).generate(PROMPTS, params)] == want
    finally:
        ray.shutdown()
