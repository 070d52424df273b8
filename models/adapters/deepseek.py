"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention, shared experts, leading dense layers.

V2: softmax router, greedy or group-limited (group score = max) top-k, scaled by
`routed_scaling_factor` (transformers applies no top-k renormalisation for V2).
V3: sigmoid router; `e_score_correction_bias` shifts scores for the choice only; group score =
sum of the group's top-2; chosen weights optionally renormalised, then scaled.
RoPE on the `qk_rope_head_dim` part uses DeepSeek's interleaved pair layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig, TopkMethod
from ..errors import ConfigError
from .base import (
    Adapter,
    common_export,
    common_fields,
    num_experts,
    only,
    parse_rope,
    require,
)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _mla_attention(raw: Mapping[str, Any], rope: RopeConfig) -> AttentionConfig:
    nope = int(require(raw, "qk_nope_head_dim"))
    rope_dim = int(require(raw, "qk_rope_head_dim"))
    scale = (nope + rope_dim) ** -0.5
    if rope.scaling != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    heads = int(require(raw, "num_attention_heads"))
    bias = bool(raw.get("attention_bias", False))
    return AttentionConfig(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope_dim,
        o_bias=bias,
        qkv_bias=bias,
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=int(require(raw, "kv_lora_rank")),
        qk_nope_dim=nope,
        qk_rope_dim=rope_dim,
        v_head_dim=int(require(raw, "v_head_dim")),
        softmax_scale=scale,
    )


def _moe_layers(raw: Mapping[str, Any]) -> tuple[bool, ...]:
    layers = int(require(raw, "num_hidden_layers"))
    first_dense = int(raw.get("first_k_dense_replace", 0) or 0)
    freq = int(raw.get("moe_layer_freq", 1) or 1)
    return tuple(i >= first_dense and i % freq == 0 for i in range(layers))


@dataclass(frozen=True)
class DeepseekAdapter(Adapter):
    version: int = 3

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:
        version = self.version
        rope = parse_rope(raw, int(require(raw, "qk_rope_head_dim")), interleaved=True)
        if version == 3 and raw.get("rope_interleave") is False:
            rope = RopeConfig(**{**rope.__dict__, "interleaved": False})
        n_group = int(raw.get("n_group") or 1)
        topk_group = int(raw.get("topk_group") or 1)
        n_exp = num_experts(raw)
        if n_exp % n_group:
            raise ConfigError(
                f"config.json: n_routed_experts ({n_exp}) must be divisible by n_group ({n_group})"
            )
        if version == 3:
            # transformers' and DeepSeek's own V3 code implement only these.
            only(raw, "topk_method", ("noaux_tc",), "noaux_tc")
            scoring = only(raw, "scoring_func", ("sigmoid",), "sigmoid")
            topk_method: TopkMethod = "group_top2_sum"
            norm = bool(raw.get("norm_topk_prob", True))
        else:
            scoring = only(raw, "scoring_func", ("softmax",), "softmax")
            method = only(raw, "topk_method", ("greedy", "group_limited_greedy"), "greedy")
            topk_method = "greedy" if method == "greedy" else "group_max"
            # DeepSeek's V2 code renormalises and then skips routed_scaling_factor; transformers
            # ignores the flag; vLLM renormalises and scales: no answer to follow.
            norm = bool(only(raw, "norm_topk_prob", (False,), False))
        return ModelConfig(
            **common_fields(raw),
            attention=_mla_attention(raw, rope),
            moe=MoEConfig(
                num_experts=n_exp,
                top_k=int(require(raw, "num_experts_per_tok")),
                expert_intermediate=int(require(raw, "moe_intermediate_size")),
                scoring=scoring,
                topk_method=topk_method,
                n_group=n_group,
                topk_group=topk_group,
                norm_topk_prob=norm,
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                router_in_fp32=True,
                score_correction_bias=version == 3,
                shared_intermediate=int(raw.get("n_shared_experts") or 0)
                * int(require(raw, "moe_intermediate_size")),
            ),
            moe_layers=_moe_layers(raw),
            rope=rope,
        )

    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        """vLLM keys its router on `topk_method` (noaux_tc: it expects e_score_correction_bias)
        and `scoring_func`; transformers on the rest. All stated, none left to defaults."""
        att, moe, raw = cfg.attention, cfg.moe, cfg.raw
        out = common_export(cfg)
        if self.version == 3:
            method = "noaux_tc"
            out["rope_interleave"] = cfg.rope.interleaved
        else:
            method = "greedy" if moe.topk_method == "greedy" else "group_limited_greedy"
        out.update(
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.shared_intermediate // moe.expert_intermediate,
            moe_intermediate_size=moe.expert_intermediate,
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
            topk_method=method,
            scoring_func=moe.scoring,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            norm_topk_prob=moe.norm_topk_prob,
            routed_scaling_factor=moe.routed_scaling_factor,
            q_lora_rank=att.q_lora_rank,
            kv_lora_rank=att.kv_lora_rank,
            qk_nope_head_dim=att.qk_nope_dim,
            qk_rope_head_dim=att.qk_rope_dim,
            v_head_dim=att.v_head_dim,
            attention_bias=att.qkv_bias,
        )
        return out


_RENAMES = (
    (r"^layers\.(\d+)\.moe\.router\.weight$", r"model.layers.\1.mlp.gate.weight"),
    (
        r"^layers\.(\d+)\.moe\.router\.score_bias$",
        r"model.layers.\1.mlp.gate.e_score_correction_bias",
    ),
    (r"^layers\.(\d+)\.moe\.shared\.", r"model.layers.\1.mlp.shared_experts."),
    (r"^layers\.(\d+)\.moe\.", r"model.layers.\1.mlp."),
    (r"\.attn\.q_a_norm\.", ".attn.q_a_layernorm."),
    (r"\.attn\.kv_a_norm\.", ".attn.kv_a_layernorm."),
    (r"\.attn\.kv_a_proj\.", ".attn.kv_a_proj_with_mqa."),
)

V2_ADAPTER = DeepseekAdapter(model_types=("deepseek_v2",), family_renames=_RENAMES, version=2)
V3_ADAPTER = DeepseekAdapter(model_types=("deepseek_v3",), family_renames=_RENAMES, version=3)
