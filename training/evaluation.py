"""Validation metrics computed on Ray Train workers: each scores its share, then all-reduce."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from expertmesh.models.model import MoEModel

from .balance import all_reduce_sum
from .data import IGNORE


@torch.no_grad()
def nll_sums(
    model: MoEModel, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8
) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of scored tokens); IGNORE labels skip."""
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        logits = model(ids[s : s + batch_size])
        y = labels[s : s + batch_size].to(logits.device)
        total += F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((y != IGNORE).sum())
    return total, count


def distributed_perplexity(
    model: MoEModel, ids: torch.Tensor, labels: torch.Tensor, rank: int, world: int
) -> float:
    """exp(mean NLL) over all rows, each worker scoring rows rank, rank + world, ..."""
    total, count = nll_sums(model, ids[rank::world], labels[rank::world])
    sums = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
    return math.exp(float(sums[0]) / max(float(sums[1]), 1.0))


def window_perplexity(
    model: MoEModel, windows: torch.Tensor, rank: int = 0, world: int = 1
) -> float:
    """Perplexity of (n, T + 1) token windows: inputs [:, :-1], targets [:, 1:]."""
    return distributed_perplexity(model, windows[:, :-1], windows[:, 1:], rank, world)
