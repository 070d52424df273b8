"""The MoE decoder: one readable implementation for Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3.

Plain `nn.Module`s in the gpt-fast style. Shapes in comments use
B = batch rows, T = new tokens this step, L = key length (cached + new), H = heads,
D = head dim, E = experts, N = B*T flattened tokens, k = experts per token.

Parameter names are family-neutral (`layers.3.moe.router.weight`); the adapters in
`models/adapters/` map them to each family's checkpoint names.

Two seams matter to the rest of expertmesh:
- `DecoderLayer.attention_block` / `DecoderLayer.ffn_block` split a layer so the cluster can
  run attention on one node and the experts on others.
- `ExpertBank` holds any subset of a layer's experts and refuses (raises) when tokens are
  routed to an expert it does not hold, so no expert is ever silently skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .attention import (
    Attention,
    MLAttention,
    Rotary,
    StepContext,
    cache_update,
    decode_attention,
    rope_inv_freq,
    sdpa,
)
from .config import ModelConfig
from .layers import SKINNY_ROWS, Linear, RMSNorm, activation, int8_linear, linear, skinny_mm
from .moe import MLP, ExpertBank, MoEBlock, Router

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .router_stats import RouterStats

LogitsFor = Literal["last", "all"]

# ----------------------------------------------------------------------------- layers and model


class DecoderLayer(nn.Module):
    def __init__(
        self, layer: int, config: ModelConfig, expert_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        attn_cls = MLAttention if config.attention.kind == "mla" else Attention
        self.layer = layer
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = attn_cls(hidden, config.attention, config.rope, eps)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.moe: MoEBlock | None = None
        self.mlp: MLP | None = None
        if config.moe_layers[layer]:
            self.moe = MoEBlock(layer, hidden, config.moe, config.hidden_act, expert_ids)
        else:
            self.mlp = MLP(hidden, config.dense_intermediate, config.hidden_act)

    def attention_block(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x), ctx, self.layer)

    def ffn_block(self, x: torch.Tensor, stats: RouterStats | None = None) -> torch.Tensor:
        h = self.mlp_norm(x)
        if self.moe is not None:
            return x + self.moe(h, stats)
        assert self.mlp is not None
        return x + self.mlp(h)

    def forward(
        self, x: torch.Tensor, ctx: StepContext, stats: RouterStats | None = None
    ) -> torch.Tensor:
        return self.ffn_block(self.attention_block(x, ctx), stats)


class MoEModel(nn.Module):
    """Decoder-only MoE language model.

    `expert_ids` selects which routed experts each MoE layer materialises
    ({layer: ids}; layers not named, or None, hold all experts).
    """

    def __init__(
        self, config: ModelConfig, expert_ids: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        selection = expert_ids or {}
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(i, config, selection.get(i)) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary: Rotary = self.blocks[0].attn.rotary

    @property
    def blocks(self) -> list[DecoderLayer]:
        """The decoder layers, typed (nn.ModuleList items are plain Modules to a type checker)."""
        return list(self.layers)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def context(
        self, B: int, T: int, cache: KVCache | None, rows: torch.Tensor | None
    ) -> StepContext:
        """Positions, rotary tables and the attention mask for B rows of T new tokens."""
        if rows is None:
            rows = torch.arange(B)
            prefix = True
        else:
            prefix = bool(rows.numel() == B and torch.equal(rows, torch.arange(B)))
        start = cache.lengths[rows] if cache is not None else torch.zeros(B, dtype=torch.long)
        write_pos = start[:, None] + torch.arange(T)  # (B, T)
        key_len = int(start.max()) + T
        window = self.config.attention.sliding_window
        mask = None
        # A decode step whose rows all hold the same length attends to every key: no mask.
        uniform_decode = T == 1 and bool((start == start[0]).all())
        needs_window = window is not None and key_len > window
        if (key_len != T and not uniform_decode) or needs_window:
            keys = torch.arange(key_len)  # (L,)
            mask = keys[None, None, :] <= write_pos[:, :, None]  # (B, T, L) causal
            if window is not None:
                mask &= keys[None, None, :] > write_pos[:, :, None] - window
            mask = mask[:, None]  # (B, 1, T, L)
        cos, sin = self.rotary.cos_sin(write_pos, self.dtype)
        device = self.embed.weight.device
        if device.type != "cpu":  # positions are host bookkeeping; the tables go to the weights
            cos, sin = cos.to(device), sin.to(device)
            mask = None if mask is None else mask.to(device)
        return StepContext(cos, sin, cache, rows, prefix, write_pos, key_len, mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        router_stats: RouterStats | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden); advances the cache by T for `rows`."""
        B, T = input_ids.shape
        ctx = self.context(B, T, cache, rows)
        x = self.embed(input_ids.to(self.embed.weight.device))
        for layer in self.layers:
            x = layer(x, ctx, router_stats)
        if cache is not None:
            cache.advance(ctx.rows, T)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        logits_for: LogitsFor = "all",
        router_stats: RouterStats | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for logits_for='last'."""
        h = self.hidden_states(input_ids, cache, rows, router_stats)
        if logits_for == "last":
            h = h[:, -1:]
        return self.lm_head(h)


def init_random(model: MoEModel, seed: int = 0, std: float = 0.02) -> MoEModel:
    """Seeded random weights (norms to 1, DeepSeek score bias to 0): demo and benchmark models."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("score_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


__all__ = [
    "MLP",
    "SKINNY_ROWS",
    "Attention",
    "DecoderLayer",
    "ExpertBank",
    "Linear",
    "LogitsFor",
    "MLAttention",
    "MoEBlock",
    "MoEModel",
    "RMSNorm",
    "Rotary",
    "Router",
    "StepContext",
    "activation",
    "cache_update",
    "decode_attention",
    "init_random",
    "int8_linear",
    "linear",
    "rope_inv_freq",
    "sdpa",
    "skinny_mm",
]
