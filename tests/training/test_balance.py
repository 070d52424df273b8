"""Router losses, the DeepSeek-V3 bias rule and the load-spread measure."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.models.config import MoEConfig
from expertmesh.training.balance import (
    BiasBalancer,
    RouterTap,
    load_balancing_loss,
    load_spread,
    router_losses,
    router_z_loss,
)

SOFTMAX = MoEConfig(num_experts=4, top_k=1, expert_intermediate=8)
SIGMOID = MoEConfig(num_experts=4, top_k=2, expert_intermediate=8, scoring="sigmoid")


def test_balanced_routing_gives_aux_loss_one():
    logits = torch.zeros(8, 4)  # uniform probabilities
    ids = torch.arange(8).remainder(4)[:, None]  # every expert gets 2 tokens
    assert load_balancing_loss(logits, ids, SOFTMAX).item() == pytest.approx(1.0)


def test_collapsed_routing_costs_more_than_balanced():
    logits = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    ids = torch.zeros(8, 1, dtype=torch.long)  # all tokens to expert 0, which it also prefers
    assert load_balancing_loss(logits, ids, SOFTMAX).item() > 3.5


def test_aux_loss_gradient_pushes_probability_away_from_the_overloaded_expert():
    logits = torch.zeros(8, 4, requires_grad=True)
    ids = torch.zeros(8, 1, dtype=torch.long)
    load_balancing_loss(logits, ids, SOFTMAX).backward()
    assert (logits.grad[:, 0] > 0).all()  # gradient descent lowers expert 0's logit


def test_sigmoid_router_probabilities_are_normalised_scores():
    logits = torch.zeros(6, 4)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 2], [1, 3]])
    assert load_balancing_loss(logits, ids, SIGMOID).item() == pytest.approx(1.0)


def test_z_loss_is_squared_logsumexp_and_grows_with_logit_scale():
    small = torch.zeros(3, 4)
    assert router_z_loss(small).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    assert router_z_loss(small + 10) > router_z_loss(small)


def test_load_spread_is_max_over_mean_averaged_over_layers():
    counts = torch.tensor([[2, 2, 2, 2], [8, 0, 0, 0]])
    assert load_spread(counts) == pytest.approx((1.0 + 4.0) / 2)


@pytest.fixture()
def v3_model(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")
    return load_model(path).train()


def test_tap_records_every_moe_layer_with_gradients(v3_model):
    tap = RouterTap(v3_model)
    v3_model(torch.randint(0, 256, (2, 10)))
    records = tap.pop()
    assert [r.layer for r in records] == v3_model.config.moe_layer_ids
    assert records[0].logits.requires_grad and records[0].ids.shape == (20, 2)
    losses = router_losses(records, v3_model.config.moe)
    assert losses.counts.sum() == 2 * 20 * len(records)
    tap.enabled = False
    v3_model(torch.randint(0, 256, (1, 4)))
    assert tap.pop() == []
    tap.close()


def test_bias_rule_raises_underloaded_and_lowers_overloaded_experts(v3_model):
    balancer = BiasBalancer(v3_model, gamma=0.01)
    router = balancer.routers[0]
    before = router.score_bias.detach().clone()
    counts = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5]] * len(balancer.routers))
    balancer.update(counts)
    change = router.score_bias.detach() - before
    assert change[0] == pytest.approx(-0.01) and change[1] == pytest.approx(0.01)
    assert change[2] == pytest.approx(0.0)


def test_bias_rule_needs_a_score_correction_bias(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    with pytest.raises(ValueError, match="score-correction bias"):
        BiasBalancer(load_model(path), gamma=0.001)
