"""Random checkpoints in a published family's on-disk format, with a real tokenizer, for tests
and benchmarks that must load the same files in several engines (ours, `transformers`, vLLM)
without a model hub.

    save_random_checkpoint("qwen3_moe", QWEN3_MOE_70M, path)   # config + safetensors + tokenizer

The weights come from `transformers`' own model class (`save_pretrained`, so the file layout
and config.json are exactly what other engines read), redrawn from N(0, std) with a seeded
generator (norms near 1) so the checkpoint is the same on every run whatever transformers'
init does. The tokenizer files are the bundled demo model's (a 4096-token byte-level BPE with
chat markers and a chat template): the vocabulary size must be 4096. `generation_config.json`
names both `<|endoftext|>` and `<|end|>` as end tokens, so every engine stops on the same ones
(Hugging Face readers ignore our `additional_eos_tokens`).

Needs `transformers` (the `dev` extra); it is imported only when a checkpoint is built.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .paths import DEMO_MODEL_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEMO_VOCAB = 4096
END_TOKEN_IDS = (0, 4)
"""`<|endoftext|>` and `<|end|>` in the demo tokenizer."""

QWEN3_MOE_TINY: dict[str, Any] = dict(
    vocab_size=DEMO_VOCAB,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention takes head sizes 32, 64, 80, ...
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
"""A ~1.5M-parameter Qwen3-MoE: loads in a second, yet every MoE code path runs."""

QWEN3_MOE_70M: dict[str, Any] = dict(
    vocab_size=DEMO_VOCAB,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
"""The benchmark shape (issue 15, "70M"): hidden 512, 8 layers, 16 experts top-2, vocab 4096;
60.9M parameters (50.3M of them experts). `intermediate_size` is unused: every layer is MoE."""

FAMILY_CLASSES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


def save_random_checkpoint(
    family: str, sizes: dict[str, Any], path: str | Path, seed: int = 0, std: float = 0.1
) -> int:
    """Write a random `family` checkpoint of `sizes` (config fields) to `path`; its parameter
    count. See the module docstring for what is written."""
    import torch
    import transformers

    if family not in FAMILY_CLASSES:
        raise ValueError(f"family {family!r} is not one of {sorted(FAMILY_CLASSES)}")
    if sizes.get("vocab_size") != DEMO_VOCAB:
        raise ValueError(f"vocab_size must be {DEMO_VOCAB} (the demo tokenizer's vocabulary)")
    path = Path(path)
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    config = config_cls(**sizes, bos_token_id=0, eos_token_id=list(END_TOKEN_IDS), pad_token_id=0)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise * std)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEMO_MODEL_DIR / name, path / name)
    generation = {"bos_token_id": 0, "eos_token_id": list(END_TOKEN_IDS), "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())
