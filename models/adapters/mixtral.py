"""Mixtral: softmax router with the top-k weights always renormalised; experts w1/w3/w2."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import AttentionConfig, ModelConfig, MoEConfig
from .base import Adapter, common_export, common_fields, num_experts, parse_rope, require


class MixtralAdapter(Adapter):
    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **common_export(cfg),
            "head_dim": cfg.attention.head_dim,
            "num_local_experts": cfg.moe.num_experts,
            "intermediate_size": cfg.moe.expert_intermediate,
            "sliding_window": cfg.attention.sliding_window,
        }

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:
        hidden = int(require(raw, "hidden_size"))
        heads = int(require(raw, "num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        layers = int(require(raw, "num_hidden_layers"))
        return ModelConfig(
            **common_fields(raw),
            attention=AttentionConfig(
                kind="mha",
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                sliding_window=raw.get("sliding_window"),
            ),
            moe=MoEConfig(
                num_experts=num_experts(raw),
                top_k=int(require(raw, "num_experts_per_tok")),
                # Mixtral's experts are as wide as its dense `intermediate_size`.
                expert_intermediate=int(require(raw, "intermediate_size")),
                norm_topk_prob=True,
            ),
            moe_layers=(True,) * layers,
            rope=parse_rope(raw, head_dim),
        )


ADAPTER = MixtralAdapter(
    model_types=("mixtral",),
    family_renames=(
        (r"^layers\.(\d+)\.moe\.router\.", r"model.layers.\1.block_sparse_moe.gate."),
        (r"\.moe\.experts\.(\d+)\.gate_proj\.", r".moe.experts.\1.w1."),
        (r"\.moe\.experts\.(\d+)\.up_proj\.", r".moe.experts.\1.w3."),
        (r"\.moe\.experts\.(\d+)\.down_proj\.", r".moe.experts.\1.w2."),
        (r"^layers\.(\d+)\.moe\.", r"model.layers.\1.block_sparse_moe."),
    ),
)
