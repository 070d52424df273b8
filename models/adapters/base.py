"""What every family adapter shares: the name-mapping mechanism and config parsing helpers.

Our parameter names (see `models/model.py`) are family-neutral, e.g.
`layers.3.moe.experts.5.gate_proj.weight`. An adapter maps each to the tensor name in the
family's Hugging Face safetensors files with an ordered list of regex substitutions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..config import ModelConfig, RopeConfig
from ..errors import ConfigError

ExpertProj = Literal["gate_proj", "up_proj", "down_proj"]

# Shared by every family: HF nests the decoder under `model.` and uses these module names.
COMMON_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embed\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
)


@dataclass(frozen=True)
class Adapter:
    """Checkpoint name mapping and config parsing for one model family."""

    model_types: tuple[str, ...]
    family_renames: tuple[tuple[str, str], ...]
    """Applied before COMMON_RENAMES; they see our names and may rewrite `layers.N.moe.` etc."""

    def parse_config(self, raw: Mapping[str, Any]) -> ModelConfig:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement parse_config")

    def export_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json fields, stated explicitly, that other engines (transformers, vLLM) read
        for this family, with the values our maths uses (their defaults differ between
        engines and releases). Family adapters add theirs to `common_export(cfg)`."""
        return common_export(cfg)

    def hf_name(self, name: str) -> str:
        """The checkpoint tensor name for one of our parameter names."""
        for pattern, repl in (*self.family_renames, *COMMON_RENAMES):
            name = re.sub(pattern, repl, name)
        return name

    def expert_name(self, layer: int, expert: int, proj: ExpertProj) -> str:
        return self.hf_name(f"layers.{layer}.moe.experts.{expert}.{proj}.weight")


def require(raw: Mapping[str, Any], key: str, *alternatives: str) -> Any:
    """The first of `key`, `alternatives` present in config.json, or a ConfigError naming them."""
    for k in (key, *alternatives):
        if raw.get(k) is not None:
            return raw[k]
    names = " or ".join(repr(k) for k in (key, *alternatives))
    raise ConfigError(
        f"config.json: field {names} is missing; it is required for {raw.get('model_type')}"
    )


ROPE_TYPES = ("default", "linear", "yarn")
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "yarn": {
        "rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
        "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "attention_factor", "truncate",
    },
}  # fmt: skip


