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


def parse_rope(raw: Mapping[str, Any], dim: int, interleaved: bool = False) -> RopeConfig:
    """Read RoPE settings from either the transformers-5 `rope_parameters` dict or the older
    top-level `rope_theta` + `rope_scaling` fields."""
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError(
            f"config.json: rope scaling type '{kind}' is not supported; supported: default, linear, yarn"
        )
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        dim=dim,
        interleaved=interleaved,
        scaling=kind,
        factor=float(params.get("factor", 1.0)),
        original_max_position=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        mscale=float(params.get("mscale", 1.0)),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0) or 0.0),
    )


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
