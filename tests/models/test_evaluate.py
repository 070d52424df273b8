"""Perplexity through each KV-cache mode."""

from __future__ import annotations

import math

import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.models.evaluate import perplexity


def test_perplexity_equals_exp_of_mean_cross_entropy(hf_checkpoint):
    path, ref = hf_checkpoint("qwen3_moe")
    model = load_model(path)
    ids = torch.randint(0, 256, (65,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(ids[None, :-1]).logits[0]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    got = perplexity(model, ids.tolist(), window=64, chunk=16)
    assert abs(got - expected) / expected < 1e-4


def test_latent_cache_perplexity_equals_expanded_cache(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")
    model = load_model(path)
    ids = torch.randint(0, 256, (129,), generator=torch.Generator().manual_seed(1)).tolist()
    full = perplexity(model, ids, "full", window=64)
    latent = perplexity(model, ids, "latent", window=64)
    assert abs(full - latent) / full < 1e-4


def test_int8_cache_perplexity_is_close_but_not_identical(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    model = load_model(path)
    ids = torch.randint(0, 256, (129,), generator=torch.Generator().manual_seed(2)).tolist()
    full = perplexity(model, ids, "full", window=64)
    int8 = perplexity(model, ids, "int8", window=64)
    assert full != int8  # the int8 path really ran
    assert abs(int8 - full) / full < 0.05
