"""The bundled demo model's shape, and a seeded random initialisation of it.

The demo model is DeepSeek-V3-shaped (multi-head latent attention, sigmoid router with a
score-correction bias, group-limited routing, a shared expert, one leading dense layer), so the
main job exercises every part of the model core. Until the pre-training pipeline trains it,
the committed weights are this seeded random init: generation runs, but the text is noise.

    python -m expertmesh.training.demo --out expertmesh/demo --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import save_model
from expertmesh.models.model import MoEModel, init_random


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


def build_random_demo(out: Path, seed: int = 0) -> Path:
    """Write a seeded random demo model into `out`, which must already hold tokenizer.json."""
    from expertmesh.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    eos = min(tok.eos_token_ids)
    raw = demo_config(tok.vocab_size, tok.bos_token_id, eos)
    config = adapter_for(raw).parse_config(raw)
    model = init_random(MoEModel(config), seed=seed, std=0.02).to(torch.bfloat16)
    return save_model(model, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("expertmesh/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_random_demo(args.out, args.seed))


if __name__ == "__main__":
    main()
