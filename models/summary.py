"""What `expertmesh inspect` reports: parameter counts and KV-cache bytes per token per mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import KV_MODES, KVMode, ModelConfig
from .kv_cache import kv_bytes_per_token
from .model import MoEModel


@dataclass(frozen=True)
class KVModeSize:
    mode: KVMode
    bytes_per_token: int
    reduction_vs_mha: float
    """1 - bytes / (bytes of a full-precision multi-head cache of the same model)."""


@dataclass(frozen=True)
class ModelSummary:
    model_type: str
    layers: int
    moe_layers: int
    experts: int
    experts_per_token: int
    total_params: int
    active_params: int
    """Parameters one token passes through: everything but the routed experts it skips."""
    expert_params: int
    """Parameters of one routed expert."""
    kv: tuple[KVModeSize, ...]
    dtype_bytes: int


def count_params(config: ModelConfig) -> tuple[int, int, int]:
    """(total, active per token, one routed expert) without allocating weights."""
    with torch.device("meta"):
        model = MoEModel(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    expert = 3 * config.hidden_size * config.moe.expert_intermediate
    n_moe = len(config.moe_layer_ids)
    skipped = n_moe * (config.moe.num_experts - config.moe.top_k) * expert
    return total, total - skipped, expert


def summarize(config: ModelConfig, dtype_bytes: int = 2) -> ModelSummary:
    """Summary with KV sizes for a `dtype_bytes`-wide cache (2 = bf16/fp16, 4 = fp32)."""
    total, active, expert = count_params(config)
    mha = kv_bytes_per_token(config, "full", dtype_bytes)
    modes = [m for m in KV_MODES if config.attention.kind == "mla" or not m.startswith("latent")]
    kv = tuple(
        KVModeSize(m, b := kv_bytes_per_token(config, m, dtype_bytes), 1 - b / mha) for m in modes
    )
    return ModelSummary(
        model_type=config.model_type,
        layers=config.num_layers,
        moe_layers=len(config.moe_layer_ids),
        experts=config.moe.num_experts,
        experts_per_token=config.moe.top_k,
        total_params=total,
        active_params=active,
        expert_params=expert,
        kv=kv,
        dtype_bytes=dtype_bytes,
    )
