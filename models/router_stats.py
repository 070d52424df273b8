"""Router statistics: tokens per expert per layer and the router's top-k weights.

Recording is one `bincount` and one `index_add_` per MoE layer, cheap enough to leave on in
serving; the cluster's placement planner and the monitoring metrics read it.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class RouterStats:
    """Accumulates routing decisions across forward passes."""

    def __init__(self, config: ModelConfig, keep_last: bool = False) -> None:
        self.num_experts = config.moe.num_experts
        self.moe_layers = config.moe_layer_ids
        self.tokens = torch.zeros(config.num_layers, self.num_experts, dtype=torch.long)
        """tokens[layer, expert]: token-to-expert assignments seen (dense layers stay 0)."""
        self.weight_sum = torch.zeros(config.num_layers, self.num_experts, dtype=torch.float64)
        """Sum of the router weights the expert received (its share of the output)."""
        self.keep_last = keep_last
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """layer -> (ids (N, k), weights (N, k)) of the latest pass, when keep_last."""

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        flat = ids.reshape(-1)
        self.tokens[layer] += torch.bincount(flat, minlength=self.num_experts)
        self.weight_sum[layer].index_add_(0, flat, weights.reshape(-1).double())
        if self.keep_last:
            self.last[layer] = (ids.detach().clone(), weights.detach().clone())

    def reset(self) -> None:
        self.tokens.zero_()
        self.weight_sum.zero_()
        self.last.clear()

    def load(self) -> torch.Tensor:
        """Per-layer load share (num_moe_layers, E), rows summing to 1 (uniform when unseen)."""
        t = self.tokens[self.moe_layers].double()
        total = t.sum(dim=1, keepdim=True)
        uniform = torch.full_like(t, 1.0 / self.num_experts)
        return torch.where(total > 0, t / total.clamp_min(1), uniform)

    def imbalance(self) -> torch.Tensor:
        """max / mean tokens per expert for each MoE layer (1.0 is perfect balance)."""
        t = self.tokens[self.moe_layers].double()
        mean = t.mean(dim=1).clamp_min(1e-9)
        return t.max(dim=1).values / mean

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly routing trace: {"layers": {layer: [tokens per expert]}}."""
        return {
            "num_experts": self.num_experts,
            "layers": {str(i): self.tokens[i].tolist() for i in self.moe_layers},
        }
