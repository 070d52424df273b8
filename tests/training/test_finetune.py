"""SFT, DPO and distillation: their losses, and each job end to end on a tiny model (Ray Train
local mode: the same loop in this process)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from expertmesh.models.checkpoint import load_model
from expertmesh.training.config import DistillConfig, DPOConfig, SFTConfig, parse_config
from expertmesh.training.distill import distillation_loss, run_distill
from expertmesh.training.dpo import dpo_loss, run_dpo
from expertmesh.training.sft import run_sft

pytestmark = pytest.mark.usefixtures("local_ray")


def _run(tmp: Path, name: str, steps: int, lr: float = 5e-3) -> dict[str, Any]:
    return {
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": 1, "max_steps": steps,
                  "weight_decay": 0.0},
        "run": {"name": name, "storage_path": str(tmp / "ray"), "num_workers": 0,
                "checkpoint_every": steps, "eval_every": steps, "progress_bar": False},
        "output": {"dir": str(tmp / name)},
    }  # fmt: skip


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------- losses


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_margin_grows():
    zero = torch.zeros(3)
    loss, margin = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and (margin == 0).all()
    better, _ = dpo_loss(zero + 1, zero - 1, zero, zero, beta=0.1)
    assert better < loss


def test_distillation_loss_without_teacher_weight_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    loss, parts = distillation_loss(student, torch.empty(0), labels, 2.0, 0.0)
    assert loss.item() == pytest.approx(
        F.cross_entropy(student.flatten(0, 1), labels.flatten()).item()
    )
    assert "kl" not in parts


def test_distillation_kl_vanishes_when_the_student_matches_the_teacher():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    loss, parts = distillation_loss(logits, logits.clone(), labels, 2.0, 1.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(
        0.0, abs=1e-5
    )


# ----------------------------------------------------------------------------- jobs


def test_sft_learns_the_answers(tmp_path, tiny_checkpoint):
    pairs = [
        {"prompt": f"Who loves Juliet? ({i})", "answer": "Romeo, of Verona."} for i in range(20)
    ]
    train = _jsonl(tmp_path / "train.jsonl", pairs[:16])
    val = _jsonl(tmp_path / "val.jsonl", pairs[16:])
    cfg = {"model": {"checkpoint": str(tiny_checkpoint)},
           "data": {"train": train, "val": val, "seq_len": 32, "batch_size": 4},
           **_run(tmp_path, "sft", steps=12)}  # fmt: skip
    first = run_sft(parse_config({**cfg, **_run(tmp_path, "sft0", steps=1, lr=1e-9)}, SFTConfig))
    out = run_sft(parse_config(cfg, SFTConfig))
    assert out.finished
    assert out.metrics["val_answer_perplexity"] < 0.2 * first.metrics["val_answer_perplexity"]
    assert load_model(out.output_dir).config.vocab_size == 4096


def test_dpo_reports_held_out_preference_accuracy_before_and_after(tmp_path, tiny_checkpoint):
    def pairs(words: list[str]) -> list[dict]:
        out = []
        for w in words:
            out.append({"prompt": f"Say yes about {w}.", "chosen": "yes", "rejected": "no"})
            out.append({"prompt": f"Say no about {w}.", "chosen": "no", "rejected": "yes"})
        return out

    train = _jsonl(tmp_path / "train.jsonl", pairs(["love", "war", "night", "day", "sun", "moon"]))
    val = _jsonl(tmp_path / "val.jsonl", pairs(["rose", "king", "sea", "fire"]))
    cfg = {"model": {"checkpoint": str(tiny_checkpoint)},
           "data": {"train": train, "val": val, "seq_len": 24, "batch_size": 6},
           "dpo": {"beta": 0.5}, **_run(tmp_path, "dpo", steps=25, lr=1e-2)}  # fmt: skip
    out = run_dpo(parse_config(cfg, DPOConfig))
    assert out.before["val_reward_accuracy"] == 0.0  # policy == reference: no margin yet
    assert out.before["val_preference_accuracy"] == pytest.approx(0.5)  # a prompt-blind model
    assert out.after is not None
    # Held-out prompts: the policy moved towards every chosen answer relative to the reference,
    # and never fell below the reference's likelihood preference.
    assert out.after["val_reward_accuracy"] == 1.0
    assert out.after["val_dpo_loss"] < 0.5 * out.before["val_dpo_loss"]
    assert out.after["val_preference_accuracy"] >= out.before["val_preference_accuracy"]


def test_distilled_student_is_closer_to_its_teacher_than_the_same_student_without_it(
    tmp_path, tiny_checkpoint, corpus_file, tiny_model
):
    student_shape = {**tiny_model, "config": {**tiny_model["config"], "hidden_size": 16,
                                              "num_attention_heads": 1, "num_key_value_heads": 1}}  # fmt: skip
    cfg = {"model": student_shape,
           "data": {"files": [str(corpus_file)], "seq_len": 32, "batch_size": 4, "val_windows": 4},
           "distill": {"teacher": str(tiny_checkpoint), "kl_weight": 0.9, "temperature": 1.0},
           **_run(tmp_path, "distill", steps=10)}  # fmt: skip
    out = run_distill(parse_config(cfg, DistillConfig))
    assert out.baseline is not None and out.student_val_perplexity and out.baseline_val_perplexity
    teacher = load_model(tiny_checkpoint)
    ids = torch.randint(5, 4096, (2, 16), generator=torch.Generator().manual_seed(0))

    def kl_to_teacher(path: Path) -> float:
        with torch.no_grad():
            t, s = teacher(ids), load_model(path)(ids)
        return F.kl_div(
            s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()

    assert kl_to_teacher(out.student.output_dir) < kl_to_teacher(out.baseline.output_dir)
