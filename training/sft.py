"""Supervised fine-tuning on chat-formatted pairs, with the loss on the answers only.

    expertmesh train sft --config examples/training/sft.yaml
    python -m expertmesh.training.sft --config examples/training/sft.yaml

Each record of the JSON-lines files is `{"prompt": ..., "answer": ...}`, optionally with a
`"system"` message. The prompt is rendered with the model's own chat template
(`models/tokenizer.py`), exactly as the serving path renders a (system +) user conversation,
and encoded with its BOS; the answer follows, closed by the
end-of-turn token `<|end|>` (which ends generation). Prompt and padding positions carry no loss,
so the model learns to answer, not to write prompts. Validation reports the perplexity of the
held-out answers.

A second fine-tune (the demo's text-to-SQL stage) rehearses the first task: `data.replay`
names earlier examples and `data.replay_fraction` the share of each batch's rows drawn from
them, so the new task does not overwrite the old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .config import SFTConfig
from .data import IGNORE, EncodedChat, encode_chat, pack_rows, read_jsonl, step_rng
from .entry import JobError, job_main
from .evaluation import distributed_perplexity
from .loop import Batch
from .model_init import start_model, tokenizer_dir
from .runner import TrainingOutcome, run_training
from .tokenizer import END_OF_TURN


def encode_sft_file(path: str | Path, tokenizer: Tokenizer) -> list[EncodedChat]:
    return [
        encode_chat(tokenizer, r["prompt"], r["answer"], END_OF_TURN, r.get("system"))
        for r in read_jsonl(path, ("prompt", "answer"), optional=("system",))
    ]


def pad_id(tokenizer: Tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0
    return pad


def masked_lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE."""
    logits = model(ids)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


@dataclass
class SFTTask:
    job: SFTConfig
    train: list[EncodedChat]
    val: list[EncodedChat]
    pad: int
    tok_dir: Path
    replay: list[EncodedChat]
    name: str = "sft"

    @staticmethod
    def from_payload(job: SFTConfig, payload: dict[str, Any]) -> SFTTask:
        return SFTTask(
            job,
            payload["train"],
            payload["val"],
            payload["pad"],
            Path(payload["tok_dir"]),
            payload["replay"],
        )

    def build_model(self) -> MoEModel:
        return start_model(self.job.model, None)

    def tokenizer_dir(self) -> Path:
        return self.tok_dir

    def batch(self, step: int, rank: int, world: int) -> Batch:
        rng = step_rng(self.job.run.seed, step, rank)
        n = self.job.data.batch_size
        rows = [self.train[i] for i in rng.integers(0, len(self.train), size=n)]
        if self.replay:
            from_replay = rng.random(n) < self.job.data.replay_fraction
            picks = rng.integers(0, len(self.replay), size=n)
            rows = [self.replay[p] if r else row for row, r, p in zip(rows, from_replay, picks)]
        ids, labels = pack_rows(rows, self.job.data.seq_len, self.pad)
        return {"ids": ids, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return masked_lm_loss(model, batch["ids"], batch["labels"]), {}

    def tokens(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def evaluate(self, model: MoEModel, rank: int, world: int) -> dict[str, float]:
        ids, labels = pack_rows(self.val, self.job.data.seq_len, self.pad)
        return {"val_answer_perplexity": distributed_perplexity(model, ids, labels, rank, world)}


def run_sft(job: SFTConfig) -> TrainingOutcome:
    if job.model.checkpoint is None:
        raise JobError("model.checkpoint: SFT starts from a trained checkpoint; set its directory")
    tok_dir = tokenizer_dir(job.model)
    tokenizer = Tokenizer.from_dir(tok_dir)
    payload = {
        "train": encode_sft_file(job.data.train, tokenizer),
        "val": encode_sft_file(job.data.val, tokenizer),
        "pad": pad_id(tokenizer),
        "tok_dir": str(tok_dir),
        "replay": encode_sft_file(job.data.replay, tokenizer) if job.data.replay else [],
    }
    return run_training(job, SFTTask.from_payload, payload)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("sft", argv)


if __name__ == "__main__":
    raise SystemExit(main())
