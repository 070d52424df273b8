"""The training loop every gradient job shares, run by each Ray Train worker.

A job (pretrain, SFT, DPO, distillation) is a `Task`: it builds batches, computes its loss with
one forward pass of the (DDP-wrapped) model, and evaluates. This file owns everything else:
model construction or restore, DDP via `ray.train.torch.prepare_model`, AdamW with warm-up
and cosine decay, router losses and bias balancing (`training/balance.py`), per-step logging
(`train_log.jsonl` and a progress bar on rank 0), validation, and checkpoints reported through
`ray.train.report`.

A Ray Train checkpoint directory is a Hugging Face checkpoint (config.json, model.safetensors
in fp32, tokenizer files) that `expertmesh.models.checkpoint.load_model` loads as it is, plus
`trainer_state.pt` (step, optimizer state) for resuming. A run restarted with the same
`run.name` and `run.storage_path` gets its latest checkpoint back from
`ray.train.get_checkpoint()` and continues from that step with that optimizer state; batches
are a pure function of (seed, step, rank), so it sees the data the uninterrupted run would
have seen.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn

from expertmesh.models.checkpoint import load_model, save_model
from expertmesh.models.model import MoEModel

from .balance import BiasBalancer, RouterTap, all_reduce_sum, load_spread, router_losses
from .config import OptimSection

TRAINER_STATE = "trainer_state.pt"
TRAIN_LOG = "train_log.jsonl"

Batch = dict[str, torch.Tensor]
TrainingJob = Any
"""One of the pydantic job configs with model/balance/optim/run/output sections."""


class Task(Protocol):
    """What a training job adds to the shared loop."""

    name: str

    def build_model(self) -> MoEModel:
        """The model at step 0 (a fresh init or a loaded checkpoint), fp32, train mode."""
        ...

    def tokenizer_dir(self) -> Path:
        """Directory whose tokenizer files go into every checkpoint."""
        ...

    def batch(self, step: int, rank: int, world: int) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The job's loss from exactly one forward pass of `model` (DDP needs one per step)."""
        ...

    def tokens(self, batch: Batch) -> int:
        """Tokens this batch trains on (for tokens/s)."""
        ...

    def evaluate(self, model: MoEModel, rank: int, world: int) -> dict[str, float]:
        """Validation metrics, identical on every worker (reduced over workers)."""
        ...


TaskFactory = Callable[[TrainingJob, dict[str, Any]], Task]


