"""Qwen2-MoE and Qwen3-MoE.

Qwen2-MoE: q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate(x)).
Qwen3-MoE: no biases, RMSNorm on each head of q and k, explicit `head_dim`, no shared expert.
Both: softmax router, `norm_topk_prob` read from config.json (defaults differ between releases),
dense MLP on `mlp_only_layers` and on layers not hit by `decoder_sparse_step`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import AttentionConfig, ModelConfig, MoEConfig
from ..errors import ConfigError
from .base import (
    Adapter,
    common_export,
    common_fields,
    num_experts,
    parse_rope,
    require,
    uniform_layer_types,
)


def _moe_layers(raw: Mapping[str, Any]) -> tuple[bool, ...]:
    layers = int(require(raw, "num_hidden_layers"))
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    dense_only = set(raw.get("mlp_only_layers") or [])
    n_exp = num_experts(raw)
    return tuple(i not in dense_only and n_exp > 0 and (i + 1) % step == 0 for i in range(layers))


def _sliding_window(raw: Mapping[str, Any]) -> int | None:
    """The window when every layer slides, None when none does. Which layers slide under
    `use_sliding_window` alone depends on `max_window_layers` by rules that changed between
    transformers releases; we run one attention for all layers, so anything else is refused."""
    kind = uniform_layer_types(raw)
    if kind == "full_attention":
        return None
    if kind == "sliding_attention":
        return int(require(raw, "sliding_window"))
    if not raw.get("use_sliding_window"):
        return None
    raise ConfigError(
        "config.json: use_sliding_window true is not implemented for "
        f"{raw.get('model_type')} without layer_types (which layers slide depends on "
        "max_window_layers); set use_sliding_window false, or give layer_types with "
        "'sliding_attention' for every layer"
    )


def _export(cfg: ModelConfig) -> dict[str, Any]:
    """Layer pattern as mlp_only_layers with step 1; the window as use_sliding_window."""
    att, moe = cfg.attention, cfg.moe
    out = common_export(cfg)
    out.update(
        head_dim=att.head_dim,
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.expert_intermediate,
        norm_topk_prob=moe.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, sparse in enumerate(cfg.moe_layers) if not sparse],
        use_sliding_window=att.sliding_window is not None,
        sliding_window=att.sliding_window,
    )
    if att.sliding_window is not None:
        out["layer_types"] = ["sliding_attention"] * cfg.num_layers
    return out


class Qwen2MoeAdapter(Adapter):
    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        out = _export(cfg)
        out.update(
            qkv_bias=cfg.attention.qkv_bias,
            shared_expert_intermediate_size=cfg.moe.shared_intermediate,
        )
        return out

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:
        hidden = int(require(raw, "hidden_size"))
        heads = int(require(raw, "num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        shared = int(raw.get("shared_expert_intermediate_size") or 0)
        return ModelConfig(
            **common_fields(raw),
            attention=AttentionConfig(
                kind="mha",
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                qkv_bias=bool(raw.get("qkv_bias", True)),
                sliding_window=_sliding_window(raw),
            ),
            moe=MoEConfig(
                num_experts=num_experts(raw),
                top_k=int(require(raw, "num_experts_per_tok")),
                expert_intermediate=int(require(raw, "moe_intermediate_size")),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                shared_intermediate=shared,
                shared_gate=shared > 0,
            ),
            moe_layers=_moe_layers(raw),
            rope=parse_rope(raw, head_dim),
        )


class Qwen3MoeAdapter(Adapter):
    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**_export(cfg), "attention_bias": cfg.attention.qkv_bias}

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:
        hidden = int(require(raw, "hidden_size"))
        heads = int(require(raw, "num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        bias = bool(raw.get("attention_bias", False))
        return ModelConfig(
            **common_fields(raw),
            attention=AttentionConfig(
                kind="mha",
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                qkv_bias=bias,
                o_bias=bias,
                qk_norm="per_head",
                sliding_window=_sliding_window(raw),
            ),
            moe=MoEConfig(
                num_experts=num_experts(raw),
                top_k=int(require(raw, "num_experts_per_tok")),
                expert_intermediate=int(require(raw, "moe_intermediate_size")),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            ),
            moe_layers=_moe_layers(raw),
            rope=parse_rope(raw, head_dim),
        )


_RENAMES = (
    (r"^layers\.(\d+)\.moe\.router\.", r"model.layers.\1.mlp.gate."),
    (r"^layers\.(\d+)\.moe\.shared_gate\.", r"model.layers.\1.mlp.shared_expert_gate."),
    (r"^layers\.(\d+)\.moe\.shared\.", r"model.layers.\1.mlp.shared_expert."),
    (r"^layers\.(\d+)\.moe\.", r"model.layers.\1.mlp."),
)

QWEN2_ADAPTER = Qwen2MoeAdapter(model_types=("qwen2_moe",), family_renames=_RENAMES)
QWEN3_ADAPTER = Qwen3MoeAdapter(model_types=("qwen3_moe",), family_renames=_RENAMES)
