"""The decode-time MoE CPU kernel (models/moe_kernel.py) against ExpertBank's torch path."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models import moe_kernel
from expertmesh.models.config import MoEConfig
from expertmesh.models.errors import ExpertNotLoaded
from expertmesh.models.moe import ExpertBank

HIDDEN, INTER, EXPERTS = 64, 32, 6

needs_kernel = pytest.mark.skipif(
    not moe_kernel.available(),
    reason=f"MoE CPU kernel not built here: {moe_kernel.unavailable_reason()}",
)


def bank(expert_ids: list[int]) -> ExpertBank:
    cfg = MoEConfig(num_experts=EXPERTS, top_k=2, expert_intermediate=INTER)
    b = ExpertBank(0, HIDDEN, cfg, "silu", expert_ids)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        b.gate_up.copy_(torch.randn(b.gate_up.shape, generator=gen) * 0.2)
        b.down.copy_(torch.randn(b.down.shape, generator=gen) * 0.2)
    return b


def torch_path(b: ExpertBank, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """What expert_outputs returns without the kernel (every expert through MKL GEMMs)."""
    saved = moe_kernel.MAX_TOKENS_PER_EXPERT
    moe_kernel.MAX_TOKENS_PER_EXPERT = 0
    try:
        return b.expert_outputs(xs, counts)
    finally:
        moe_kernel.MAX_TOKENS_PER_EXPERT = saved


@needs_kernel
@pytest.mark.parametrize("counts", [[1, 0, 2, 3, 4, 5], [7, 8, 1, 0, 0, 6], [9, 1, 0, 20, 2, 3]])
def test_kernel_matches_torch_path_for_every_token_count(counts: list[int]) -> None:
    # 9 and 20 tokens exceed the kernel's limit: those experts go through MKL in the same call.
    b = bank(list(range(EXPERTS)))
    xs = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = b.expert_outputs(xs, counts)
        want = torch_path(b, xs, counts)
    assert got.shape == (sum(counts), HIDDEN)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_uses_local_slots_of_a_partial_bank() -> None:
    b = bank([1, 4, 5])  # slots 0, 1, 2 hold global experts 1, 4, 5
    counts = [0, 2, 0, 0, 3, 1]
    xs = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = b.expert_outputs(xs, counts)
        want = torch_path(b, xs, counts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExpertNotLoaded):
        b.expert_outputs(xs, [1, 2, 0, 0, 3, 0])


def test_training_keeps_the_autograd_path() -> None:
    b = bank(list(range(EXPERTS)))
    xs = torch.randn(3, HIDDEN, requires_grad=True)
    out = b.expert_outputs(xs, [1, 2, 0, 0, 0, 0])
    out.sum().backward()
    assert b.gate_up.grad is not None and b.gate_up.grad.abs().sum() > 0
    assert xs.grad is not None
