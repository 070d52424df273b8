"""Our own model configuration, parsed from a checkpoint's `config.json` by a family adapter.

Frozen dataclasses: the model maths reads these and never the raw Hugging Face dict, so a new
family only needs an adapter that fills them in (see `models/adapters/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AttentionKind = Literal["mha", "mla"]
QKNorm = Literal["none", "per_head", "full"]
Scoring = Literal["softmax", "sigmoid"]
TopkMethod = Literal["greedy", "group_max", "group_top2_sum"]
KVMode = Literal["full", "int8", "latent", "latent-int8"]
ExpertWeights = Literal["float", "int8"]
KV_MODES: tuple[KVMode, ...] = ("full", "int8", "latent", "latent-int8")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding."""

    theta: float
    """Base of the inverse frequencies."""
    dim: int
    """Number of rotated dimensions per head (all of them for MHA, `qk_rope_head_dim` for MLA)."""
    interleaved: bool = False
    """True: rotate adjacent pairs (x0, x1), (x2, x3) as DeepSeek lays them out;
    False: rotate the two halves (GPT-NeoX / Llama layout)."""
    scaling: str = "default"
    """'default', 'linear' or 'yarn'."""
    factor: float = 1.0
    original_max_position: int | None = None
    """YaRN: the context length the model was pre-trained with."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    """YaRN: `mscale` of config.json's rope_scaling (0: absent)."""
    mscale_all_dim: float = 0.0
    """YaRN: `mscale_all_dim` (0: absent); MLA also scales its softmax by mscale(factor, it)^2."""
    attention_factor: float | None = None
    """YaRN: the factor cos/sin are multiplied by; None: derived from factor and the mscales."""
    truncate: bool = True
    """YaRN: round the correction range to whole dimensions (transformers' `truncate`)."""


@dataclass(frozen=True)
class AttentionConfig:
    """Self-attention of one decoder layer (the same for every layer)."""

    kind: AttentionKind
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Per-head dim of q/k/v for MHA; for MLA this is `qk_nope_dim + qk_rope_dim`."""
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    """'per_head': RMSNorm over head_dim (Qwen3); 'full': over the whole projection (OLMoE)."""
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # Multi-head latent attention (DeepSeek-V2/V3) only:
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    softmax_scale: float = 1.0


@dataclass(frozen=True)
class MoEConfig:
    """The sparse feed-forward block: router, routed experts and optional shared experts."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    scoring: Scoring = "softmax"
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_in_fp32: bool = False
    """Compute router logits in fp32 even when the model runs in bf16 (DeepSeek)."""
    score_correction_bias: bool = False
    """DeepSeek-V3's `e_score_correction_bias`: added to scores for choosing experts only."""
    shared_intermediate: int = 0
    """Intermediate size of the always-on shared expert(s); 0 means none."""
    shared_gate: bool = False
    """Qwen2-MoE scales the shared expert by sigmoid(Linear(hidden, 1))."""
    expert_weights: ExpertWeights = "float"
    """'int8': routed experts hold int8 weights with one scale per output channel (weight-only
    quantisation; checkpoints say so in config.json's `quantization_config`, see
    `models/checkpoint.py`)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model maths needs, independent of the checkpoint family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dense_intermediate: int
    """Intermediate size of the dense MLP in non-MoE layers."""
    rms_norm_eps: float
    attention: AttentionConfig
    moe: MoEConfig
    moe_layers: tuple[bool, ...]
    """moe_layers[i] is True when layer i has a sparse MoE block, False for a dense MLP."""
    rope: RopeConfig
    hidden_act: str = "silu"
    tie_embeddings: bool = False
    max_position: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    """The checkpoint's config.json as read; written back unchanged on save."""

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @property
    def default_kv_mode(self) -> KVMode:
        return "latent" if self.attention.kind == "mla" else "full"

    def check_kv_mode(self, mode: str) -> KVMode:
        from .errors import ConfigError

        if mode not in KV_MODES:
            raise ConfigError(
                f"kv cache mode '{mode}' is unknown; use one of {', '.join(KV_MODES)}"
            )
        if mode.startswith("latent") and self.attention.kind != "mla":
            raise ConfigError(
                f"kv cache mode '{mode}' needs multi-head latent attention (DeepSeek-V2/V3); "
                f"this {self.model_type} model uses MHA: use 'full' or 'int8'"
            )
        return mode  # type: ignore[return-value]
