"""The EPLB baseline, reimplemented from DeepSeek's description: its published properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.cluster.eplb import balanced_packing, rebalance_experts, replicate_experts


def test_balanced_packing_gives_equal_counts_and_balances_weight():
    weight = np.array([[9.0, 1.0, 8.0, 2.0, 7.0, 3.0]])
    pack, rank = balanced_packing(weight, 2)
    assert sorted(np.bincount(pack[0]).tolist()) == [3, 3]
    loads = np.bincount(pack[0], weights=weight[0])
    assert abs(loads[0] - loads[1]) <= 2
    for p in range(2):
        assert sorted(rank[0][pack[0] == p].tolist()) == [0, 1, 2]


def test_replication_goes_to_the_largest_load_per_replica():
    phy2log, phy_rank, logcnt = replicate_experts(np.array([[10.0, 1.0, 4.0]]), 5)
    assert logcnt.tolist() == [[3, 1, 1]]  # 10 -> 5 -> 3.33 beats 4 the second time? no: 10,5 > 4
    assert phy2log[0, 3:].tolist() == [0, 0]
    assert phy_rank[0, 3:].tolist() == [1, 2]


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    group_size=st.integers(1, 4),
    gpus=st.sampled_from([2, 4]),
    extra_per_gpu=st.integers(0, 3),
    nodes=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
)
def test_every_expert_has_a_slot_and_slots_per_gpu_are_equal(
    layers, groups, group_size, gpus, extra_per_gpu, nodes, seed
):
    experts = groups * group_size
    per_gpu = -(-experts // gpus) + extra_per_gpu
    replicas = per_gpu * gpus
    weight = np.random.default_rng(seed).integers(1, 50, size=(layers, experts)).astype(float)
    r = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert r.phy2log.shape == (layers, replicas)
    for layer in range(layers):
        assert set(r.phy2log[layer].tolist()) == set(range(experts))
        assert np.bincount(r.phy2log[layer], minlength=experts).tolist() == r.logcnt[layer].tolist()
        for e in range(experts):
            slots = r.slots_of(layer, e)
            assert len(slots) == r.logcnt[layer, e]
            assert all(r.phy2log[layer, s] == e for s in slots)
    assert np.bincount(r.gpu_of_slot).tolist() == [per_gpu] * gpus


def test_hierarchical_policy_keeps_groups_on_one_node():
    weight = np.arange(1, 17, dtype=float)[None, :]
    r = rebalance_experts(weight, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=4)
    node_of_slot = r.gpu_of_slot // 2
    for g in range(4):
        nodes = {int(node_of_slot[s]) for e in range(4 * g, 4 * g + 4) for s in r.slots_of(0, e)}
        assert len(nodes) == 1


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(np.ones((1, 8)), 9, 1, 1, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(np.ones((1, 8)), 4, 1, 1, 2)
