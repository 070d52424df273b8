"""Checkpoints we write load in other engines: config.json states every field they read.

A model is built from a config.json that leaves optional fields out (our defaults apply), is
saved with `save_model`, and loaded by `transformers.AutoModelForCausalLM`, whose defaults
differ from ours for some of them (DeepSeek-V3: n_group 8, first_k_dense_replace 3,
routed_scaling_factor 2.5). Its logits must equal ours. The bundled demo checkpoint is
checked the same way, and for the fields vLLM reads (`topk_method: noaux_tc`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import config_for_save, load_model, read_config, save_model
from expertmesh.models.model import MoEModel, init_random
from expertmesh.models.paths import DEMO_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_configs import VOCAB, scaled

transformers = pytest.importorskip("transformers", reason="export tests load in transformers")

# Optional fields: left out, our default applies and the export must state it.
OPTIONAL = (
    "topk_method", "scoring_func", "norm_topk_prob", "n_group", "topk_group", "moe_layer_freq",
    "first_k_dense_replace", "routed_scaling_factor", "decoder_sparse_step", "mlp_only_layers",
    "use_sliding_window", "sliding_window", "max_window_layers", "clip_qkv", "attention_bias",
    "rope_theta", "rope_scaling", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
)  # fmt: skip
# Shared experts stay: transformers builds them whatever their count (0 gives empty tensors it
# reports missing), and every published DeepSeek / Qwen2-MoE checkpoint has them.
NAMES = (
    "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
    "qwen3-30b-a3b+yarn", "mixtral-8x7b", "mixtral-8x7b+window", "olmoe-1b-7b",
)  # fmt: skip
# Kept where leaving them out would make a different (still valid) model than the name says.
KEEP = {
    "deepseek-v2": ("topk_method", "n_group", "topk_group", "routed_scaling_factor"),
    "deepseek-v3": ("n_group", "topk_group", "first_k_dense_replace", "rope_scaling"),
    "deepseek-v2-lite": ("rope_scaling",),
    "qwen3-30b-a3b+yarn": ("rope_scaling",),
    "mixtral-8x7b+window": ("sliding_window",),
}


def minimal(name: str) -> dict:
    keep = KEEP.get(name, ())
    return {k: v for k, v in scaled(name).items() if k not in OPTIONAL or k in keep}


def _ours(raw: dict, seed: int = 0) -> MoEModel:
    cfg = adapter_for(raw).parse_config(raw)
    model = init_random(MoEModel(cfg), seed=seed, std=0.15)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero norms and score bias: both must reach the other engine
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("score_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        return ref.eval()(ids).logits


@pytest.mark.parametrize("name", NAMES)
def test_saved_checkpoint_loads_in_transformers_with_our_logits(name, tmp_path):
    ours = _ours(minimal(name))
    save_model(ours, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(ids)
    got = _transformers_logits(tmp_path, ids)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_saved_config_reads_back_to_the_same_model(name, tmp_path):
    raw = minimal(name)
    save_model(_ours(raw), tmp_path)
    before = adapter_for(raw).parse_config(raw)
    after = read_config(tmp_path)
    assert dataclasses.replace(after, dtype=before.dtype) == before


def test_deepseek_v3_states_its_router_for_vllm(tmp_path):
    """vLLM builds e_score_correction_bias only for topk_method noaux_tc (KeyError otherwise)."""
    save_model(_ours(minimal("deepseek-v3")), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["topk_method"] == "noaux_tc" and saved["scoring_func"] == "sigmoid"
    assert (saved["n_group"], saved["topk_group"], saved["first_k_dense_replace"]) == (8, 4, 1)
    assert saved["routed_scaling_factor"] == 1.0 and saved["norm_topk_prob"] is True
    assert saved["rope_scaling"]["type"] == "yarn" and saved["rope_theta"] == 10000.0
    assert saved["rope_parameters"]["rope_type"] == "yarn"


def test_bundled_demo_config_states_every_exported_field():
    on_disk = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    exported = config_for_save(read_config(DEMO_MODEL_DIR), torch.bfloat16)
    missing = {k: v for k, v in exported.items() if on_disk.get(k, "<absent>") != v}
    assert not missing, f"expertmesh/demo/config.json lacks or differs on {missing}"
    assert on_disk["topk_method"] == "noaux_tc"


def test_bundled_demo_loads_in_transformers_with_our_logits():
    ours = load_model(DEMO_MODEL_DIR)
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator())
    with torch.no_grad():
        expected = ours(ids)
    got = _transformers_logits(DEMO_MODEL_DIR, ids)
    assert (got - expected).abs().max().item() <= 1e-4
