"""The model a training job starts from: a checkpoint, or a seeded init of a preset or config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import load_model
from expertmesh.models.model import MoEModel, init_random
from expertmesh.models.tokenizer import Tokenizer

from .config import ModelSection, TrainingConfigError


def demo_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int) -> dict[str, Any]:
    """config.json of the demo model (Hugging Face DeepSeek-V3 field names)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 192,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": None,
        # latent 40 + rope 16 = 56 values/token/layer vs 8 heads x (48 + 32) = 640 for MHA
        "kv_lora_rank": 40,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "rope_interleave": True,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": "bfloat16",
    }


def tokenizer_dir(section: ModelSection) -> Path:
    """Absolute directory of the tokenizer files the job trains with."""
    path = Path(section.checkpoint or section.tokenizer).resolve()
    if not (path / "tokenizer.json").is_file():
        field = "model.checkpoint" if section.checkpoint else "model.tokenizer"
        raise TrainingConfigError(f"{field}: {path} holds no tokenizer.json")
    return path


def fresh_config(section: ModelSection, tokenizer: Tokenizer) -> dict[str, Any] | None:
    """config.json fields of a fresh model (None when starting from a checkpoint).

    The vocabulary size and special token ids always come from the tokenizer.
    """
    if section.checkpoint is not None:
        return None
    raw: dict[str, Any] = {}
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0
    if section.preset == "demo":
        raw = demo_config(tokenizer.vocab_size, tokenizer.bos_token_id, eos)
    raw.update(section.config or {})
    raw.update(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos
    )
    raw["dtype"] = "float32"
    try:
        adapter_for(raw).parse_config(raw)
    except Exception as e:  # a bad config.json field: name it at the edge
        raise TrainingConfigError(f"model.config: {e}") from e
    return raw


def start_model(section: ModelSection, raw: dict[str, Any] | None) -> MoEModel:
    """fp32 model in train mode: loaded from `section.checkpoint`, or initialised from `raw`."""
    if section.checkpoint is not None:
        return load_model(Path(section.checkpoint).resolve(), dtype="float32").train()
    assert raw is not None
    config = adapter_for(raw).parse_config(raw)
    return init_random(MoEModel(config), seed=section.seed, std=section.init_std).train()
