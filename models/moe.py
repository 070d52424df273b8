"""The feed-forward half of a decoder layer: the dense MLP, the router (softmax or sigmoid
scoring, group-limited top-k, DeepSeek's score bias), `ExpertBank` (any subset of a layer's
experts; it raises when a token is routed to an expert it does not hold) and `MoEBlock`.

Shapes: N = flattened tokens, E = experts, k = experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import moe_kernel
from .config import MoEConfig
from .errors import ExpertNotLoaded
from .layers import SKINNY_ROWS, Linear, activation, int8_linear, skinny_mm

if TYPE_CHECKING:
    from .router_stats import RouterStats

# ----------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses k experts per token and their weights, per the family's rule."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.score_bias: nn.Parameter | None = None
        if cfg.score_correction_bias:
            self.score_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.router_in_fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> expert ids (N, k), weights (N, k) in x's dtype, logits (N, E)."""
        cfg = self.cfg
        logits = self.logits(x)
        if cfg.scoring == "sigmoid":
            scores = logits.float().sigmoid()
        else:
            scores = logits.float().softmax(dim=-1)
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if cfg.topk_method != "greedy":
            choice = self._limit_to_groups(choice)
        if self.score_bias is None and cfg.topk_method != "group_top2_sum":
            weights, ids = torch.topk(choice, cfg.top_k, dim=-1)
        else:  # choose on biased scores, weight by the unbiased ones (DeepSeek-V3)
            ids = torch.topk(choice, cfg.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + 1e-20 if cfg.scoring == "sigmoid" else total)
        if cfg.routed_scaling_factor != 1.0:  # (x * 1.0 is x: one op a layer saved)
            weights = weights * cfg.routed_scaling_factor
        return ids, weights.to(x.dtype), logits

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts in the best `topk_group` of `n_group` groups (DeepSeek)."""
        cfg = self.cfg
        grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        if cfg.topk_method == "group_max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, cfg.topk_group, dim=-1)[1], True)
        fill = 0.0 if cfg.topk_method == "group_max" else float("-inf")
        return grouped.masked_fill(~keep[..., None], fill).view_as(choice)


class ExpertBank(nn.Module):
    """Some or all routed experts of one layer, stacked for fast indexing.

    gate_up (n_local, 2*I, hidden) fuses each expert's gate and up projections;
    down (n_local, hidden, I). `expert_ids[i]` is the global id of local slot i.

    With `cfg.expert_weights == "int8"` both hold int8 weights (frozen) and
    `gate_up_scale` (n_local, 2*I) / `down_scale` (n_local, hidden) the float scale of each
    output channel: weight = int8 * scale (weight-only quantisation; activations stay float).
    """

    def __init__(
        self, layer: int, hidden: int, cfg: MoEConfig, act: str, expert_ids: Sequence[int]
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = cfg.num_experts
        self.intermediate = cfg.expert_intermediate
        self.act = act
        self.expert_ids = tuple(sorted(set(expert_ids)))
        n = len(self.expert_ids)
        self.quantized = cfg.expert_weights == "int8"
        qdtype = torch.int8 if self.quantized else None
        self.gate_up = nn.Parameter(
            torch.empty(n, 2 * cfg.expert_intermediate, hidden, dtype=qdtype),
            requires_grad=not self.quantized,
        )
        self.down = nn.Parameter(
            torch.empty(n, hidden, cfg.expert_intermediate, dtype=qdtype),
            requires_grad=not self.quantized,
        )
        self.gate_up_scale: nn.Parameter | None = None
        self.down_scale: nn.Parameter | None = None
        if self.quantized:
            self.gate_up_scale = nn.Parameter(torch.empty(n, 2 * cfg.expert_intermediate))
            self.down_scale = nn.Parameter(torch.empty(n, hidden))
        self.slot_of = [-1] * cfg.num_experts
        for slot, e in enumerate(self.expert_ids):
            self.slot_of[e] = slot

    @property
    def complete(self) -> bool:
        return len(self.expert_ids) == self.num_experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), ids/weights (N, k) -> weighted sum of the chosen experts (N, hidden)."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the N*k assignments by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        # index_select, not x[token]: the same rows, ~2x faster for (8192, 512) at prefill.
        xs = x.index_select(0, token)  # (N*k, hidden), sorted by expert
        row_weights = weights.reshape(-1).index_select(0, order)  # (N*k,)
        if torch.is_grad_enabled() and (
            x.requires_grad or weights.requires_grad or self.gate_up.requires_grad
        ):
            out = self.expert_outputs(xs, counts) * row_weights[:, None]  # autograd: no mul_
        else:
            out = self._expert_outputs(xs, counts, row_weights)
        result = torch.zeros_like(x)
        result.index_add_(0, token, out)
        return result

    def expert_outputs(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Unweighted outputs for token rows `xs` sorted by expert; counts[e] rows go to expert e
        (global ids). One GEMM pair per expert that has tokens. Expert shards call this directly.

        Works in the transposed layout (features x tokens) throughout: W @ x^T is the fast
        GEMM shape here (see SKINNY_ROWS), gate and up become contiguous row blocks, and the
        per-expert Python work is a handful of tensor ops (it dominates at decode time)."""
        return self._expert_outputs(xs, counts, None)

    def _expert_outputs(
        self, xs: torch.Tensor, counts: Sequence[int], row_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """`expert_outputs`, each row times row_weights[row] where given (no autograd): an
        expert's rows are scaled while still in cache from its GEMM, instead of one pass over
        all N*k rows (16 MB per layer at batch-32 prefill). Bitwise the same as `out * w`."""
        missing = [e for e, n in enumerate(counts) if n and self.slot_of[e] < 0]
        if missing:
            raise ExpertNotLoaded(self.layer, missing)
        if not xs.shape[0]:
            return xs.clone()
        if self.quantized:
            out = self._int8_expert_outputs(xs, counts)
            return out if row_weights is None else out.mul_(row_weights[:, None])
        gate_up, down = self._expert_views()
        xt = xs.t()  # (hidden, N*k), a view
        small = moe_kernel.MAX_TOKENS_PER_EXPERT
        use_kernel = (
            self.act == "silu"
            and min(n for n in counts if n) <= small
            and moe_kernel.applies(xs, self.gate_up)
        )
        if use_kernel:  # every expert with <= `small` tokens in one call (decode)
            used = [e for e, n in enumerate(counts) if n]
            out = moe_kernel.expert_mlp(
                xs,
                [counts[e] for e in used],
                [self.slot_of[e] for e in used],
                self.gate_up.detach(),
                self.down.detach(),
                max_tokens=small,
            )
        else:
            out = xs.new_empty(xs.shape)
        start = 0
        for e, n in enumerate(counts):
            if n and not (use_kernel and n <= small):
                slot = self.slot_of[e]
                if n > SKINNY_ROWS:  # prefill: x @ W^T is as fast, and writes rows in place
                    self._expert_mlp_rows(gate_up[slot], down[slot], xs, start, n, out)
                else:
                    out[start : start + n] = self._expert_mlp(
                        gate_up[slot], down[slot], xt, start, n
                    ).t()
                if row_weights is not None and not use_kernel:
                    out[start : start + n].mul_(row_weights[start : start + n, None])
            start += n
        if row_weights is not None and use_kernel:  # decode: a few rows, one op
            out.mul_(row_weights[:, None])
        return out

    def _expert_mlp(
        self, gate_up: torch.Tensor, down: torch.Tensor, xt: torch.Tensor, start: int, n: int
    ) -> torch.Tensor:
        """One expert on token columns start..start+n of xt (hidden, N*k) -> (hidden, n)."""
        i = self.intermediate
        h = skinny_mm(gate_up, xt[:, start : start + n])  # (2I, n)
        act = activation(self.act, h[:i]).mul_(h[i:])  # (I, n)
        # A (I, n) operand laid out token-major multiplies ~2x faster than row-major.
        return skinny_mm(down, act.t().contiguous().t())  # (hidden, n)

    def _expert_mlp_rows(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        xs: torch.Tensor,
        start: int,
        n: int,
        out: torch.Tensor,
    ) -> None:
        """One expert on token rows start..start+n of xs, written to the same rows of `out`:
        for hundreds of rows the (tokens x features) GEMMs run as fast as the transposed ones
        and need no transposing copy of the activation or the result (prefill)."""
        i = self.intermediate
        h = torch.mm(xs[start : start + n], gate_up.t())  # (n, 2I)
        act = activation(self.act, h[:, :i]).mul_(h[:, i:])  # (n, I)
        if out.requires_grad or act.requires_grad:
            out[start : start + n] = torch.mm(act, down.t())
        else:
            torch.mm(act, down.t(), out=out[start : start + n])

    def _int8_expert_outputs(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`expert_outputs` for int8 weights, in the (tokens x features) layout int8_linear takes."""
        assert self.gate_up_scale is not None and self.down_scale is not None
        i = self.intermediate
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slot = self.slot_of[e]
            x = xs[start : start + n]
            h = int8_linear(x, self.gate_up[slot], self.gate_up_scale[slot])  # (n, 2I)
            act = activation(self.act, h[:, :i]) * h[:, i:]  # (n, I)
            outs.append(int8_linear(act, self.down[slot], self.down_scale[slot]))  # (n, hidden)
            start += n
        return torch.cat(outs, dim=0)

    def _expert_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert weight views, rebuilt only when the parameters are replaced."""
        if torch.is_grad_enabled() and self.gate_up.requires_grad:
            # Training: cached views belong to an earlier pass's autograd graph, and the
            # optimizer's in-place update invalidates them; take fresh ones (cheap).
            return list(self.gate_up.unbind(0)), list(self.down.unbind(0))
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), self.gate_up.dtype)
        if getattr(self, "_views_key", None) != key:
            self._views = (list(self.gate_up.unbind(0)), list(self.down.unbind(0)))
            self._views_key = key
        return self._views


class MoEBlock(nn.Module):
    def __init__(
        self,
        layer: int,
        hidden: int,
        cfg: MoEConfig,
        act: str,
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = Router(hidden, cfg)
        ids = range(cfg.num_experts) if expert_ids is None else expert_ids
        self.experts = ExpertBank(layer, hidden, cfg, act, ids)
        self.shared = MLP(hidden, cfg.shared_intermediate, act) if cfg.shared_intermediate else None
        self.shared_gate = Linear(hidden, 1, bias=False) if cfg.shared_gate else None

    def forward(self, x: torch.Tensor, stats: RouterStats | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, hidden)
        ids, weights, _ = self.router(flat)
        if stats is not None:
            stats.record(self.layer, ids, weights)
        out = self.experts(flat, ids, weights)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.view(shape)
