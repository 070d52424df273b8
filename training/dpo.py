"""Preference tuning with Direct Preference Optimization against a frozen reference.

    expertmesh train dpo --config examples/training/dpo.yaml
    python -m expertmesh.training.dpo --config examples/training/dpo.yaml

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (NeurIPS 2023), eq. 7: for a prompt x with a preferred answer y_w and a rejected one
y_l,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where pi is the policy being trained and ref a frozen copy of the starting model (both start
from `model.checkpoint`). log pi(y|x) sums the answer tokens' log-probabilities; the prompt is
rendered with the chat template as in SFT. Chosen and rejected rows go through the policy in
one forward pass (DDP needs one per step).

Each JSON-lines record is `{"prompt": ..., "chosen": ..., "rejected": ...}`. The job reports,
on the held-out pairs, the preference accuracy before and after training: the fraction of
pairs whose chosen answer the model gives the higher log-likelihood. (The DPO reward accuracy,
margin > 0 against the reference, is reported too; it is 0 before training by construction.)
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
from expertmesh.models.device import model_device
from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .balance import all_reduce_sum
from .config import DPOConfig
from .data import IGNORE, EncodedChat, encode_chat, pack_rows, read_jsonl, step_rng
from .entry import JobError, job_main
from .loop import Batch
from .model_init import start_model, tokenizer_dir
from .runner import TrainingOutcome, run_training
from .sft import pad_id
from .tokenizer import END_OF_TURN


@dataclass(frozen=True)
class PreferencePair:
    chosen: EncodedChat
    rejected: EncodedChat


def encode_pairs(path: str | Path, tokenizer: Tokenizer) -> list[PreferencePair]:
    return [
        PreferencePair(
            encode_chat(tokenizer, r["prompt"], r["chosen"], END_OF_TURN),
            encode_chat(tokenizer, r["prompt"], r["rejected"], END_OF_TURN),
        )
        for r in read_jsonl(path, ("prompt", "chosen", "rejected"))
    ]


def pack_pairs(
    pairs: Sequence[PreferencePair], seq_len: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, seq_len) ids and labels: the B chosen rows, then the B rejected rows."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return pack_rows(rows, seq_len, pad)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(label) over each row's answer positions (labels != IGNORE)."""
    labels = labels.to(logits.device)
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, per-pair reward margin) from per-pair answer log-probabilities."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


@torch.no_grad()
def pair_logps(
    model: MoEModel, pairs: Sequence[PreferencePair], seq_len: int, pad: int, batch: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) answer log-probabilities of every pair."""
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        ids, labels = pack_pairs(chunk, seq_len, pad)
        logps = answer_logps(model(ids), labels)
        chosen.append(logps[: len(chunk)])
        rejected.append(logps[len(chunk) :])
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(
    policy: MoEModel,
    reference: MoEModel,
    pairs: Sequence[PreferencePair],
    seq_len: int,
    pad: int,
    beta: float,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """Held-out preference accuracy (log pi(chosen) > log pi(rejected)), DPO reward accuracy
    and loss, each worker scoring pairs rank, rank + world, ... then summed over workers."""
    mine = list(pairs[rank::world])
    pc, pr = pair_logps(policy, mine, seq_len, pad)
    rc, rr = pair_logps(reference, mine, seq_len, pad) if mine else (pc, pr)
    loss, margin = dpo_loss(pc, pr, rc, rr, beta) if mine else (torch.zeros(()), pc)
    sums = torch.tensor(
        [
            float((pc > pr).sum()),
            float((margin > 0).sum()),
            float(loss) * len(mine),
            float(len(mine)),
        ],
        dtype=torch.float64,
    )
    total = all_reduce_sum(sums)
    n = max(float(total[3]), 1.0)
    return {
        "val_preference_accuracy": float(total[0]) / n,
        "val_reward_accuracy": float(total[1]) / n,
        "val_dpo_loss": float(total[2]) / n,
    }


@dataclass
class DPOTask:
    job: DPOConfig
    train: list[PreferencePair]
    val: list[PreferencePair]
    pad: int
    tok_dir: Path
    name: str = "dpo"
    reference: MoEModel | None = None

    @staticmethod
    def from_payload(job: DPOConfig, payload: dict[str, Any]) -> DPOTask:
        return DPOTask(
            job, payload["train"], payload["val"], payload["pad"], Path(payload["tok_dir"])
        )

    def _reference(self, device: torch.device) -> MoEModel:
        """The frozen copy of the starting checkpoint, on the policy's device."""
        if self.reference is None:
            assert self.job.model.checkpoint is not None
            path = Path(self.job.model.checkpoint).resolve()
            self.reference = load_model(path, "float32", device=device)
            self.reference.requires_grad_(False)
        return self.reference

    def build_model(self) -> MoEModel:
        return start_model(self.job.model, None)

    def tokenizer_dir(self) -> Path:
        return self.tok_dir

    def batch(self, step: int, rank: int, world: int) -> Batch:
        rng = step_rng(self.job.run.seed, step, rank)
        picks = rng.integers(0, len(self.train), size=self.job.data.batch_size)
        ids, labels = pack_pairs([self.train[i] for i in picks], self.job.data.seq_len, self.pad)
        return {"ids": ids, "labels": labels}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels = batch["ids"], batch["labels"]
        b = ids.shape[0] // 2
        policy = answer_logps(model(ids), labels)
        with torch.no_grad():
            ref = answer_logps(self._reference(ids.device)(ids), labels)
        loss, margin = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.job.dpo.beta)
        return loss, {
            "reward_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean()),
        }

    def tokens(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def evaluate(self, model: MoEModel, rank: int, world: int) -> dict[str, float]:
        d = self.job.data
        reference = self._reference(model_device(model))
        return preference_metrics(
            model, reference, self.val, d.seq_len, self.pad, self.job.dpo.beta, rank, world
        )


@dataclass(frozen=True)
class DPOOutcome:
    training: TrainingOutcome
    before: dict[str, float]
    """Held-out metrics of the starting model (policy == reference)."""
    after: dict[str, float] | None
    """Held-out metrics of the trained policy (None if the run was interrupted)."""


def run_dpo(job: DPOConfig) -> DPOOutcome:
    if job.model.checkpoint is None:
        raise JobError("model.checkpoint: DPO starts from a trained (usually SFT) checkpoint")
    tok_dir = tokenizer_dir(job.model)
    tokenizer = Tokenizer.from_dir(tok_dir)
    pad = pad_id(tokenizer)
    train, val = encode_pairs(job.data.train, tokenizer), encode_pairs(job.data.val, tokenizer)
    reference = load_model(tok_dir, "float32")
    before = preference_metrics(reference, reference, val, job.data.seq_len, pad, job.dpo.beta)
    payload = {"train": train, "val": val, "pad": pad, "tok_dir": str(tok_dir)}
    outcome = run_training(job, DPOTask.from_payload, payload)
    after = None
    if outcome.checkpoint is not None and outcome.finished:
        policy = load_model(outcome.checkpoint, "float32")
        after = preference_metrics(policy, reference, val, job.data.seq_len, pad, job.dpo.beta)
    return DPOOutcome(outcome, before, after)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("dpo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