def lr_at(step: int, optim: OptimSection) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps` (step is 1-based)."""
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    span = max(1, optim.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and expert stacks), not on norms or biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def _unwrap(model: nn.Module) -> MoEModel:
    inner = getattr(model, "module", model)
    assert isinstance(inner, MoEModel)
    return inner


class _Progress:
    """A progress bar on rank 0: tqdm_ray in a Ray worker (rendered by the driver), tqdm otherwise."""

    def __init__(self, enabled: bool, in_worker: bool, name: str, start: int, total: int) -> None:
        self.bar: Any = None
        if not enabled:
            return
        if in_worker:
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=name)
            self.bar.update(start)
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, mininterval=1.0)

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _save_checkpoint(
    directory: Path,
    model: MoEModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    metrics: dict[str, Any],
    tokenizer_dir: Path,
) -> None:
    save_model(model, directory, tokenizer_from=tokenizer_dir)
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, directory / TRAINER_STATE)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def _restore(checkpoint: ray.train.Checkpoint) -> tuple[MoEModel, dict[str, Any]]:
    with checkpoint.as_directory() as d:
        model = load_model(d, dtype="float32").train()
        # On the host; the optimizer moves its state to the parameters' device when loaded.
        state = torch.load(Path(d) / TRAINER_STATE, weights_only=False, map_location="cpu")
    return model, state


def worker_device(use_gpu: bool, in_worker: bool) -> torch.device:
    """This worker's device: its Ray Train GPU, the local GPU in local mode, or the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if in_worker:
        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device())


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker function TorchTrainer runs (`train_loop_per_worker`)."""
    job: TrainingJob = loop_config["job"]
    make_task: TaskFactory = loop_config["make_task"]
    log_path = Path(loop_config["log_path"])
    local_checkpoints = loop_config.get("local_checkpoints")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.run.cpus_per_worker)
    torch.manual_seed(job.model.seed)
    task = make_task(job, loop_config["payload"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        model, state = _restore(checkpoint)
        start_step = int(state["step"])
    else:
        model, state, start_step = task.build_model().train(), {}, 0
    device = worker_device(bool(loop_config.get("use_gpu")), job.run.num_workers > 0)
    model = model.to(device)  # fp32 master weights on the GPU too (no-op on the CPU)
    tap = RouterTap(model)
    balancer = (
        BiasBalancer(model, job.balance.bias_update_rate) if job.balance.bias_update_rate else None
    )
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    optimizer = make_optimizer(model, job.optim)
    if state:
        optimizer.load_state_dict(state["optimizer"])

    max_steps = job.optim.max_steps
    last = min(max_steps, job.run.stop_after_steps or max_steps)
    in_worker = job.run.num_workers > 0
    progress = _Progress(
        job.run.progress_bar and rank == 0, in_worker, task.name, start_step, max_steps
    )
    if rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("a", encoding="utf-8") if rank == 0 else None
    tokens_done, timed_s = 0, 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for step in range(start_step + 1, last + 1):
            t0 = time.perf_counter()
            lr = lr_at(step, job.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = _to(task.batch(step, rank, world), device)
            tap.records.clear()
            loss, extra = task.loss(ddp_model, batch)
            router = router_losses(tap.pop(), model.config.moe)
            total = (
                loss + job.balance.aux_loss_coef * router.aux + job.balance.z_loss_coef * router.z
            )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip))
            optimizer.step()

            # One all-reduce for the step's scalars and the expert counts of every MoE layer.
            scalars = torch.tensor([loss.item(), router.aux.item(), router.z.item()])
            reduced = all_reduce_sum(
                torch.cat([scalars.double(), router.counts.double().flatten().cpu()])
            )
            mean_scalars = (reduced[:3] / world).tolist()
            counts = reduced[3:].view_as(router.counts).long()
            if balancer is not None:
                balancer.update(counts)
            step_s = time.perf_counter() - t0
            if step > start_step + 1:  # the first step warms up allocators and threads
                tokens_done += task.tokens(batch) * world
                timed_s += step_s
            record: dict[str, Any] = {
                "step": step,
                "loss": mean_scalars[0],
                "aux_loss": mean_scalars[1],
                "z_loss": mean_scalars[2],
                "load_spread": load_spread(counts),
                "lr": lr,
                "grad_norm": grad_norm,
                "step_s": step_s,
                "tokens_per_s": tokens_done / timed_s if timed_s else 0.0,
                "device": device.type,
                **extra,
            }
            if step % job.run.eval_every == 0 or step == last:
                tap.enabled = False
                model.eval()
                record.update(task.evaluate(model, rank, world))
                model.train()
                tap.enabled = True
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            progress.step(
                f"{task.name} loss {record['loss']:.3f} spread {record['load_spread']:.2f}"
            )
            if step % job.run.checkpoint_every == 0 or step == last:
                _report_with_checkpoint(
                    rank, record, model, optimizer, step, task.tokenizer_dir(), local_checkpoints
                )
            elif step % job.run.log_every == 0:
                ray.train.report(record)
    finally:
        progress.close()
        tap.close()
        if log is not None:
            log.close()


def _report_with_checkpoint(
    rank: int,
    record: dict[str, Any],
    model: MoEModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    tokenizer_dir: Path,
    local_root: str | None,
) -> None:
    name = f"step-{step:07d}"
    if rank != 0:  # every worker reports (it is a barrier); rank 0 writes the checkpoint
        ray.train.report(record, checkpoint=None, checkpoint_dir_name=name)
        return
    if local_root is not None:
        directory = Path(local_root) / name
        _save_checkpoint(directory, model, optimizer, step, record, tokenizer_dir)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))
        return
    with tempfile.TemporaryDirectory() as d:
        _save_checkpoint(Path(d), model, optimizer, step, record, tokenizer_dir)
        ray.train.report(
            record, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
        )
