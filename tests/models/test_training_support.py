"""The model core trains: gradients reach routers and experts, also after an inference pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.models.checkpoint import load_model


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_gradients_reach_the_router_and_the_routed_experts(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")
    model = load_model(path).train()
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    _loss(model, ids).backward()
    moe = next(b.moe for b in model.blocks if b.moe is not None)
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    per_expert = moe.experts.gate_up.grad.abs().sum(dim=(1, 2))
    assert (per_expert > 0).sum() >= 2  # every expert that got tokens learns


def test_training_steps_after_a_no_grad_pass_still_update_the_experts(hf_checkpoint):
    # Per-expert weight views are cached for inference; a training step after an inference
    # pass (validation) and an optimizer update must not reuse views outside autograd.
    path, _ = hf_checkpoint("deepseek_v3")
    model = load_model(path).train()
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model(ids[:, :-1])
    moe = next(b.moe for b in model.blocks if b.moe is not None)
    before = moe.experts.gate_up.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        _loss(model, ids).backward()
        opt.step()
    assert not torch.equal(before, moe.experts.gate_up.detach())
    with torch.no_grad():  # and inference after training sees the updated weights
        logits = model(ids[:, :-1])
    assert torch.isfinite(logits).all()
