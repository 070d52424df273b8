"""Generation on the embedded `mixed.yaml` cluster with gpu-0 on CUDA: the attention worker
(this process) and gpu-0's shard compute on the GPU, the two CPU nodes' shards on their CPUs
(the embedded cluster offers the GPU to `kind: gpu` nodes only), and in fp32 the text equals
the single-process CPU model's. With dtype auto, gpu-0 holds bf16 and the CPU nodes float32."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (the embedded cluster runs on Ray)")
import torch
import yaml

from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.topology import parse_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.device import model_device
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

MIXED = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "mixed.yaml"
PROMPTS = ["ROMEO:", "What light through yonder window", "To be"]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def _mixed(gpu_device: str):
    data = yaml.safe_load(MIXED.read_text())
    data["nodes"][0]["device"] = gpu_device  # gpu-0
    return parse_topology(data)


def _texts(model) -> list[str | None]:
    out = Generator(model, Tokenizer.from_dir(DEMO_MODEL_DIR)).generate(PROMPTS, PARAMS)
    return [c.text for c in out]


def test_fp32_generation_with_gpu0_on_cuda_equals_the_cpu_model():
    expected = _texts(load_model(DEMO_MODEL_DIR))
    with ExpertParallelModel.launch(DEMO_MODEL_DIR, _mixed("cuda"), dtype="float32") as ep:
        assert model_device(ep.model).type == "cuda"
        devices = {n: s.extra["device"] for n, s in ep.pool.statuses().items()}
        assert devices["gpu-0"].startswith("cuda")
        assert devices["cpu-fast"] == devices["cpu-slow"] == "cpu"
        assert _texts(ep.model) == expected


def test_auto_puts_bf16_on_the_gpu_and_float32_on_the_cpu_nodes():
    with ExpertParallelModel.launch(DEMO_MODEL_DIR, _mixed("auto")) as ep:
        assert ep.model.dtype == torch.bfloat16
        dtypes = {n: s.extra["dtype"] for n, s in ep.pool.statuses().items()}
        assert dtypes == {"gpu-0": "bfloat16", "cpu-fast": "float32", "cpu-slow": "float32"}
        out = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR)).generate(PROMPTS, PARAMS)
        assert all(len(c.token_ids) == PARAMS.max_tokens for c in out)
