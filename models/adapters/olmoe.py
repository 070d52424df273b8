"""OLMoE: RMSNorm over the whole q and k projections (not per head), optional `clip_qkv`,
softmax router with `norm_topk_prob` from config.json, every layer sparse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import AttentionConfig, ModelConfig, MoEConfig
from .base import Adapter, common_export, common_fields, num_experts, parse_rope, require


class OlmoeAdapter(Adapter):
    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **common_export(cfg),
            "head_dim": cfg.attention.head_dim,
            "num_experts": cfg.moe.num_experts,
            "intermediate_size": cfg.moe.expert_intermediate,
            "norm_topk_prob": cfg.moe.norm_topk_prob,
            "clip_qkv": cfg.attention.clip_qkv,
            "attention_bias": cfg.attention.qkv_bias,
        }

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:
        hidden = int(require(raw, "hidden_size"))
        heads = int(require(raw, "num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        bias = bool(raw.get("attention_bias", False))
        layers = int(require(raw, "num_hidden_layers"))
        return ModelConfig(
            **common_fields(raw),
            attention=AttentionConfig(
                kind="mha",
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                qkv_bias=bias,
                o_bias=bias,
                qk_norm="full",
                clip_qkv=raw.get("clip_qkv"),
            ),
            moe=MoEConfig(
                num_experts=num_experts(raw),
                top_k=int(require(raw, "num_experts_per_tok")),
                # OLMoE's experts use the config's `intermediate_size`.
                expert_intermediate=int(require(raw, "intermediate_size")),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            ),
            moe_layers=(True,) * layers,
            rope=parse_rope(raw, head_dim),
        )


ADAPTER = OlmoeAdapter(
    model_types=("olmoe",),
    family_renames=(
        (r"^layers\.(\d+)\.moe\.router\.", r"model.layers.\1.mlp.gate."),
        (r"^layers\.(\d+)\.moe\.", r"model.layers.\1.mlp."),
    ),
)
