"""Every KV cache mode on CUDA: the stores live on the GPU; lossless modes give the CPU's
greedy tokens, lossy (int8) ones stay within the CPU test's bound (median per-position max
logit error <= 0.1 x the logits' std), on every family that has the mode."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.kv_cache import KVCache

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8], [100, 3, 250, 12]]
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
CASES = [
    ("olmoe", "full"),
    ("olmoe", "int8"),
    ("qwen3_moe", "full"),
    ("qwen3_moe", "int8"),
    ("deepseek_v3", "full"),
    ("deepseek_v3", "int8"),
    ("deepseek_v3", "latent"),
    ("deepseek_v3", "latent-int8"),
    ("deepseek_v2", "latent"),
]


def _teacher_forced(model, ids: list[int], mode: str | None) -> torch.Tensor:
    seq = torch.tensor([ids])
    with torch.no_grad():
        if mode is None:
            return model(seq)[0].float().cpu()
        cache = KVCache(model.config, mode, 1, len(ids), model.dtype, CUDA)
        assert all(layer.first.data.device == CUDA for layer in cache.layers)
        out = [model(seq[:, j : j + 1], cache)[0] for j in range(len(ids))]
        return torch.cat(out).float().cpu()


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_kv_cache_mode_on_cuda(family, mode, hf_checkpoint):
    path, _ = hf_checkpoint(family)
    gpu_model = load_model(path, device=CUDA)
    cpu_model = load_model(path)
    gpu = Generator(gpu_model, kv_mode=mode, prefill_chunk=3).generate(PROMPTS, PARAMS)
    if "int8" not in mode:
        cpu = Generator(cpu_model, kv_mode=mode, prefill_chunk=3).generate(PROMPTS, PARAMS)
        assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
        return
    ids = gpu[0].prompt_token_ids + gpu[0].token_ids
    exact = _teacher_forced(cpu_model, ids, None)
    error = (_teacher_forced(gpu_model, ids, mode) - exact).abs().amax(dim=-1)
    assert error.median().item() <= 0.1 * exact.std().item()
