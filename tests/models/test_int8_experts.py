"""int8 weight-only routed experts: checkpoints that say so load as int8 banks and compute
close to the float model; inconsistent checkpoints are refused with the tensor named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh.models.checkpoint import load_expert_bank, load_model, save_model
from expertmesh.models.errors import CheckpointError, ConfigError
from expertmesh.models.model import int8_linear
from expertmesh.training.quantize import quantize_experts, quantize_per_channel


@pytest.fixture(scope="module")
def int8_checkpoint(hf_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    path, _ = hf_checkpoint("deepseek_v3")
    out = tmp_path_factory.mktemp("int8")
    save_model(quantize_experts(load_model(path)), out)
    return path, out


def test_per_channel_quantisation_error_is_within_half_a_step():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5])  # one row: the int8 kernel; more: dequantise + GEMM
def test_int8_linear_matches_the_dequantised_matmul(rows):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 16, generator=gen), torch.randn(rows, 16, generator=gen)
    q, scale = quantize_per_channel(w)
    expected = x @ (q.float() * scale[:, None]).t()
    torch.testing.assert_close(int8_linear(x, q, scale), expected, rtol=1e-4, atol=1e-4)


def test_quantized_checkpoint_stores_int8_experts_with_scales(int8_checkpoint):
    _, out = int8_checkpoint
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "expertmesh_int8_experts"
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert tensors[name].dtype == torch.int8
    assert tensors[name + "_scale"].shape == (tensors[name].shape[0],)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype != torch.int8


def test_int8_model_loads_and_stays_close_to_the_float_model(int8_checkpoint):
    path, out = int8_checkpoint
    ref, q = load_model(path), load_model(out)
    bank = next(b.moe.experts for b in q.blocks if b.moe is not None)
    assert bank.quantized and bank.gate_up.dtype == torch.int8
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(ids), q(ids)
    # int8 moves logits a little; routing can flip on a few tokens of this sharp random model.
    assert (a - b).abs().median() < 0.05 * a.std()


def test_expert_shards_load_int8_experts(int8_checkpoint):
    _, out = int8_checkpoint
    bank = load_expert_bank(out, layer=1, expert_ids=[2, 5])
    assert bank.quantized and bank.expert_ids == (2, 5)
    assert bank.gate_up_scale is not None and bank.gate_up_scale.shape[0] == 2


def test_float_tensor_in_an_int8_checkpoint_is_refused_by_name(int8_checkpoint, tmp_path):
    _, out = int8_checkpoint
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name):
        load_model(tmp_path)


def test_unknown_quantization_method_is_refused(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("deepseek_v3")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quant_method"):
        load_model(tmp_path)
