"""Pre-training on Ray Train: checkpoints the model core loads, per-step load spread,
validation perplexity, and resume after an interruption.

The uninterrupted reference runs in Ray Train's local mode (same loop, in this process, one
thread); the interrupted and resumed runs use one real Ray Train worker with one thread, so the
arithmetic is the same and the results must match. (Two data-parallel workers are exercised by
the job-submission test and the demo and benchmark runs.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.training.config import PretrainConfig, parse_config
from expertmesh.training.evaluation import window_perplexity
from expertmesh.training.loop import TRAINER_STATE
from expertmesh.training.model_init import fresh_config, start_model, tokenizer_dir
from expertmesh.training.pretrain import prepare_lm_data, run_pretrain
from expertmesh.training.runner import TrainingOutcome, read_train_log

pytestmark = pytest.mark.usefixtures("local_ray")
STEPS = 8


def job(tmp: Path, corpus: Path, model: dict, name: str, **run: Any) -> PretrainConfig:
    return parse_config(
        {
            "model": model,
            "data": {"files": [str(corpus)], "seq_len": 32, "batch_size": 4, "val_windows": 8},
            "balance": {"aux_loss_coef": 0.01, "z_loss_coef": 0.001, "bias_update_rate": 0.01},
            "optim": {"lr": 5e-3, "warmup_steps": 2, "max_steps": STEPS},
            "run": {
                "name": name,
                "storage_path": str(tmp / "ray"),
                "num_workers": 1,
                "checkpoint_every": 4,
                "eval_every": 4,
                "log_every": 2,
                "progress_bar": False,
                **run,
            },
            "output": {"dir": str(tmp / name / "model")},
        },
        PretrainConfig,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, tiny_model) -> dict[str, TrainingOutcome]:
    """An uninterrupted run, and the same run stopped after 4 steps then resumed."""
    tmp = tmp_path_factory.mktemp("pretrain")
    full = run_pretrain(job(tmp, corpus_file, tiny_model, "full", num_workers=0))
    stopped = run_pretrain(job(tmp, corpus_file, tiny_model, "resumed", stop_after_steps=4))
    resumed = run_pretrain(job(tmp, corpus_file, tiny_model, "resumed"))
    return {"full": full, "stopped": stopped, "resumed": resumed, "tmp": tmp}  # type: ignore[dict-item]


def test_final_checkpoint_is_a_model_core_checkpoint(runs):
    full = runs["full"]
    assert full.finished and full.output_dir is not None
    model = load_model(full.output_dir)
    assert model.config.moe.num_experts == 8 and model.config.model_type == "deepseek_v3"
    # the Ray Train checkpoint itself loads too, and carries the optimizer state for resuming
    load_model(full.checkpoint)
    assert (full.checkpoint / TRAINER_STATE).is_file()


def test_every_step_logs_loss_and_expert_load_spread(runs):
    log = read_train_log(runs["full"].log_path)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(1.0 <= r["load_spread"] <= 4.0 for r in log)  # max/mean for top-2 of 8
    assert log[-1]["loss"] < log[0]["loss"]


def test_validation_perplexity_falls_below_the_initial_models(runs, corpus_file, tiny_model):
    cfg = job(runs["tmp"], corpus_file, tiny_model, "unused")
    from expertmesh.models.tokenizer import Tokenizer

    tok_dir = tokenizer_dir(cfg.model)
    tok = Tokenizer.from_dir(tok_dir)
    data = prepare_lm_data(cfg.data, tok, tok_dir)
    initial = window_perplexity(
        start_model(cfg.model, fresh_config(cfg.model, tok)).eval(), data.val_windows
    )
    final = runs["full"].metrics["val_perplexity"]
    assert final < 0.5 * initial


def test_bias_balancing_moves_the_router_biases(runs):
    model = load_model(runs["full"].output_dir)
    router = next(b.moe.router for b in model.blocks if b.moe is not None)
    assert router.score_bias.abs().max() > 0


def test_interrupted_run_stops_with_a_checkpoint_and_no_export(runs):
    stopped = runs["stopped"]
    assert not stopped.finished and stopped.output_dir is None
    assert stopped.metrics["step"] == 4


def test_resumed_run_continues_from_the_checkpoint_and_matches_the_uninterrupted_run(runs):
    log = read_train_log(runs["resumed"].log_path)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # 1-4, then 5-8 after resume
    full_log = read_train_log(runs["full"].log_path)
    assert log[4]["loss"] == pytest.approx(full_log[4]["loss"], rel=1e-4)
    a, b = load_model(runs["full"].output_dir), load_model(runs["resumed"].output_dir)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
