"""Overlap: two micro-batches in a ping-pong, so one's attention runs while the other's
experts compute on the shards and its bytes cross the links.

A forward pass split in two row groups A and B runs as two coroutines, stepped in turn:

    A: attention L, router L, send L   -> waits
    B: attention L, router L, send L   -> waits        (A's experts run meanwhile)
    A: combine L, attention L+1, ...   -> waits        (B's experts run meanwhile)
    B: combine L, ...

The shared expert (DeepSeek, Qwen) runs on the attention side after each send, inside the
wait as well. Every row's arithmetic is the one `MoEModel.hidden_states` does (attention,
router, combine in the same order), so outputs are unchanged.

Splitting pays only when there is communication to hide and enough rows to split:
`OverlapPolicy` decides per forward pass. In `auto` it measures passes without overlap
first: the ratio of the time the attention worker waits for shards to the time it computes
(attention side). Below `min_ratio` nothing worth hiding: off. Otherwise it measures passes
with overlap and keeps whichever is faster per row, measured, per batch-size bucket,
re-measuring the other mode every `probe_every` passes.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmesh.models.model import MoEModel

from .dispatch import Dispatcher, RemoteExpertBank

OVERLAP_MODES = ("auto", "on", "off")


@dataclass
class _Bucket:
    off_s_per_row: float | None = None
    on_s_per_row: float | None = None
    ratio: float | None = None
    """Measured without overlap: wait for shards / attention-side compute."""
    passes: int = 0


@dataclass
class OverlapPolicy:
    """When to split a forward pass into two pipelined micro-batches."""

    mode: str = "auto"
    """'on': always (batches of 2+ rows), 'off': never, 'auto': when measured to help."""
    min_ratio: float = 0.5
    """auto: below this ratio of waiting to attention-side compute, overlap stays off (a
    split pass costs a second layer call per layer and, for the second micro-batch, a KV
    cache read by row index instead of a prefix; measured, it pays only when the wait is a
    large part of the pass)."""
    min_rows: int = 4
    """Fewest token rows (batch x new tokens) per micro-batch."""
    probe_every: int = 256
    """auto: every this many passes of a bucket, run one in the mode not chosen."""
    smoothing: float = 0.3
    """Weight of a new measurement in the running per-row times."""
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    passes_on: int = 0
    passes_off: int = 0

    def __post_init__(self) -> None:
        if self.mode not in OVERLAP_MODES:
            raise ValueError(
                f"overlap: unknown mode {self.mode!r}; use one of {', '.join(OVERLAP_MODES)}"
            )

    def decide(self, rows: int, new_tokens: int = 1) -> bool:
        """Split this pass of `rows` token rows (`new_tokens` per sequence)? In auto, only
        decode passes: prefill shapes vary too much for one trial per bucket to pay back."""
        if self.mode == "off" or rows < 2 * self.min_rows:
            return False
        if self.mode == "on":
            return True
        if new_tokens > 1:
            return False
        b = self.buckets.setdefault(_bucket(rows), _Bucket())
        b.passes += 1
        if b.off_s_per_row is None or b.ratio is None:
            return False  # measure without overlap first
        if b.ratio < self.min_ratio:
            return False  # nothing worth hiding
        if b.on_s_per_row is None:
            return True
        on_faster = b.on_s_per_row < b.off_s_per_row
        probe = b.passes % self.probe_every == 0
        return on_faster != probe

    def record(self, rows: int, overlapped: bool, wall_s: float, wait_s: float) -> None:
        """One pass measured: its wall time and the time it waited for shards."""
        if overlapped:
            self.passes_on += 1
        else:
            self.passes_off += 1
        b = self.buckets.setdefault(_bucket(rows), _Bucket())
        per_row = wall_s / max(rows, 1)
        a = self.smoothing
        if overlapped:  # a slower overlapped pass counts in full: trying it is the cost
            on = b.on_s_per_row
            b.on_s_per_row = per_row if on is None or per_row > on else (1 - a) * on + a * per_row
            return
        b.off_s_per_row = (
            per_row if b.off_s_per_row is None else (1 - a) * b.off_s_per_row + a * per_row
        )
        ratio = wait_s / max(wall_s - wait_s, 1e-9)
        b.ratio = ratio if b.ratio is None else (1 - a) * b.ratio + a * ratio


def _bucket(rows: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


def install_overlap(
    model: MoEModel, dispatcher: Dispatcher, policy: OverlapPolicy | None = None
) -> OverlapPolicy:
    """Make `model`'s forward passes pipeline two micro-batches when `policy` says so (the
    model's MoE layers must already dispatch, see `attach_dispatcher`). Returns the policy."""
    policy = policy or OverlapPolicy()
    plain = MoEModel.hidden_states.__get__(model)

    def hidden_states(
        self: MoEModel,
        input_ids: torch.Tensor,
        cache: Any = None,
        rows: torch.Tensor | None = None,
        router_stats: Any = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        keeps_last = router_stats is not None and getattr(router_stats, "keep_last", False)
        split = B >= 2 and not keeps_last and not torch.is_grad_enabled()
        overlap = split and policy.decide(B * T, T)
        wait0 = dispatcher.stats.wait_s
        t0 = time.perf_counter()
        if overlap:
            out = pipelined_hidden_states(self, input_ids, cache, rows, router_stats)
        else:
            out = plain(input_ids, cache, rows, router_stats)
        if split and (overlap or T == 1):
            policy.record(B * T, overlap, time.perf_counter() - t0, dispatcher.stats.wait_s - wait0)
        return out

    model.hidden_states = types.MethodType(hidden_states, model)  # type: ignore[method-assign]
    model.overlap_policy = policy  # type: ignore[assignment]  # for benchmarks and the CLI
    return policy


def pipelined_hidden_states(
    model: MoEModel,
    input_ids: torch.Tensor,
    cache: Any = None,
    rows: torch.Tensor | None = None,
    router_stats: Any = None,
) -> torch.Tensor:
    """`MoEModel.hidden_states` with the batch in two micro-batches, pipelined."""
    B, T = input_ids.shape
    all_rows = torch.arange(B) if rows is None else rows
    half = (B + 1) // 2
    parts = [(0, half), (half, B)]
    coroutines = []
    for lo, hi in parts:
        ctx = model.context(hi - lo, T, cache, all_rows[lo:hi])
        ids = input_ids[lo:hi].to(model.embed.weight.device)  # host ids, a GPU model too
        coroutines.append(_micro_batch(model, model.embed(ids), ctx, router_stats))
    outs: list[torch.Tensor | None] = [None] * len(coroutines)
    active = list(range(len(coroutines)))
    try:
        while active:
            for i in list(active):
                try:
                    next(coroutines[i])
                except StopIteration as done:
                    outs[i] = done.value
                    active.remove(i)
    except BaseException:
        for c in coroutines:  # the other micro-batch's call in flight is finished, not leaked
            c.close()
        raise
    if cache is not None:
        cache.advance(all_rows, T)
    return model.norm(torch.cat([o for o in outs if o is not None]))


def _micro_batch(
    model: MoEModel, x: torch.Tensor, ctx: Any, stats: Any
) -> Generator[None, None, torch.Tensor]:
    """One micro-batch through every layer; yields while its experts are out."""
    for block in model.blocks:
        x = block.attention_block(x, ctx)
        moe = block.moe
        if moe is None or not isinstance(moe.experts, RemoteExpertBank):
            x = block.ffn_block(x, stats)
            continue
        shape = x.shape
        flat = block.mlp_norm(x).reshape(-1, shape[-1])  # (N, hidden)
        ids, weights, _ = moe.router(flat)
        if stats is not None:
            stats.record(block.layer, ids, weights)
        sent = moe.experts.start(flat, ids, weights)
        shared = None
        if moe.shared is not None:  # attention-side work inside the wait
            shared = moe.shared(flat)
            if moe.shared_gate is not None:
                shared = torch.sigmoid(moe.shared_gate(flat)) * shared
        try:
            yield
        except GeneratorExit:  # the pass failed elsewhere: collect this call's replies
            with contextlib.suppress(Exception):
                moe.experts.finish(sent)
            raise
        out = moe.experts.finish(sent)
        if shared is not None:
            out = out + shared
        x = x + out.view(shape)
    return x