def parse_rope(raw: Mapping[str, Any], dim: int, interleaved: bool = False) -> RopeConfig:
    """Read RoPE settings from either the transformers-5 `rope_parameters` dict or the older
    top-level `rope_theta` + `rope_scaling` fields (as the published checkpoints carry them).

    Defaults follow transformers: YaRN's `original_max_position_embeddings` falls back to a
    top-level field of that name, then to max_position_embeddings; `factor` is required (as
    transformers requires it). A key we do not implement is an error naming it."""
    if raw.get("rope_scaling") and raw.get("rope_parameters"):
        # transformers 5 takes rope_scaling, 4.x knows only it: both must say the same.
        legacy = parse_rope({**raw, "rope_parameters": None}, dim, interleaved)
        current = parse_rope({**raw, "rope_scaling": None}, dim, interleaved)
        if legacy != current:
            raise ConfigError(
                "config.json: rope_scaling and rope_parameters disagree "
                f"({raw['rope_scaling']} vs {raw['rope_parameters']}); keep one"
            )
        return legacy
    where = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = dict(raw.get(where) or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError(
            f"config.json: {where} holds one entry per layer type ({', '.join(params)}); "
            "per-layer RoPE is not implemented: give one rope_parameters dict"
        )
    if params.get("rope_theta") is None:
        params["rope_theta"] = raw.get("rope_theta", 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: {where}.rope_type '{kind}' is not implemented; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    unknown = sorted(set(params) - _ROPE_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"config.json: {where}.{unknown[0]} is not implemented for rope type '{kind}'; "
            f"supported keys: {', '.join(sorted(_ROPE_KEYS[kind]))}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(
            f"config.json: partial_rotary_factor {partial} is not implemented; "
            "expertmesh rotates the whole rotary head dim (1.0)"
        )
    orig = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    factor = params.get("factor")
    if kind in ("linear", "yarn") and factor is None:
        raise ConfigError(f"config.json: {where}.factor is missing; {kind} RoPE scaling needs it")
    if kind == "yarn":
        orig = int(orig or require(raw, "max_position_embeddings"))
    attention_factor = params.get("attention_factor")
    return RopeConfig(
        theta=float(params["rope_theta"]),
        dim=dim,
        interleaved=interleaved,
        scaling=kind,
        factor=float(factor if factor is not None else 1.0),
        original_max_position=int(orig) if orig else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def only(raw: Mapping[str, Any], key: str, supported: tuple[Any, ...], default: Any) -> Any:
    """config.json's `key` (default when absent or null), or a ConfigError when it holds a
    value whose maths we do not implement: a field is never silently ignored."""
    value = raw.get(key)
    if value is None:
        value = default
    if value not in supported:
        raise ConfigError(
            f"config.json: {key} {value!r} is not implemented for {raw.get('model_type')}; "
            f"supported: {', '.join(repr(v) for v in supported)}"
        )
    return value


def uniform_layer_types(raw: Mapping[str, Any]) -> str | None:
    """transformers-5 `layer_types`: 'full_attention' or 'sliding_attention' when every layer
    has the same one (None when absent); a per-layer mix is refused."""
    types = raw.get("layer_types")
    if not types:
        return None
    kinds = sorted(set(types))
    if len(kinds) > 1 or kinds[0] not in ("full_attention", "sliding_attention"):
        raise ConfigError(
            f"config.json: layer_types {kinds} is not implemented: expertmesh runs the same "
            "attention on every layer ('full_attention' or 'sliding_attention')"
        )
    return str(kinds[0])


def eos_ids(raw: Mapping[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def check_act(raw: Mapping[str, Any]) -> str:
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise ConfigError(f"config.json: hidden_act '{act}' is not supported; use silu or gelu")
    return str(act)


def common_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields that every family spells the same way."""
    only(raw, "mlp_bias", (False,), False)
    return dict(
        model_type=str(raw["model_type"]),
        vocab_size=int(require(raw, "vocab_size")),
        hidden_size=int(require(raw, "hidden_size")),
        num_layers=int(require(raw, "num_hidden_layers")),
        dense_intermediate=int(raw.get("intermediate_size") or 0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=check_act(raw),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position=int(raw.get("max_position_embeddings", 4096)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids(raw),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        raw=dict(raw),
    )


def num_experts(raw: Mapping[str, Any]) -> int:
    return int(require(raw, "num_experts", "num_local_experts", "n_routed_experts"))


ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def rope_export(rope: RopeConfig) -> dict[str, Any]:
    """RoPE in both spellings: transformers-5 `rope_parameters`, and top-level `rope_theta` +
    `rope_scaling` (null for plain RoPE) that transformers 4.x and the published files use."""
    params: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling}
    if rope.scaling in ("linear", "yarn"):
        params["factor"] = rope.factor
    if rope.scaling == "yarn":
        params.update(
            original_max_position_embeddings=rope.original_max_position,
            beta_fast=rope.beta_fast,
            beta_slow=rope.beta_slow,
        )
        if rope.mscale:
            params["mscale"] = rope.mscale
        if rope.mscale_all_dim:
            params["mscale_all_dim"] = rope.mscale_all_dim
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
        if not rope.truncate:
            params["truncate"] = False
    legacy = None
    if rope.scaling != "default":
        legacy = {k: v for k, v in params.items() if k != "rope_theta"}
        legacy["type"] = rope.scaling
    return {"rope_theta": rope.theta, "rope_scaling": legacy, "rope_parameters": params}


def common_export(cfg: ModelConfig) -> dict[str, Any]:
    att = cfg.attention
    out: dict[str, Any] = {
        "model_type": cfg.model_type,
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_kv_heads,
        "num_experts_per_tok": cfg.moe.top_k,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
        **rope_export(cfg.rope),
    }
    if cfg.dense_intermediate:
        out["intermediate_size"] = cfg.dense_intermediate
    return out
