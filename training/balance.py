"""Keeping MoE routers balanced during training: two losses, one bias rule, one measurement.

- `load_balancing_loss`: Fedus, Zoph, Shazeer, "Switch Transformers: Scaling to Trillion
  Parameter Models with Simple and Efficient Sparsity" (JMLR 2022), eq. 4:
  `E * sum_i f_i * P_i`, f_i the fraction of token-to-expert assignments that went to expert
  i (top-k, so each token counts k times), P_i the mean router probability of expert i. It is
  1 at perfect balance and grows as load and probability concentrate on the same experts.
  For sigmoid routers (DeepSeek-V3) the probability is the score normalised over experts, as in
  DeepSeek-V3's complementary sequence-wise balance loss (Liu et al. 2024, eq. 17-20).
- `router_z_loss`: Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert
  Models" (2022), eq. 5: mean over tokens of logsumexp(router logits)^2; keeps router logits
  small, which keeps training numerically stable.
- `BiasBalancer`: DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024), section 2.1.2,
  auxiliary-loss-free load balancing: after every step each expert's score-correction bias
  moves by `gamma` towards balance (down if the expert got more than the mean load, up if
  less). The bias only affects which experts are chosen, never the output weights, so it
  balances load without a gradient that fights the language-modelling loss.
- `load_spread`: max / mean tokens per expert, averaged over MoE layers (1.0 is perfect).

`RouterTap` collects what the losses need through forward hooks on the model's routers, so
`models/model.py` stays free of training code and works unchanged under DDP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from expertmesh.models.config import MoEConfig
from expertmesh.models.model import MoEModel


@dataclass
class RoutedBatch:
    """One MoE layer's routing of one forward pass."""

    layer: int
    ids: torch.Tensor  # (N, k) chosen experts
    logits: torch.Tensor  # (N, E) router logits, with grad


@dataclass
class RouterTap:
    """Records every router's ids and logits during forward passes (forward hooks)."""

    model: MoEModel
    enabled: bool = True
    records: list[RoutedBatch] = field(default_factory=list)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        for block in self.model.blocks:
            if block.moe is not None:
                hook = functools.partial(self._hook, block.layer)
                self._handles.append(block.moe.router.register_forward_hook(hook))

    def _hook(
        self,
        layer: int,
        router: torch.nn.Module,
        inputs: tuple[torch.Tensor, ...],
        output: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        if self.enabled:
            ids, _, logits = output  # Router.forward: ids, weights, logits
            self.records.append(RoutedBatch(layer, ids, logits))

    def pop(self) -> list[RoutedBatch]:
        out, self.records = self.records, []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def router_probs(logits: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """(N, E) routing probabilities: softmax, or sigmoid scores normalised to sum to 1."""
    if cfg.scoring == "sigmoid":
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return logits.float().softmax(dim=-1)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) number of token-to-expert assignments per expert."""
    return torch.bincount(ids.reshape(-1), minlength=num_experts)


def load_balancing_loss(logits: torch.Tensor, ids: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_i f_i P_i for one layer (1.0 when balanced)."""
    E = cfg.num_experts
    f = expert_counts(ids, E).float() / ids.numel()  # (E,), sums to 1; no gradient
    p = router_probs(logits, cfg).mean(dim=0)  # (E,)
    return E * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@dataclass(frozen=True)
class RouterLosses:
    aux: torch.Tensor
    z: torch.Tensor
    counts: torch.Tensor  # (num_moe_layers, E) assignments this pass


def router_losses(records: list[RoutedBatch], cfg: MoEConfig) -> RouterLosses:
    """Mean load-balancing and z-loss over the recorded layers, and the per-layer counts."""
    if not records:
        zero = torch.zeros(())
        return RouterLosses(zero, zero, torch.zeros(0, cfg.num_experts, dtype=torch.long))
    aux = torch.stack([load_balancing_loss(r.logits, r.ids, cfg) for r in records]).mean()
    z = torch.stack([router_z_loss(r.logits) for r in records]).mean()
    counts = torch.stack([expert_counts(r.ids, cfg.num_experts) for r in records])
    return RouterLosses(aux, z, counts)


def load_spread(counts: torch.Tensor) -> float:
    """max / mean assignments per expert, averaged over layers (rows); 1.0 is perfect balance."""
    if counts.numel() == 0:
        return 1.0
    c = counts.double()
    return float((c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-9)).mean())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel workers (identity without a process group). NCCL reduces only
    GPU tensors: a host tensor goes to this worker's GPU and back."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        home = t.device
        if dist.get_backend() == "nccl" and home.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        else:
            t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.to(home)
    return t


class BiasBalancer:
    """DeepSeek-V3 auxiliary-loss-free balancing of the routers' score-correction biases.

    `update(counts)` takes this step's per-layer assignment counts (already summed over
    workers, so every worker applies the same change and the replicas stay identical).
    """

    def __init__(self, model: MoEModel, gamma: float) -> None:
        self.routers = [b.moe.router for b in model.blocks if b.moe is not None]
        missing = [r for r in self.routers if r.score_bias is None]
        if missing:
            raise ValueError(
                "balance.bias_update_rate needs routers with a score-correction bias "
                f"(deepseek_v3); this {model.config.model_type} model has none"
            )
        self.gamma = gamma

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        for router, layer_counts in zip(self.routers, counts):
            assert router.score_bias is not None
            load = layer_counts.float().to(router.score_bias.device)
            # sign(mean - load): overloaded experts go down, underloaded go up.
            router.score_bias.add_(self.gamma * torch.sign(load.mean() - load))
