"""Pre-training: next-token prediction on a text corpus, data-parallel on Ray Train.

    expertmesh train pretrain --config examples/training/pretrain-tiny.yaml
    python -m expertmesh.training.pretrain --config examples/training/pretrain-tiny.yaml
    ray job submit --working-dir . -- python -m expertmesh.training.pretrain --config FILE

The driver tokenises the corpus once (cached next to the download), splits it by play into
training and validation text, and ships the token arrays to the workers. Each worker trains
on random windows drawn from (seed, step, rank); the loss is cross-entropy plus the router
losses of `balance:` (see `training/balance.py`). Validation perplexity is measured on
`data.val_windows` windows of the held-out plays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .config import CorpusSection, ModelSection, PretrainConfig
from .data import (
    corpus_files,
    encode_files,
    eval_windows,
    random_windows,
    split_single_file,
    step_rng,
)
from .entry import job_main
from .evaluation import window_perplexity
from .loop import Batch
from .model_init import fresh_config, start_model, tokenizer_dir
from .runner import TrainingOutcome, run_training
from .tokenizer import default_cache_dir


@dataclass(frozen=True)
class LMData:
    """Token streams for language modelling."""

    train: np.ndarray
    val_windows: torch.Tensor  # (n, seq_len + 1)


def prepare_lm_data(data: CorpusSection, tokenizer: Tokenizer, tok_dir: Path) -> LMData:
    train_files, val_files = corpus_files(
        data.corpus, data.files, data.cache_dir, data.val_fraction
    )
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    if train_files == val_files:  # one file: split its token stream
        train, val = split_single_file(
            encode_files(train_files, tokenizer, tok_dir, cache), data.val_fraction
        )
    else:
        train = encode_files(train_files, tokenizer, tok_dir, cache)
        val = encode_files(val_files, tokenizer, tok_dir, cache)
    return LMData(train, eval_windows(val, data.seq_len, data.val_windows))


def lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T + 1) windows."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@dataclass
class PretrainTask:
    """The `Task` of pre-training (see `training/loop.py`)."""

    job: PretrainConfig
    data: LMData
    raw_config: dict[str, Any] | None
    tok_dir: Path
    name: str = "pretrain"

    @staticmethod
    def from_payload(job: PretrainConfig, payload: dict[str, Any]) -> PretrainTask:
        return PretrainTask(job, payload["data"], payload["raw_config"], Path(payload["tok_dir"]))

    def build_model(self) -> MoEModel:
        return start_model(self.job.model, self.raw_config)

    def tokenizer_dir(self) -> Path:
        return self.tok_dir

    def batch(self, step: int, rank: int, world: int) -> Batch:
        d = self.job.data
        rng = step_rng(self.job.run.seed, step, rank)
        return {"windows": random_windows(self.data.train, d.batch_size, d.seq_len, rng)}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return lm_loss(model, batch["windows"]), {}

    def tokens(self, batch: Batch) -> int:
        return int(batch["windows"][:, 1:].numel())

    def evaluate(self, model: MoEModel, rank: int, world: int) -> dict[str, float]:
        return {"val_perplexity": window_perplexity(model, self.data.val_windows, rank, world)}


def prepare_model_payload(model: ModelSection) -> tuple[Tokenizer, Path, dict[str, Any] | None]:
    tok_dir = tokenizer_dir(model)
    tokenizer = Tokenizer.from_dir(tok_dir)
    return tokenizer, tok_dir, fresh_config(model, tokenizer)


def run_pretrain(job: PretrainConfig) -> TrainingOutcome:
    tokenizer, tok_dir, raw = prepare_model_payload(job.model)
    data = prepare_lm_data(job.data, tokenizer, tok_dir)
    payload = {"data": data, "raw_config": raw, "tok_dir": str(tok_dir)}
    return run_training(job, PretrainTask.from_payload, payload)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
