"""Two pipelined micro-batches: same outputs as one process; the policy turns it on only
when measured to help."""

from __future__ import annotations

import pytest
import torch

from expertmesh.cluster.overlap import OverlapPolicy, install_overlap
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams

from .test_dispatch import in_process_model, spread_routes
from .test_transport import channel_model

PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8], [100, 3, 250, 12], [9, 9, 9], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_overlapped_forward_equals_single_process(family, hf_checkpoint):
    path, _ = hf_checkpoint(family)
    single = load_model(path)
    ep = in_process_model(path, spread_routes(read_config(path)))
    policy = install_overlap(ep.model, ep.dispatcher, OverlapPolicy("on"))
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert policy.passes_on > 0
    # Two micro-batches: two layer calls per MoE layer per pass.
    assert ep.dispatcher.stats.steps >= 2 * policy.passes_on * len(read_config(path).moe_layer_ids)


def test_overlap_over_channels_keeps_greedy_output(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")
    single = load_model(path)
    ep = channel_model(path, spread_routes(read_config(path)))
    install_overlap(ep.model, ep.dispatcher, OverlapPolicy("on"))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_policy_stays_off_when_there_is_little_to_hide():
    policy = OverlapPolicy("auto", min_ratio=0.2)
    assert policy.decide(32) is False  # nothing measured yet: measure without overlap
    policy.record(32, False, wall_s=1.0, wait_s=0.1)  # ratio 0.11
    assert [policy.decide(32) for _ in range(10)] == [False] * 10


def test_policy_keeps_overlap_only_while_measured_faster():
    policy = OverlapPolicy("auto", min_ratio=0.2, probe_every=1000)
    policy.record(32, False, wall_s=1.0, wait_s=0.5)  # ratio 1.0: worth trying
    assert policy.decide(32) is True
    policy.record(32, True, wall_s=0.7, wait_s=0.1)
    assert policy.decide(32) is True
    for _ in range(5):
        policy.record(32, True, wall_s=1.5, wait_s=0.1)  # measured slower now
    assert policy.decide(32) is False


def test_policy_never_splits_tiny_batches_and_rejects_unknown_modes():
    assert OverlapPolicy("on", min_rows=2).decide(3) is False
    assert OverlapPolicy("on", min_rows=2).decide(4) is True
    with pytest.raises(ValueError, match="overlap: unknown mode 'sometimes'"):
        OverlapPolicy("sometimes")


def test_a_failed_overlapped_pass_leaves_no_call_in_flight(hf_checkpoint):
    """One micro-batch's step fails (its shard never comes back): the other's call is
    collected, so table swaps (the rebalancer, the supervisor) are not blocked afterwards."""
    from expertmesh.cluster.dispatch import InProcessShardPool, ShardLost

    path, _ = hf_checkpoint("mixtral")
    ep = in_process_model(path, spread_routes(read_config(path), replicate_every=1000))
    install_overlap(ep.model, ep.dispatcher, OverlapPolicy("on"))

    class NeverBack(InProcessShardPool):
        def recover(self, node, experts, timeout_s):
            raise ShardLost(node, "gone for good")

    pool = NeverBack(ep.pool.shards)  # type: ignore[attr-defined]
    pool.dead.add("c")
    ep.dispatcher.pool = pool
    ep.dispatcher.recovery_timeout_s = 0.5
    with pytest.raises(ShardLost), torch.no_grad():
        ep.model(torch.randint(0, 256, (4, 6)))
    assert ep.dispatcher._inflight == 0
    ep.dispatcher.swap_table(ep.dispatcher.table)  # returns at once


def test_auto_policy_tries_overlap_on_decode_passes_only():
    policy = OverlapPolicy("auto", min_ratio=0.2)
    policy.record(64, False, wall_s=1.0, wait_s=0.6)  # plenty to hide
    assert policy.decide(64, new_tokens=8) is False  # prefill: never in auto
    assert policy.decide(64, new_tokens=1) is True
    assert OverlapPolicy("on").decide(64, new_tokens=8) is True
