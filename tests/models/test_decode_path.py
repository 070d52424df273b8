"""The decode fast paths: GEMM attention over the heads-major cache, the fused q/k/v GEMM and
the one-column GEMM. Each must give what the plain path gives (SDPA, three projections, mm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.models.adapters import adapter_for
from expertmesh.models.attention import Rotary
from expertmesh.models.config import ModelConfig, RopeConfig
from expertmesh.models.kv_cache import KVCache, TensorStore
from expertmesh.models.model import MoEModel, StepContext, decode_attention, init_random, skinny_mm

QWEN3_MOE_RAW = dict(
    model_type="qwen3_moe",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=64,
)


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A Qwen3-MoE shape: grouped KV heads (2 query heads per KV head) and per-head q/k norms."""
    return adapter_for(QWEN3_MOE_RAW).parse_config(QWEN3_MOE_RAW)


def _ctx(mask: torch.Tensor | None) -> StepContext:
    z = torch.zeros(1)
    return StepContext(z, z, None, torch.arange(1), True, torch.zeros(1, 1), 1, mask)


def test_decode_attention_matches_sdpa_with_gqa_and_ragged_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    B, H, hkv, L, D = 3, 8, 2, 11, 16
    q = torch.randn(B, 1, H, D, generator=gen)
    k = torch.randn(B, hkv, L, D, generator=gen)
    v = torch.randn(B, hkv, L, D, generator=gen)
    lengths = torch.tensor([11, 7, 3])
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
    got = decode_attention(q, k, v, _ctx(mask), D**-0.5)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True
    )
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, 1, H * D))
    # a row's output depends on its own valid keys only
    k2 = k.clone()
    k2[1, :, 7:] = 1e3
    torch.testing.assert_close(decode_attention(q, k2, v, _ctx(mask), D**-0.5), got)


def test_heads_major_store_round_trip_for_scattered_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    store = TensorStore(4, 6, (3, 5), torch.float32)
    assert store.data.shape == (4, 3, 6, 5)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    rows = torch.tensor([3, 1])
    store.write(rows, torch.arange(4).expand(2, 4), x)
    torch.testing.assert_close(store.read(rows, 2, 4, torch.float32), x)
    torch.testing.assert_close(store.read_heads(rows, 2, 4, torch.float32), x.transpose(1, 2))
    assert store.read(torch.tensor([0]), 1, 4, torch.float32).abs().sum() == 0


def test_skinny_mm_one_column_equals_mm() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 64, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    for n in (1, 2, 5):
        xt = x[:n].t()
        torch.testing.assert_close(skinny_mm(w, xt), torch.mm(w, xt), rtol=1e-6, atol=1e-6)


def _model(config: ModelConfig) -> MoEModel:
    return init_random(MoEModel(config).eval(), seed=3, std=0.2)


def test_fused_qkv_keeps_parameters_and_gradients(tiny_config: ModelConfig) -> None:
    model = _model(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    with torch.inference_mode():
        fused_logits = model(ids)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)
    # training: the three projections get their own gradients, and agree with inference
    model.train()
    logits = model(ids)
    torch.testing.assert_close(logits, fused_logits, rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    attn = model.blocks[0].attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # type: ignore[union-attr]
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_cached_decode_equals_full_forward(tiny_config: ModelConfig) -> None:
    model = _model(tiny_config)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 9), generator=gen)
    with torch.inference_mode():
        want = model(ids)[:, -1]
        cache = KVCache(tiny_config, "full", 3, 16)
        model(ids[:, :8], cache)
        got = model(ids[:, 8:], cache, logits_for="last")[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", ["default", "yarn"])
def test_rotary_table_lookup_equals_computing_each_position(
    dtype: torch.dtype, scaling: str
) -> None:
    """cos/sin read from the grown table are the values computed for those positions alone,
    bit for bit, before and after the table grows past its first 256 positions."""
    cfg = RopeConfig(theta=10000.0, dim=16, scaling=scaling, factor=4.0, original_max_position=64)
    rotary = Rotary(cfg)
    for positions in (torch.tensor([[3, 4, 5], [0, 200, 255]]), torch.tensor([[1000], [7]])):
        freqs = positions[..., None].float() * rotary.inv_freq
        cos, sin = rotary.cos_sin(positions, dtype)
        assert cos.shape == (*positions.shape, 8) and cos.dtype == dtype
        assert torch.equal(cos, (freqs.cos() * rotary.scale).to(dtype))
        assert torch.equal(sin, (freqs.sin() * rotary.scale).to(dtype))
    assert rotary._tables[dtype][0].shape[0] == 1024
