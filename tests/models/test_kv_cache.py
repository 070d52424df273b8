"""KV cache sizing, the MLA latent saving, int8 storage, and mode validation."""

from __future__ import annotations

import pytest
import torch

from expertmesh.models.adapters.deepseek import V3_ADAPTER
from expertmesh.models.adapters.olmoe import ADAPTER as OLMOE_ADAPTER
from expertmesh.models.config import ModelConfig
from expertmesh.models.errors import ConfigError
from expertmesh.models.kv_cache import Int8Store, KVCache, kv_bytes_per_token

MHA = OLMOE_ADAPTER.parse_config(
    {
        "model_type": "olmoe",
        "vocab_size": 64,
        "hidden_size": 48,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    }
)
MLA = V3_ADAPTER.parse_config(
    {
        "model_type": "deepseek_v3",
        "vocab_size": 64,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "kv_lora_rank": 24,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 12,
        "v_head_dim": 10,
    }
)
DEEPSEEK_V3 = V3_ADAPTER.parse_config(
    {
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 163840,
    }
)

CASES = [
    ("mha", MHA, mode, dtype)
    for mode in ("full", "int8")
    for dtype in (torch.float32, torch.bfloat16)
] + [
    ("mla", MLA, mode, dtype)
    for mode in ("full", "int8", "latent", "latent-int8")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize(
    ("kind", "config", "mode", "dtype"), CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES]
)
def test_kv_bytes_per_token_matches_the_bytes_a_cache_allocates(
    kind, config: ModelConfig, mode, dtype
):
    num_slots, max_len = 3, 7
    cache = KVCache(config, mode, num_slots, max_len, dtype)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()

    allocated = cache.nbytes / (num_slots * max_len)
    assert allocated == kv_bytes_per_token(config, mode, dtype_bytes)


def test_deepseek_v3_latent_cache_is_at_least_90_percent_smaller_than_the_expanded_cache():
    full = kv_bytes_per_token(DEEPSEEK_V3, "full", 2)
    latent = kv_bytes_per_token(DEEPSEEK_V3, "latent", 2)

    # 61 layers x (128 heads x (192 + 128) values) vs 61 layers x (512 + 64) values, bf16.
    assert full == 61 * 128 * (192 + 128) * 2
    assert latent == 61 * (512 + 64) * 2
    assert latent <= 0.1 * full, f"latent {latent} B/token vs full {full} B/token"


@pytest.mark.parametrize(("int8_mode", "bf16_mode"), [("latent-int8", "latent"), ("int8", "full")])
def test_int8_roughly_halves_a_bf16_cache(int8_mode, bf16_mode):
    ratio = kv_bytes_per_token(DEEPSEEK_V3, int8_mode, 2) / kv_bytes_per_token(
        DEEPSEEK_V3, bf16_mode, 2
    )
    assert 0.5 <= ratio <= 0.55, ratio


def _within_int8_error(got: torch.Tensor, want: torch.Tensor) -> None:
    """Symmetric absmax quantisation: each value is off by at most half a step (absmax / 127 / 2).

    The slack covers a scale stored in fp16 (relative rounding 2**-11); a shared or misplaced
    scale, or a dropped rounding, is off by far more."""
    step = want.abs().amax(dim=-1, keepdim=True) / 127.0
    error = (got - want).abs()
    assert (error <= step / 2 * (1 + 2**-10) + 1e-6).all(), (error / step).max().item()


def test_int8_store_round_trip_is_within_half_a_quantisation_step():
    gen = torch.Generator().manual_seed(0)
    store = Int8Store(2, 6, (3, 16), torch.float32)
    # per-vector magnitudes spanning four orders, so one shared scale would fail
    x = torch.randn(2, 6, 3, 16, generator=gen) * torch.logspace(-2, 2, 3)[:, None]
    store.write(torch.arange(2), torch.arange(6).expand(2, 6), x)

    got = store.read(None, 2, 6, torch.float32)
    assert got.shape == x.shape
    _within_int8_error(got, x)


def test_int8_store_slots_of_different_lengths_do_not_interfere():
    gen = torch.Generator().manual_seed(1)
    store = Int8Store(3, 8, (2, 16), torch.float32)
    a = torch.randn(1, 5, 2, 16, generator=gen)
    c = torch.randn(1, 3, 2, 16, generator=gen) * 100  # very different scale, a different slot
    store.write(torch.tensor([0]), torch.arange(5)[None], a)
    store.write(torch.tensor([2]), torch.arange(3)[None], c)
    # one more token for both rows at their own positions (5 and 3) in one batched write
    more = torch.randn(2, 1, 2, 16, generator=gen)
    store.write(torch.tensor([0, 2]), torch.tensor([[5], [3]]), more)

    rows = store.read(torch.tensor([0, 2]), 2, 6, torch.float32)
    _within_int8_error(rows[0, :6], torch.cat((a[0], more[0])))
    _within_int8_error(rows[1, :4], torch.cat((c[0], more[1])))
    assert (rows[1, 4:] == 0).all()  # positions slot 2 never wrote
    assert (store.read(torch.tensor([1]), 1, 8, torch.float32) == 0).all()  # untouched slot


def test_latent_mode_on_an_mha_model_names_the_mode_and_the_alternatives():
    with pytest.raises(ConfigError) as err:
        MHA.check_kv_mode("latent")
    message = str(err.value)
    assert "'latent'" in message
    assert "'full'" in message and "'int8'" in message


def test_unknown_kv_mode_lists_every_mode():
    with pytest.raises(ConfigError) as err:
        MLA.check_kv_mode("fp4")
    for mode in ("full", "int8", "latent", "latent-int8"):
        assert mode in str(err.value)
