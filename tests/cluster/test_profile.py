"""A measured cost model (`cluster/profile.py`): real layer calls fitted per node, the plan
made again on them, the experts moved there, outputs unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expertmesh.cluster.placement import NodeCapacity, PlacementOptions
from expertmesh.cluster.placement_model import ExpertShape, cost_model
from expertmesh.cluster.planning import plan_for_topology
from expertmesh.cluster.profile import NodeCost, fit, profile_layer_calls, replan
from expertmesh.cluster.topology import parse_topology
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams

from .test_colocated import PROMPTS, colocated_model


def test_fit_recovers_a_line_and_resists_one_throttled_call():
    samples = {r: [(50 + 4 * r) * 1e-6] * 9 for r in (2, 8, 24)}
    samples[8].append(0.02)  # one call that waited out a CPU-quota period
    cost = fit("n", samples)
    assert cost.call_us == pytest.approx(50, abs=1e-6)
    assert cost.token_us == pytest.approx(4, abs=1e-6)
    assert cost.predict_us(10) == pytest.approx(90)


def test_measured_costs_replace_the_modelled_ones():
    shape = ExpertShape(num_layers=1, num_experts=4, top_k=2, hidden_size=64, expert_bytes=10_000)
    nodes = [
        NodeCapacity("a", 1.0, 4, math.inf, 0.0, measured_token_us=7.0, measured_call_us=30.0),
        NodeCapacity("b", 1.0, 4, 10.0, 20.0),
    ]
    cost = cost_model(nodes, shape, PlacementOptions())
    assert cost.token_s[0] == pytest.approx(7e-6) and cost.latency_s[0] == pytest.approx(30e-6)
    assert cost.latency_s[1] == pytest.approx(40e-6)  # modelled: 2 x link latency
    with pytest.raises(ValueError, match="node 'b': measured_call_us must be finite and >= 0"):
        NodeCapacity("b", 1.0, 4, 10.0, 20.0, measured_call_us=-1.0)


def _topology() -> object:
    return parse_topology(
        {
            "version": 1,
            "name": "two",
            "nodes": [
                {"name": "head", "kind": "cpu", "speed": 1.0, "memory_gb": 4, "attention": True},
                {"name": "far", "kind": "cpu", "speed": 1.0, "memory_gb": 4},
            ],
            "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}},
        }
    )


def test_profile_then_replan_moves_experts_and_keeps_single_process_output(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    config = read_config(path)
    single = load_model(path)
    ep, remote, _ = colocated_model(path)
    costs = profile_layer_calls(ep, ["head", "far"], tokens_per_step=8, repeats=5, warmup=2)
    assert set(costs) == {"head", "far"}
    per_expert = round(8 * config.moe.top_k / config.moe.num_experts)
    for c in costs.values():
        assert isinstance(c, NodeCost) and c.token_us > 0 and c.samples == 15
        # 1, 2 and 4 experts (fewer where the node holds fewer of the layer), per_expert rows each
        assert c.rows[:2] == (per_expert, 2 * per_expert) and len(c.rows) == 3
        assert c.rows[2] in (3 * per_expert, 4 * per_expert)
        assert len(c.median_us) == 3 and all(m > 0 for m in c.median_us)
    # Pretend the far node is very slow: the plan on these costs keeps everything here.
    head = costs["head"]  # (whatever this busy machine measured: far is far worse)
    # A call there costs more than the head's whole step (else a sliver of tokens can pay).
    step_us = head.call_us + head.token_us * 8 * config.moe.top_k
    far = NodeCost("far", step_us * 1e3 + 1e6, head.token_us * 1e3 + 1e4, 1, (2,), (1e6,))
    slow = {**costs, "far": far}
    placement = plan_for_topology(
        _topology(), config, colocate=True, tokens_per_step=8, measured=slow
    )
    moved = replan(ep, placement)
    assert moved["dropped"] > 0
    assert placement.node_tokens["far"] < 1e-6  # (a zero-share replica may stay routed)
    far_rows = remote.shards["far"].tokens
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = Generator(ep.model).generate(PROMPTS, params)
    want = Generator(single).generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert remote.shards["far"].tokens == far_rows  # nothing went to the far node any more
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ep.model(ids) - single(ids)).abs().max().item() <= 1e-5
    assert np.isfinite(placement.step_time_s)


def test_call_log_fits_costs_under_traffic_and_keeps_the_prior_for_quiet_nodes():
    from expertmesh.cluster.profile import CallLog

    log = CallLog(local=["head"])
    rng = np.random.default_rng(0)
    for rows in rng.integers(4, 40, size=400).tolist():
        noise = float(rng.normal(0, 5e-6))
        log.on_reply("far", 1, rows, 0, (200 + 10 * rows) * 1e-6 + noise, 0.0)
        log.on_reply("head", 1, rows, 0, 1.0, (30 + 5 * rows) * 1e-6)  # local: its compute
    log.on_reply("idle", 1, 8, 0, 1e-3, 0.0)
    prior = {"idle": NodeCost("idle", 1.0, 2.0, 1, (8,), (17.0,))}
    costs = log.fit(prior=prior)
    assert costs["far"].call_us == pytest.approx(200, rel=0.1)
    assert costs["far"].token_us == pytest.approx(10, rel=0.05)
    assert costs["head"].call_us == pytest.approx(30, rel=0.05)  # busy time, not the 1 s trip
    assert costs["head"].token_us == pytest.approx(5, rel=0.02)
    assert costs["idle"] == prior["idle"]  # one call is no measurement (no remote prior)
    assert log.measured()["far"][0] == 400
    # Priors from a profile alone: a node nobody called is scaled by how much more the logged
    # remote nodes cost under traffic than their priors said.
    alone = {
        "far": NodeCost("far", 100.0, 5.0, 1, (8,), (140.0,)),  # traffic costs ~2x this
        "idle": NodeCost("idle", 100.0, 5.0, 1, (8,), (140.0,)),
    }
    scaled = log.fit(prior=alone)
    assert log.traffic_ratio == pytest.approx(2.0, rel=0.1)
    assert scaled["idle"].call_us == pytest.approx(100 * log.traffic_ratio)
    assert scaled["idle"].token_us == pytest.approx(5 * log.traffic_ratio)
    assert scaled["far"].token_us == pytest.approx(10, rel=0.05)  # measured, not scaled
