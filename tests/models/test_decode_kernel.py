"""The dense decode kernels (models/decode_kernel.py): the compiled grouped-query attention
step, the compiled q/k norm + rotary + cache write of a prefill, RMSNorm and the few-rows
linear must give what the eager paths give, on rows of different lengths, rows that are not
the cache's first slots and chunked prefills, and leave a model's greedy tokens unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from expertmesh.models import decode_kernel
from expertmesh.models.adapters import adapter_for
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.kv_cache import KVCache
from expertmesh.models.layers import RMSNorm, linear
from expertmesh.models.model import MoEModel, init_random

pytestmark = pytest.mark.skipif(
    not decode_kernel.available(),
    reason=f"decode kernel not built here: {decode_kernel.unavailable_reason()}",
)

QWEN3_MOE_RAW: dict[str, Any] = dict(
    model_type="qwen3_moe",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,  # 3 query heads per KV head
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=256,
)
MIXTRAL_RAW: dict[str, Any] = dict(
    model_type="mixtral",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # no grouping, no q/k norm
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


def _model(raw: dict[str, Any], seed: int = 0) -> MoEModel:
    cfg = adapter_for(raw).parse_config(raw)
    return init_random(MoEModel(cfg).eval(), seed=seed, std=0.15)


@pytest.fixture
def eager() -> Any:
    """A context that runs the model without the decode kernel (every eager path)."""

    class Off:
        def __enter__(self) -> None:
            self.patch = pytest.MonkeyPatch()
            self.patch.setattr(decode_kernel, "available", lambda: False)

        def __exit__(self, *exc: object) -> None:
            self.patch.undo()

    return Off


def _two_caches(model: MoEModel, slots: int, max_len: int) -> tuple[KVCache, KVCache]:
    return tuple(  # type: ignore[return-value]
        KVCache(model.config, "full", slots, max_len) for _ in range(2)
    )


@pytest.mark.parametrize("raw", [QWEN3_MOE_RAW, MIXTRAL_RAW], ids=["qwen3_moe", "mixtral"])
def test_prefill_and_decode_match_eager_on_ragged_rows_and_chunks(raw, eager, monkeypatch) -> None:
    model = _model(raw)
    calls = {"gqa_decode": 0, "gqa_prefill_prep": 0}
    for name in calls:
        real = getattr(decode_kernel, name)

        def counted(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(decode_kernel, name, counted)
    gen = torch.Generator().manual_seed(1)
    ours, ref = _two_caches(model, slots=5, max_len=64)
    with torch.inference_mode():
        # Rows 3 and 1 (not the cache's first slots) prefilled with different lengths, the
        # second in two chunks (the second chunk attends to cached keys through a mask).
        steps = [
            (torch.tensor([3]), torch.randint(0, 256, (1, 9), generator=gen)),
            (torch.tensor([1]), torch.randint(0, 256, (1, 4), generator=gen)),
            (torch.tensor([1]), torch.randint(0, 256, (1, 6), generator=gen)),
        ]
        # Then decode steps of both rows together: lengths 9 and 10, then 10 and 11, ...
        for _ in range(4):
            steps.append((torch.tensor([3, 1]), torch.randint(0, 256, (2, 1), generator=gen)))
        for rows, ids in steps:
            got = model(ids, ours, rows)
            with eager():
                want = model(ids, ref, rows)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(ours.layers, ref.layers):
            torch.testing.assert_close(a.first.data, b.first.data, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.second.data, b.second.data)
        assert torch.equal(ours.lengths, ref.lengths)
    layers = model.config.num_layers
    assert calls == {"gqa_decode": 4 * layers, "gqa_prefill_prep": 3 * layers}


def test_decode_step_reads_only_its_rows_valid_keys() -> None:
    model = _model(QWEN3_MOE_RAW)
    cache = KVCache(model.config, "full", 2, 32)
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        model(torch.randint(0, 256, (2, 5), generator=gen), cache)
        cache.lengths[1] = 3  # row 1 holds 3 tokens; its positions 3.. must be ignored
        step = torch.randint(0, 256, (2, 1), generator=gen)
        saved = [(kv.first.data.clone(), kv.second.data.clone()) for kv in cache.layers]
        first = model(step, cache)
        for kv, (k, v) in zip(cache.layers, saved):
            kv.first.data.copy_(k)
            kv.second.data.copy_(v)
            kv.first.data[1, :, 4:] = 1e4  # garbage beyond row 1's new token
            kv.second.data[1, :, 4:] = -1e4
        cache.lengths[:] = torch.tensor([5, 3])
        second = model(step, cache)
    torch.testing.assert_close(second, first)


@pytest.mark.parametrize("raw", [QWEN3_MOE_RAW, MIXTRAL_RAW], ids=["qwen3_moe", "mixtral"])
def test_greedy_tokens_unchanged_by_the_kernel(raw, eager) -> None:
    model = _model(raw, seed=3)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 12, 12, 30)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    got = [c.token_ids for c in Generator(model, prefill_chunk=8).generate(prompts, params)]
    with eager():
        want = [c.token_ids for c in Generator(model, prefill_chunk=8).generate(prompts, params)]
    assert got == want


def test_rms_norm_matches_the_eager_formula() -> None:
    norm = RMSNorm(48, 1e-6)
    x = torch.randn(3, 5, 48) * 3
    with torch.inference_mode():
        norm.weight.copy_(torch.rand(48) + 0.5)
        got = norm(x)
        want = norm.weight * F.rms_norm(x, (48,), eps=1e-6)
        strided = norm(x.transpose(0, 1))  # non-contiguous input
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(strided, want.transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_rms_norm_keeps_autograd_when_training() -> None:
    norm = RMSNorm(16, 1e-6)
    x = torch.randn(4, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 17, 31, 32])
def test_few_rows_linear_matches_f_linear(rows) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(67, 40, generator=gen)  # odd out rows: the kernel's one-row tail
    bias = torch.randn(67, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    with torch.inference_mode():
        got = decode_kernel.few_rows_linear(x, weight, block=16)
        with_bias = linear(x[None], weight, bias)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_bias, F.linear(x, weight, bias)[None], rtol=1e-5, atol=1e-5)
