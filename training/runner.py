"""The driver side of a training job: connect to Ray, run TorchTrainer, export the result.

`run_training` starts (or joins) Ray, runs `loop.train_worker` on `run.num_workers`
data-parallel workers (DDP over NCCL with one GPU each where `run.device` gives them GPUs,
over gloo on the CPU otherwise) and, when the run reached `optim.max_steps`,
writes the last checkpoint to `output.dir` as a Hugging Face checkpoint in `output.dtype`,
with the per-step log beside it.

Ray: inside `ray job submit` (RAY_ADDRESS set) or after `ray.init()` it uses that cluster;
otherwise `ray.init()` starts a local one on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from expertmesh.models.checkpoint import load_model, save_model

from .config import RunSection, TrainingConfigError
from .loop import TRAIN_LOG, TaskFactory, TrainingJob, train_worker


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training run produced."""

    metrics: dict[str, Any]
    """The last metrics reported (rank 0's record of the last reported step)."""
    checkpoint: Path | None
    """The last Ray Train checkpoint (a loadable Hugging Face checkpoint in fp32)."""
    finished: bool
    """True when the run reached optim.max_steps (False after run.stop_after_steps)."""
    output_dir: Path | None
    """The exported checkpoint (only when finished)."""
    log_path: Path


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (`ray job submit` sets it; `auto` finds one started
    with `ray start`), else start a private local instance: never someone else's by accident."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local")


def wants_gpu(run: RunSection, cluster_gpus: float, driver_sees_cuda: bool) -> bool:
    """Whether the workers train on GPUs (one each): `run.device` against what there is, the
    Ray cluster's GPUs for `num_workers` workers, this process's CUDA for local mode (0)."""
    if run.device == "cpu":
        return False
    enough = driver_sees_cuda if run.num_workers == 0 else cluster_gpus >= run.num_workers
    if run.device == "cuda" and not enough:
        have = (
            "this process sees no CUDA device"
            if run.num_workers == 0
            else f"this Ray cluster offers {cluster_gpus:g} GPUs for {run.num_workers} workers"
        )
        raise TrainingConfigError(
            f"run.device: cuda requested but {have}; set run.device: cpu or auto, or use "
            "fewer workers"
        )
    return enough


def run_training(
    job: TrainingJob, make_task: TaskFactory, payload: dict[str, Any]
) -> TrainingOutcome:
    """Run one Ray Train job; `make_task(job, payload)` builds the Task on every worker."""
    ensure_ray()
    storage = Path(job.run.storage_path).resolve()
    log_path = storage / job.run.name / TRAIN_LOG
    import torch

    use_gpu = wants_gpu(
        job.run, float(ray.cluster_resources().get("GPU", 0.0)), torch.cuda.is_available()
    )
    resources = {"CPU": float(job.run.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job,
            "make_task": make_task,
            "payload": payload,
            "log_path": str(log_path),
            # Ray Train's local mode (no workers) keeps no checkpoint copies: write them here.
            "local_checkpoints": str(storage / job.run.name) if job.run.num_workers == 0 else None,
            "use_gpu": use_gpu,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.run.num_workers,
            use_gpu=use_gpu and job.run.num_workers > 0,
            resources_per_worker=resources if job.run.num_workers else None,
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    finished = checkpoint is not None and _checkpoint_step(checkpoint) >= job.optim.max_steps
    output_dir = None
    if finished:
        assert checkpoint is not None
        output_dir = export_checkpoint(checkpoint, Path(job.output.dir), job.output.dtype)
        if log_path.is_file():
            shutil.copy(log_path, output_dir / TRAIN_LOG)
        metrics = json.loads((checkpoint / "metrics.json").read_text())
    return TrainingOutcome(metrics, checkpoint, finished, output_dir, log_path)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "metrics.json").read_text())["step"])


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str) -> Path:
    """Copy a training checkpoint to `out_dir` as a plain Hugging Face checkpoint in `dtype`."""
    model = load_model(checkpoint, dtype=dtype)
    return save_model(model, out_dir, tokenizer_from=checkpoint)


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a run (one JSON object per line)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
