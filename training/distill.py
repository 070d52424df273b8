"""Knowledge distillation: a smaller student learns from a teacher's logits.

    expertmesh train distill --config examples/training/distill.yaml
    python -m expertmesh.training.distill --config examples/training/distill.yaml

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015): the student
matches the teacher's temperature-softened next-token distribution, and the hard labels:

    loss = w * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * CE(student, labels)

(T^2 keeps the soft term's gradient scale independent of T, section 2 of the paper.) The
teacher is a frozen checkpoint run under no_grad on the same windows; it must share the
student's tokenizer.

With `distill.baseline: true` the job trains the same student twice: once with the teacher
and once without it (w = 0: cross-entropy only), from the same seeded init on the same batches,
and reports both validation perplexities. The difference is what the teacher bought.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.models.checkpoint import load_model
from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .config import DistillConfig, DistillSection, OutputSection, RunSection
from .entry import JobError, job_main
from .loop import Batch
from .pretrain import LMData, PretrainTask, prepare_lm_data, prepare_model_payload
from .runner import TrainingOutcome, run_training


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinton et al.'s soft + hard loss over (B, T, V) logits and (B, T) labels."""
    s = student_logits.float().flatten(0, 1)
    ce = F.cross_entropy(s, labels.flatten())
    if kl_weight == 0:
        return ce, {"ce": ce.item()}
    t = teacher_logits.float().flatten(0, 1)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    loss = kl_weight * temperature**2 * kl + (1 - kl_weight) * ce
    return loss, {"ce": ce.item(), "kl": kl.item()}


@dataclass
class DistillTask(PretrainTask):
    """Pre-training's batches and validation, with the teacher in the loss."""

    name: str = "distill"
    distill: DistillSection | None = None
    teacher: MoEModel | None = None

    @staticmethod
    def from_payload(job: Any, payload: dict[str, Any]) -> DistillTask:
        return DistillTask(
            job, payload["data"], payload["raw_config"], Path(payload["tok_dir"]),
            distill=job.distill,
        )  # fmt: skip

    def _teacher(self, device: torch.device) -> MoEModel:
        """The frozen teacher, on the student's device."""
        if self.teacher is None:
            assert self.distill is not None
            path = Path(self.distill.teacher).resolve()
            self.teacher = load_model(path, "float32", device=device)
            self.teacher.requires_grad_(False)
        return self.teacher

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.distill is not None
        windows = batch["windows"]
        inputs, labels = windows[:, :-1], windows[:, 1:]
        student = model(inputs)
        teacher = torch.empty(0)
        if self.distill.kl_weight > 0:
            with torch.no_grad():
                teacher = self._teacher(inputs.device)(inputs)
        return distillation_loss(
            student, teacher, labels, self.distill.temperature, self.distill.kl_weight
        )


@dataclass(frozen=True)
class DistillOutcome:
    student: TrainingOutcome
    baseline: TrainingOutcome | None
    teacher_val_perplexity: float
    student_val_perplexity: float | None
    baseline_val_perplexity: float | None


def _variant(job: DistillConfig, suffix: str, kl_weight: float) -> DistillConfig:
    return job.model_copy(
        update={
            "run": RunSection(**{**job.run.model_dump(), "name": f"{job.run.name}-{suffix}"}),
            "output": OutputSection(
                **{**job.output.model_dump(), "dir": str(Path(job.output.dir) / suffix)}
            ),
            "distill": DistillSection(**{**job.distill.model_dump(), "kl_weight": kl_weight}),
        }
    )


def run_distill(job: DistillConfig) -> DistillOutcome:
    from .evaluation import window_perplexity

    if job.model.checkpoint is not None:
        raise JobError("model: the student is a fresh model; set model.preset/model.config")
    tokenizer, tok_dir, raw = prepare_model_payload(job.model)
    teacher_dir = Path(job.distill.teacher).resolve()
    teacher_tok = Tokenizer.from_dir(teacher_dir)
    if teacher_tok.vocab_size != tokenizer.vocab_size:
        raise JobError(
            f"distill.teacher: its vocabulary ({teacher_tok.vocab_size}) differs from the "
            f"student tokenizer's ({tokenizer.vocab_size}); use the teacher's tokenizer"
        )
    data: LMData = prepare_lm_data(job.data, tokenizer, tok_dir)
    payload = {"data": data, "raw_config": raw, "tok_dir": str(tok_dir)}
    teacher_ppl = window_perplexity(load_model(teacher_dir, "float32").eval(), data.val_windows)

    student = run_training(
        _variant(job, "student", job.distill.kl_weight), DistillTask.from_payload, payload
    )
    baseline = None
    if job.distill.baseline:
        baseline = run_training(_variant(job, "baseline", 0.0), DistillTask.from_payload, payload)

    def ppl(outcome: TrainingOutcome | None) -> float | None:
        return outcome.metrics.get("val_perplexity") if outcome and outcome.finished else None

    return DistillOutcome(student, baseline, teacher_ppl, ppl(student), ppl(baseline))


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
