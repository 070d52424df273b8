"""Published checkpoints' config.json, scaled down, load and match transformers.

Each config copies a published file field for field (tests/models/published_configs.py), with
sizes scaled down. transformers builds its own model from that config; we load the checkpoint
it saves and compare logits and greedy continuations. Two on-disk layouts are checked: the
published one (top-level `rope_theta` + `rope_scaling`, written back over transformers'
config.json) and transformers-5's (`rope_parameters`).

Fields whose maths we do not implement must be errors naming the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.errors import ConfigError
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.model import MoEModel, rope_inv_freq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_configs import DEEPSEEK_V3_FP8, PUBLISHED, VOCAB, WINDOW, scaled

transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

NAMES = tuple(PUBLISHED)
PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8, 200, 13, 77], [100, 3, 250, 12]]


def _reinit(model, seed: int, std: float = 0.15) -> None:
    """Large-std weights (implementations cannot agree by accident), norms near 1, and a
    non-zero DeepSeek-V3 score-correction bias (so choosing on biased scores is tested)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else noise * std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def build(name: str, path: Path, layout: str = "published", seed: int = 0, raw=None):
    """A transformers model from the scaled published config (or `raw`), saved to `path`."""
    raw = raw or scaled(name)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    # fp32 on both sides (the published files say bfloat16; load_model defaults to fp32 too)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _reinit(model, seed)
    model.save_pretrained(path)
    if layout == "published":  # our loader reads the file exactly as published
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(name: str, layout: str = "published") -> tuple[Path, object]:
        if (name, layout) not in built:
            path = tmp_path_factory.mktemp(name.replace("+", "-"))
            built[name, layout] = (path, build(name, path, layout))
        return built[name, layout]

    return get


def _hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    out = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("layout", ["published", "transformers"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, layout, checkpoints):
    path, ref = checkpoints(name, layout)
    ours = load_model(path)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # not trivially small
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(name, checkpoints):
    path, ref = checkpoints(name)
    ours = load_model(path)
    # Chunked prefill and ragged prompts in one batch; the sliding-window variant runs past
    # its window (prompt 11 + 16 new tokens > 8).
    got = Generator(ours, prefill_chunk=3).generate(
        PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True)
    )
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == _hf_greedy(ref, prompt, 16)


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "deepseek-v3"])
def test_latent_cache_matches_transformers_under_yarn(name, checkpoints):
    path, ref = checkpoints(name)
    ours = load_model(path)
    got = Generator(ours, kv_mode="latent", prefill_chunk=4).generate(
        PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True)
    )
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == _hf_greedy(ref, prompt, 16)


@pytest.mark.parametrize(
    "extra",
    [{"truncate": False}, {"attention_factor": 1.3}],
    ids=["truncate-false", "attention_factor"],
)
def test_yarn_keys_beyond_the_published_ones_match_transformers(extra, tmp_path):
    """transformers' other YaRN keys: an unrounded correction range, an explicit cos/sin
    factor."""
    raw = scaled("deepseek-v3")
    raw["rope_scaling"] = {
        k: v for k, v in {**raw["rope_scaling"], **extra}.items() if v is not None
    }
    ref = build("deepseek-v3", tmp_path, raw=raw)
    ours = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_published_fields_reach_our_config(tmp_path):
    """What the loaded configs say, read back (a field parsed but dropped would pass parity
    only if transformers dropped it too)."""
    v3 = _config(tmp_path / "v3", scaled("deepseek-v3"))
    assert (v3.rope.scaling, v3.rope.factor, v3.rope.original_max_position) == ("yarn", 40, 4096)
    assert (v3.moe.scoring, v3.moe.topk_method, v3.moe.n_group, v3.moe.topk_group) == (
        "sigmoid",
        "group_top2_sum",
        8,
        4,
    )
    assert v3.moe.routed_scaling_factor == 2.5 and v3.moe.norm_topk_prob
    assert v3.attention.q_lora_rank == 24 and v3.moe_layers == (False, True, True, True)
    # mscale_all_dim 1.0 at factor 40: softmax scale x (0.1 ln 40 + 1)^2
    assert v3.attention.softmax_scale == pytest.approx(24**-0.5 * (0.1 * 3.6888794541 + 1) ** 2)
    lite = _config(tmp_path / "lite", scaled("deepseek-v2-lite"))
    assert lite.attention.q_lora_rank is None and lite.moe.topk_method == "greedy"
    assert lite.moe.shared_intermediate == 2 * 16 and lite.rope.mscale == 0.707
    qwen3 = _config(tmp_path / "q3", scaled("qwen3-30b-a3b"))
    assert qwen3.attention.head_dim == 16 and qwen3.attention.num_kv_heads == 1
    assert qwen3.rope.theta == 1e6 and qwen3.moe.norm_topk_prob
    window = _config(tmp_path / "mx", scaled("mixtral-8x7b+window"))
    assert window.attention.sliding_window == WINDOW


def test_rotary_tables_are_real_when_built_on_meta():
    """load_model builds under torch.device('meta'); the YaRN tables must still be computed
    (on the CPU), equal to an eager build."""
    raw = scaled("deepseek-v3")
    from expertmesh.models.adapters import adapter_for

    cfg = adapter_for(raw).parse_config(raw)
    with torch.device("meta"):
        model = MoEModel(cfg)
    eager, scale = rope_inv_freq(cfg.rope)
    assert model.rotary.inv_freq.device.type == "cpu"
    assert torch.equal(model.rotary.inv_freq, eager) and model.rotary.scale == scale
    assert scale == 1.0  # mscale == mscale_all_dim: no cos/sin factor, only the softmax one


def _config(path: Path, raw: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return read_config(path)


REFUSED = [
    ("deepseek-v3", {"topk_method": "greedy"}, "topk_method 'greedy' is not implemented"),
    ("deepseek-v3", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not implemented"),
    ("deepseek-v2", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc' is not implemented"),
    ("deepseek-v2", {"topk_method": "xyz"}, "supported: 'greedy', 'group_limited_greedy'"),
    ("deepseek-v2-lite", {"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ("deepseek-v2-lite", {"norm_topk_prob": True}, "norm_topk_prob True is not implemented"),
    ("deepseek-v2-lite", {"mlp_bias": True}, "mlp_bias True is not implemented"),
    (
        "deepseek-v3",
        {"quantization_config": DEEPSEEK_V3_FP8},
        "quantization_config.quant_method 'fp8' is not supported",
    ),
    (
        "deepseek-v3",
        {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "rope_scaling.rope_type 'dynamic' is not implemented",
    ),
    (
        "qwen3-30b-a3b",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "rope_type 'llama3' is not implemented",
    ),
    (
        "qwen3-30b-a3b+yarn",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}},
        "rope_scaling.low_freq_factor is not implemented for rope type 'yarn'",
    ),
    ("mixtral-8x7b", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    (
        "deepseek-v3",
        {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}},
        "rope_scaling.factor is missing",
    ),
    (
        "deepseek-v3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        "rope_scaling and rope_parameters disagree",
    ),
    ("qwen1.5-moe-a2.7b", {"use_sliding_window": True}, "use_sliding_window true"),
    (
        "qwen3-30b-a3b",
        {"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
        "layer_types ['full_attention', 'sliding_attention'] is not implemented",
    ),
    ("olmoe-1b-7b", {"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
]


@pytest.mark.parametrize(("name", "change", "message"), REFUSED)
def test_unimplemented_fields_are_errors_naming_the_field(name, change, message, tmp_path):
    raw = {**scaled(name), **change}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"^config\.json: ") as err:
        read_config(tmp_path)
    assert message in str(err.value)
