"""The `config.json` of published MoE checkpoints, field for field, and scaled-down copies.

Model hubs are unreachable from the build machines, so each dict is written out from the
published file (named above it). `scaled()` replaces only size fields (widths, counts, vocab);
every field that picks the maths (rope, router rule, norms, biases, layer pattern) is kept.
Dropped on purpose, with the reason beside it: `auto_map` (remote code: transformers has the
class natively) and DeepSeek-V3's fp8 `quantization_config` (the test weights are float; that
it is refused with a clear error is tested in test_published_configs.py).
"""

from __future__ import annotations

from typing import Any

# deepseek-ai/DeepSeek-V2-Lite (and -Chat) config.json: no q LoRA, greedy top-6 of 64.
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# deepseek-ai/DeepSeek-V2 (and -Chat) config.json: q LoRA, group-limited greedy (8 groups, 3 kept).
DEEPSEEK_V2: dict[str, Any] = {
    **DEEPSEEK_V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "n_group": 8,
    "n_routed_experts": 160,
    "num_attention_heads": 128,
    "num_hidden_layers": 60,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "routed_scaling_factor": 16.0,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "transformers_version": "4.39.3",
}

# deepseek-ai/DeepSeek-V3 (same fields in DeepSeek-V3-0324 and DeepSeek-R1) config.json;
# "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
# "weight_block_size": [128, 128]} left out (see the module docstring).
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
DEEPSEEK_V3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}

# Qwen/Qwen1.5-MoE-A2.7B config.json: q/k/v biases, shared expert (4 x 1408) with a gate.
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}

# Qwen/Qwen3-30B-A3B config.json: per-head q/k norm, head_dim 128 != hidden / heads, GQA 32:4.
QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# The model card's long-context setting for Qwen3 ("add rope_scaling to config.json").
QWEN3_30B_A3B_YARN = {
    **QWEN3_30B_A3B,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}

# mistralai/Mixtral-8x7B-v0.1 config.json.
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
# Mistral-7B-v0.1's sliding window (4096) on the Mixtral shape, scaled with the context.
MIXTRAL_8X7B_WINDOW = {**MIXTRAL_8X7B, "sliding_window": 4096}

# allenai/OLMoE-1B-7B-0924 config.json: q/k norm over the whole projection, top-8 of 64.
OLMOE_1B_7B: dict[str, Any] = {
    "architectures": ["OlmoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "model_type": "olmoe",
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 50304,
}
# OLMoE with q/k/v clipping (OLMo's `clip_qkv`, null in the released OLMoE files).
OLMOE_1B_7B_CLIP = {**OLMOE_1B_7B, "clip_qkv": 0.6}

VOCAB = 256

# Size fields only: widths, counts and the vocabulary. Ratios the maths depends on are kept
# (GQA groups, head_dim != hidden / heads, experts per group >= 2, top-k < candidates).
_SIZES: dict[str, dict[str, Any]] = {
    "deepseek-v2-lite": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    ),
    "deepseek-v2": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, q_lora_rank=24,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    ),
    "deepseek-v3": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=32, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16,
    ),
    "qwen1.5-moe-a2.7b": dict(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=64, num_hidden_layers=3, max_window_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=12,
    ),
    "qwen3-30b-a3b": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=16, head_dim=16,
        num_hidden_layers=3, max_window_layers=3, num_attention_heads=8, num_key_value_heads=1,
        num_experts=16,
    ),
    "mixtral-8x7b": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "olmoe-1b-7b": dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=16,
    ),
}  # fmt: skip

PUBLISHED: dict[str, tuple[dict[str, Any], str]] = {
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, "deepseek-v2-lite"),
    "deepseek-v2": (DEEPSEEK_V2, "deepseek-v2"),
    "deepseek-v3": (DEEPSEEK_V3, "deepseek-v3"),
    "qwen1.5-moe-a2.7b": (QWEN15_MOE_A27B, "qwen1.5-moe-a2.7b"),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, "qwen3-30b-a3b"),
    "qwen3-30b-a3b+yarn": (QWEN3_30B_A3B_YARN, "qwen3-30b-a3b"),
    "mixtral-8x7b": (MIXTRAL_8X7B, "mixtral-8x7b"),
    "mixtral-8x7b+window": (MIXTRAL_8X7B_WINDOW, "mixtral-8x7b"),
    "olmoe-1b-7b": (OLMOE_1B_7B, "olmoe-1b-7b"),
    "olmoe-1b-7b+clip_qkv": (OLMOE_1B_7B_CLIP, "olmoe-1b-7b"),
}
"""name -> (published config.json, which size table scales it)."""

WINDOW = 8
"""The scaled sliding window: small enough that the test prompts and continuations pass it."""


def scaled(name: str) -> dict[str, Any]:
    """The published config of `name` with its sizes scaled down (see _SIZES)."""
    published, sizes = PUBLISHED[name]
    cfg = {**published, **_SIZES[sizes], "vocab_size": VOCAB}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(cfg.get(key), int) and cfg[key] >= VOCAB:
            cfg[key] = VOCAB - 1  # keep special ids inside the scaled vocabulary
    if cfg.get("sliding_window") and cfg["model_type"] == "mixtral":
        cfg["sliding_window"] = WINDOW
    return cfg
