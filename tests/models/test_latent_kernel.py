"""The compiled latent decode kernel (models/latent_kernel.py): it must give what the eager
path gives (scores, softmax, weighted latents), on cache views with row strides, at lengths
that are and are not multiples of its block, and leave a model's greedy tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models import attention, latent_kernel
from expertmesh.models.adapters import adapter_for
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.model import MoEModel, init_random

pytestmark = pytest.mark.skipif(
    not latent_kernel.available(),
    reason=f"latent kernel not built here: {latent_kernel.unavailable_reason()}",
)

DEEPSEEK_V3_RAW = dict(
    model_type="deepseek_v3",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_group=2,
    topk_group=1,
    max_position_embeddings=4096,
)


def _eager(ql, qr, c, kr, scale):
    scores = torch.baddbmm(torch.bmm(ql, c.transpose(1, 2)), qr, kr.transpose(1, 2))
    return torch.bmm((scores * scale).softmax(-1), c)


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 1000, 5000])
@pytest.mark.parametrize(("r", "dr"), [(32, 16), (24, 8)])  # (24, 8): the run-time-width path
def test_kernel_matches_float64_attention_on_strided_cache_views(length, r, dr):
    gen = torch.Generator().manual_seed(length)
    B, h = 2, 4
    store_c = torch.randn(B, length + 9, r, generator=gen) * 2
    store_kr = torch.randn(B, length + 9, dr, generator=gen) * 2
    c, kr = store_c[:, :length], store_kr[:, :length]  # row stride length + 9 positions
    ql = torch.randn(B, h, r, generator=gen)
    qr = torch.randn(B, h, dr, generator=gen)
    with torch.no_grad():
        got = latent_kernel.latent_decode(ql, qr, c, kr, 0.3)
    want = _eager(ql.double(), qr.double(), c.double(), kr.double(), 0.3)
    eager32 = _eager(ql, qr, c, kr, 0.3)
    err = (got.double() - want).abs().max().item()
    # as close to float64 as eager float32 is, within a small factor
    assert err <= max(4 * (eager32.double() - want).abs().max().item(), 2e-6), err


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8])  # the weighted sum runs 4 heads per pass
@pytest.mark.parametrize(("r", "dr"), [(32, 16), (24, 8), (512, 64)])  # 512/64: DeepSeek's
def test_kernel_matches_float64_attention_for_any_head_count(heads, r, dr):
    gen = torch.Generator().manual_seed(heads * 1000 + r)
    B, length = 1, 333  # not a multiple of the block nor of 8
    c = torch.randn(B, length, r, generator=gen) * 2
    kr = torch.randn(B, length, dr, generator=gen) * 2
    ql = torch.randn(B, heads, r, generator=gen) / r**0.5
    qr = torch.randn(B, heads, dr, generator=gen) / dr**0.5
    with torch.no_grad():
        got = latent_kernel.latent_decode(ql, qr, c, kr, 0.7)
    want = _eager(ql.double(), qr.double(), c.double(), kr.double(), 0.7)
    eager32 = _eager(ql, qr, c, kr, 0.7)
    assert got.shape == (B, heads, r)
    err = (got.double() - want).abs().max().item()
    assert err <= max(4 * (eager32.double() - want).abs().max().item(), 2e-6), err


@pytest.mark.parametrize("threads", [2, 3])
def test_keys_split_across_threads_give_the_one_pass_result(threads):
    """With more threads than rows a row's keys are split into parts (>= MIN_PART keys each)
    and merged; the result must be that of one pass, to float32 rounding."""
    gen = torch.Generator().manual_seed(threads)
    length = 3 * latent_kernel.MIN_PART + 77  # three or four parts, the last one short
    c = torch.randn(1, length, 32, generator=gen) * 2
    kr = torch.randn(1, length, 16, generator=gen) * 2
    ql = torch.randn(1, 4, 32, generator=gen) / 4
    qr = torch.randn(1, 4, 16, generator=gen) / 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = latent_kernel.latent_decode(ql, qr, c, kr, 0.5)
        torch.set_num_threads(threads)
        with torch.no_grad():
            split = latent_kernel.latent_decode(ql, qr, c, kr, 0.5)
    finally:
        torch.set_num_threads(before)
    want = _eager(ql.double(), qr.double(), c.double(), kr.double(), 0.5)
    assert (split.double() - want).abs().max().item() < 1e-5
    assert (split - one).abs().max().item() < 1e-5


def test_kernel_does_not_apply_with_autograd_or_other_dtypes():
    c = torch.zeros(1, 8, 32)
    kr = torch.zeros(1, 8, 16)
    q = torch.zeros(1, 4, 32, requires_grad=True)
    with torch.enable_grad():
        assert not latent_kernel.applies(q, c, kr)
    with torch.no_grad():
        assert latent_kernel.applies(q, c, kr)
        assert not latent_kernel.applies(q.double(), c.double(), kr.double())


def test_greedy_tokens_and_logits_are_those_of_the_eager_path(monkeypatch):
    cfg = adapter_for(DEEPSEEK_V3_RAW).parse_config(DEEPSEEK_V3_RAW)
    model = init_random(MoEModel(cfg), seed=3, std=0.2).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (300,), generator=gen).tolist()]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    calls = []
    real = latent_kernel.latent_decode

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(latent_kernel, "latent_decode", counted)
    with_kernel = Generator(model, kv_mode="latent", prefill_chunk=128).generate(prompts, params)
    assert calls, "the kernel never ran: the test would compare the eager path with itself"
    monkeypatch.setattr(latent_kernel, "applies", lambda *a: False)
    eager = Generator(model, kv_mode="latent", prefill_chunk=128).generate(prompts, params)
    assert with_kernel[0].token_ids == eager[0].token_ids
    assert attention.latent_kernel is latent_kernel  # the module attention dispatches through
