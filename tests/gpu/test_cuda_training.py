"""One pre-training run on CUDA through Ray Train (one worker, one GPU, `run.device: cuda`):
it trains on the GPU, its first-step loss equals the same job's on the CPU (same init, same
batch, fp32: within 1e-3), and the exported checkpoint loads on the CPU."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="ray is not installed (training runs on Ray Train)")

from expertmesh.models.checkpoint import load_model
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.training.config import PretrainConfig, parse_config
from expertmesh.training.pretrain import run_pretrain
from expertmesh.training.runner import read_train_log

pytestmark = pytest.mark.gpu

VERSE = (
    "ROMEO.\nBut soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET.\nO Romeo, Romeo! wherefore art thou Romeo?\n\n"
)
TINY = {
    "preset": "demo",
    "tokenizer": str(DEMO_MODEL_DIR),
    "config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
}


@pytest.fixture(scope="module")
def gpu_ray() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _job(tmp: Path, name: str, device: str) -> PretrainConfig:
    corpus = tmp / "verse.txt"
    corpus.write_text(VERSE * 120, encoding="utf-8")
    data: dict[str, Any] = {
        "model": TINY,
        "data": {"files": [str(corpus)], "seq_len": 32, "batch_size": 4, "val_windows": 4},
        "balance": {"aux_loss_coef": 0.01, "z_loss_coef": 0.001, "bias_update_rate": 0.01},
        "optim": {"lr": 5e-3, "warmup_steps": 1, "max_steps": 2},
        "run": {
            "name": name,
            "storage_path": str(tmp / "ray"),
            "num_workers": 1,
            "checkpoint_every": 2,
            "eval_every": 2,
            "progress_bar": False,
            "device": device,
        },
        "output": {"dir": str(tmp / name / "model")},
    }
    return parse_config(data, PretrainConfig)


def test_one_training_step_on_cuda(gpu_ray, tmp_path):
    gpu = run_pretrain(_job(tmp_path, "gpu", "cuda"))
    cpu = run_pretrain(_job(tmp_path, "cpu", "cpu"))
    gpu_log, cpu_log = read_train_log(gpu.log_path), read_train_log(cpu.log_path)
    assert [r["device"] for r in gpu_log] == ["cuda", "cuda"]
    assert [r["device"] for r in cpu_log] == ["cpu", "cpu"]
    assert math.isfinite(gpu_log[-1]["loss"]) and math.isfinite(gpu_log[-1]["val_perplexity"])
    assert abs(gpu_log[0]["loss"] - cpu_log[0]["loss"]) <= 1e-3
    assert gpu.finished and gpu.output_dir is not None
    model = load_model(gpu.output_dir)  # the export is a plain CPU-loadable checkpoint
    assert next(model.parameters()).device.type == "cpu"
