"""Continuous batching for one model: requests join and leave the running batch every step.

One engine thread owns the model and its KV cache (`num_slots` rows of `max_len` positions).
Each step it

1. retires requests that were cancelled (client gone) or ran past their deadline, freeing
   their slot and KV memory;
2. admits waiting requests, oldest first, while a slot is free and the KV budget (tokens
   reserved = prompt + max_tokens of every running request) has room: a request is admitted
   only if it can finish, so a running request never runs out of KV memory;
3. runs one prefill chunk (at most `prefill_chunk` prompt tokens of each request still
   prefilling), so a long prompt never stalls the decoding requests for more than one chunk.
   Chunks of different lengths share one forward pass, the shorter ones padded at their end
   (`_prefill_group`: causal attention keeps the padding out of every real token, the cache
   lengths are set back past it, the router statistics count real tokens only); a chunk
   shorter than half the longest waits for the next step rather than be padded;
4. runs one decode step for every request past its prefill, all in one batch.

The waiting queue is bounded: `submit` raises `Overloaded` when it is full (the server answers
429 with Retry-After) instead of building an unbounded backlog. `last_progress` is stamped
after every step that did work; a loop that holds work but stops stamping is stalled, which
`health()` reports.

Outputs leave through a per-request `sink` callback, called on the engine thread; the async
engine wrapper hands them to the request's asyncio queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmesh.models.config import KVMode
from expertmesh.models.device import model_device
from expertmesh.models.generate import RequestState, SamplingParams, StreamEvent, sample
from expertmesh.models.kv_cache import KVCache
from expertmesh.models.model import MoEModel
from expertmesh.models.router_stats import RouterStats
from expertmesh.models.tokenizer import Tokenizer

from .engine import ContextTooLong, Overloaded

Sink = Callable[["SchedulerEvent"], None]
log = logging.getLogger("expertmesh.engine")


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int = 16
    """Requests decoding at once (KV-cache rows)."""
    max_waiting: int = 64
    """Bounded queue of requests not yet admitted; beyond it, `Overloaded`."""
    kv_budget_tokens: int | None = None
    """KV positions all running requests may reserve together; None = num_slots x max_len."""
    prefill_chunk: int = 64
    """Prompt tokens per prefill step."""
    max_len: int | None = None
    """Positions per slot (prompt + output); None = the model's context window."""
    stall_after_s: float = 30.0
    """A loop holding work with no progress for this long is reported stalled."""
    threads: int | None = None
    """torch intra-op threads of the engine thread; None = every CPU this process may run on.
    Set explicitly because Ray gives a replica that reserves no CPUs OMP_NUM_THREADS=1, which
    would otherwise run the model on one core."""

    pace_delivery_s: float = 0.005
    """After a step that produced outputs, the engine thread waits up to this long for the
    event loop to hand them to their streams (SSE chunks built) before the next forward pass;
    0 = no wait. The loop's per-token work then runs between forwards instead of taking the
    GIL from the engine between every op of one (N = 32: 33.9 -> 31.9 ms per decode pass,
    +3% tokens/s; with the kernels releasing the GIL, 0 against 5 ms gave 501-561 against
    608-707 tok/s, then 563-692 against 562-744: benchmarks/RESULTS.md, serving)."""

    stream_interval: int = 1
    """Tokens per streamed piece after the first: 1 hands every token to the request's stream
    as it is sampled; k > 1 hands k at once (the first token and the last piece go at once),
    so the HTTP path (asyncio, SSE, Ray Serve's proxy) carries k times fewer events."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"scheduler.threads must be >= 1 (or None: all CPUs), got {self.threads}"
            )
        if self.pace_delivery_s < 0:
            raise ValueError(
                f"scheduler.pace_delivery_s must be >= 0 (0: no wait), got {self.pace_delivery_s}"
            )
        for name in ("num_slots", "max_waiting", "prefill_chunk", "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"scheduler.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SchedulerEvent:
    """What a sink receives: a stream event, or the end of a request without one (error)."""

    event: StreamEvent | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    deadline: float | None
    state: RequestState
    arrived: float = field(default_factory=time.monotonic)
    slot: int = -1
    prefilled: int = 0
    cancelled: bool = False
    span: Any = None
    """The request's `expertmesh.engine.request` span (None when tracing is off)."""

    @property
    def reserve(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.prompt_ids)


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    prefill_forwards: int = 0
    """Prefill forward passes (one per step with prompts to prefill, see `_prefill_group`)."""
    prefill_padding: int = 0
    """Padding tokens that prefill passes ran (shorter chunks filled to the longest)."""
    decode_forwards: int = 0
    forward_s: float = 0.0
    """Wall time inside the model's forward passes (prefill and decode), engine thread."""
    decode_forward_s: float = 0.0
    """The decode passes' share of `forward_s`."""
    step_s: float = 0.0
    """Wall time inside `step` (forwards, sampling, detokenising, sinks, bookkeeping)."""


class ContinuousBatcher:
    """See the module docstring. Thread-safe `submit` / `cancel`; `start` / `stop` the loop."""

    def __init__(
        self,
        model: MoEModel,
        tokenizer: Tokenizer | None,
        config: SchedulerConfig | None = None,
        kv_mode: KVMode | None = None,
        tracer: Any = None,
    ) -> None:
        self.model = model
        self.tracer = tracer
        self.observer: Any = None
        """EngineMetrics (or anything with `stats`, `after_step`, `forget`), set by the owner."""
        self.tokenizer = tokenizer
        self.config = config or SchedulerConfig()
        self.max_len = min(
            self.config.max_len or model.config.max_position, model.config.max_position
        )
        self.kv_budget = self.config.kv_budget_tokens or self.config.num_slots * self.max_len
        mode = model.config.check_kv_mode(kv_mode or model.config.default_kv_mode)
        self.cache = KVCache(  # on the attention worker's device (the CPU unless a GPU)
            model.config,
            mode,
            self.config.num_slots,
            self.max_len,
            model.dtype,
            model_device(model),
        )
        eos = set(model.config.eos_token_ids) | (
            set(tokenizer.eos_token_ids) if tokenizer else set()
        )
        self.eos_ids = tuple(eos)
        self.stats = SchedulerStats()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._by_id: dict[str, _Request] = {}
        self._free_slots = list(range(self.config.num_slots))
        self._reserved = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.last_progress = time.monotonic()
        self.fatal: BaseException | None = None
        self.step_hook: Callable[[], None] | None = None
        """Called at the start of every step (fault injection in tests: make it sleep)."""
        self.after_step_hook: Callable[[], None] | None = None
        """Called by the loop after every step, on the engine thread (the async wrapper waits
        there until the step's outputs reached their streams, `SchedulerConfig.pace_delivery_s`)."""

    # ----------------------------------------------------------------- public, any thread

    @property
    def context_window(self) -> int:
        return self.max_len

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_len:
            raise ContextTooLong(prompt_tokens, max_tokens, self.max_len)

    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Sink,
        deadline: float | None = None,
        parent: Any = None,
    ) -> None:
        """Queue a request; raises ContextTooLong or Overloaded (nothing is queued then).
        `parent`: the OpenTelemetry context the request's span is a child of."""
        ids = list(prompt_ids)
        self.check_fits(len(ids), params.max_tokens)
        state = RequestState(0, ids, params, self.tokenizer)
        req = _Request(request_id, ids, params, sink, deadline, state)
        if self.tracer is not None:
            req.span = self.tracer.start_span(
                "expertmesh.engine.request",
                context=parent,
                attributes={
                    "expertmesh.request_id": request_id,
                    "gen_ai.usage.input_tokens": len(ids),
                    "gen_ai.request.max_tokens": params.max_tokens,
                },
            )
        with self._lock:
            if len(self._waiting) >= self.config.max_waiting:
                self.stats.rejected += 1
                raise Overloaded(
                    f"the engine queue is full ({self.config.max_waiting} requests waiting); "
                    "retry after a moment",
                    retry_after_s=self.retry_after_s(),
                )
            if request_id in self._by_id:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._waiting.append(req)
            self._by_id[request_id] = req
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away); its slot is freed at the next step."""
        with self._lock:
            req = self._by_id.get(request_id)
            if req is not None:
                req.cancelled = True
                self._lock.notify()

    def retry_after_s(self) -> float:
        """A rough wait until a slot frees: one request's decode time at the current pace."""
        return 1.0

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._running), len(self._waiting)

    def kv_bytes_in_use(self) -> int:
        return self.cache.bytes_in_use()

    def stalled(self) -> bool:
        running, waiting = self.counts()
        busy = running + waiting > 0
        return busy and time.monotonic() - self.last_progress > self.config.stall_after_s

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="expertmesh-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal is None

    # ----------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        torch.set_num_threads(self.config.threads or len(os.sched_getaffinity(0)))
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not self._running:
                        self._lock.wait()
                        self.last_progress = time.monotonic()
                    if self._stop:
                        break
                self.step()
                if self.after_step_hook is not None:
                    self.after_step_hook()
        except BaseException as e:  # the engine is dead: fail everything, health says so
            self.fatal = e
            self._fail_all(e)
            raise

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (public for tests that drive the loop by hand)."""
        t0 = time.perf_counter()
        try:
            self._step()
        finally:
            self.stats.step_s += time.perf_counter() - t0

    def _step(self) -> None:
        if self.step_hook is not None:
            self.step_hook()
        self._retire()
        self._admit()
        if self.tracer is None or not self._running:
            self._work()
            return
        from opentelemetry.trace import Link, set_span_in_context

        # A step serves many requests: it belongs to the oldest one's trace (so a request's
        # trace reads end to end when it runs alone) and links every other one.
        traced = [r for r in self._running if r.span is not None]
        parent = set_span_in_context(traced[0].span) if traced else None
        links = [Link(r.span.get_span_context()) for r in traced[1:]]
        with self.tracer.start_as_current_span(
            "expertmesh.engine.step", context=parent, links=links
        ) as span:
            prefill, decode = self._work()
            if span.is_recording():
                span.set_attribute("expertmesh.batch_size", len(self._running))
                span.set_attribute("expertmesh.prefill", prefill)
                span.set_attribute("expertmesh.decode", decode)

    def _work(self) -> tuple[bool, bool]:
        stats = self.observer.stats if self.observer is not None else None
        prefill = self._prefill(stats)
        decoded = self._decode(stats)
        self.stats.steps += 1
        if prefill or decoded:
            self.last_progress = time.monotonic()
        if self.observer is not None:
            self.observer.after_step(decoded, prefill, bool(decoded))
        return prefill, bool(decoded)

    def _retire(self) -> None:
        now = time.monotonic()
        with self._lock:
            waiting = [
                r
                for r in self._waiting
                if r.cancelled or (r.deadline is not None and now > r.deadline)
            ]
            for r in waiting:
                self._waiting.remove(r)
        for r in waiting:
            self._end(r, "cancelled" if r.cancelled else "deadline")
        for r in [
            r for r in self._running if r.cancelled or (r.deadline is not None and now > r.deadline)
        ]:
            self._end(r, "cancelled" if r.cancelled else "deadline")

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._free_slots:
                req = self._waiting[0]
                if self._reserved + req.reserve > self.kv_budget and self._running:
                    break  # wait for running requests to finish and release KV
                self._waiting.popleft()
                req.slot = self._free_slots.pop()
                self._reserved += req.reserve
                self._running.append(req)
                self.stats.admitted += 1
                log.info(
                    "admitted to slot %d",
                    req.slot,
                    extra={"request_id": req.request_id, "prompt_tokens": len(req.prompt_ids)},
                )

    def _prefill_group(self, todo: list[_Request]) -> list[tuple[_Request, int]]:
        """The prefilling requests of this step's one prefill pass and their chunk sizes: every
        chunk longer than half the longest (shorter ones wait: less padding than real tokens
        per row), whose padded end still fits its cache row."""
        chunk = self.config.prefill_chunk
        sizes = [min(chunk, len(r.prompt_ids) - r.prefilled) for r in todo]
        width = max(sizes)
        return [
            (r, n)
            for r, n in zip(todo, sizes)
            if n == width or (2 * n > width and r.prefilled + width <= self.max_len)
        ]

    def _prefill(self, stats: Any) -> bool:
        todo = [r for r in self._running if not r.decoding]
        if not todo:
            return False
        group = self._prefill_group(todo)
        width = max(n for _, n in group)
        ids = torch.tensor(
            [r.prompt_ids[r.prefilled : r.prefilled + n] + [0] * (width - n) for r, n in group]
        )
        rows = torch.tensor([r.slot for r, _ in group])
        t0 = time.perf_counter()
        if all(n == width for _, n in group):
            logits = self.model(ids, self.cache, rows, "last", stats)[:, -1]
        else:
            logits = self._padded_forward(ids, rows, [n for _, n in group], stats)
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.prefill_forwards += 1
        self.stats.prefill_tokens += sum(n for _, n in group)
        self.stats.prefill_padding += sum(width - n for _, n in group)
        done = []
        for i, (r, n) in enumerate(group):
            r.prefilled += n
            if r.decoding:
                done.append((r, logits[i]))
        if done:
            self._emit([r for r, _ in done], torch.stack([lg for _, lg in done]))
        return True

    def _padded_forward(
        self, ids: torch.Tensor, rows: torch.Tensor, sizes: list[int], stats: Any
    ) -> torch.Tensor:
        """Logits (B, vocab) at each row's last real token of a prefill pass whose rows were
        padded at their end to `ids`' width. Attention is causal, so no real token sees the
        padding; the padding's keys and values are written past each row's real tokens and
        the cache lengths are set back to the real ones (the next tokens overwrite them).
        `stats` (router statistics) gets the real tokens' expert choices only."""
        B, width = ids.shape
        scratch = None if stats is None else RouterStats(self.model.config, keep_last=True)
        h = self.model.hidden_states(ids, self.cache, rows, scratch)
        last = torch.tensor(sizes) - 1
        logits = self.model.lm_head(h[torch.arange(B), last])
        self.cache.lengths[rows] -= width - (last + 1)
        if stats is not None and scratch is not None:
            real = (torch.arange(width)[None, :] <= last[:, None]).reshape(-1)
            for layer, (choice, weights) in scratch.last.items():
                if choice.shape[0] == real.numel():
                    stats.record(layer, choice[real], weights[real])
                else:  # not one row per token (B * width): count them as they came
                    stats.record(layer, choice, weights)
        return logits

    def _decode(self, stats: Any) -> list[str]:
        """One decode step; the request ids of the batch in row order (empty: nothing ran)."""
        # Requests whose prefill finished this step sampled their first token already.
        active = [r for r in self._running if r.decoding and r.state.completion.token_ids]
        active = [r for r in active if not r.state.done]
        if not active:
            return []
        ids = torch.tensor([[r.state.completion.token_ids[-1]] for r in active])
        rows = torch.tensor([r.slot for r in active])
        t0 = time.perf_counter()
        logits = self.model(ids, self.cache, rows, "last", stats)[:, -1]
        elapsed = time.perf_counter() - t0
        self.stats.forward_s += elapsed
        self.stats.decode_forward_s += elapsed
        self.stats.decode_forwards += 1
        self.stats.decode_tokens += len(active)
        self._emit(active, logits)
        return [r.request_id for r in active]

    def _emit(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.state for r in reqs])
        for r, tok in zip(reqs, tokens):
            event = r.state.accept(tok, self.eos_ids)
            if r.state.done:
                self._release(r)
                self.stats.finished += 1
            if event is not None:
                self._send(r, event)

    def _send(self, r: _Request, event: StreamEvent) -> None:
        c = r.state.completion
        if r.span is not None and len(c.token_ids) == 1 and event.finish_reason is None:
            r.span.add_event("first_token")
        try:
            r.sink(SchedulerEvent(event, len(r.prompt_ids), len(c.token_ids), event.finish_reason))
        except Exception:  # a broken sink (client gone) must not kill the engine
            r.cancelled = True

    def _end(self, r: _Request, reason: str) -> None:
        log.info("ended by %s", reason, extra={"request_id": r.request_id})
        if r.span is not None:
            r.span.set_attribute("expertmesh.ended_by", reason)
        self._release(r)
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.expired += 1
        c = r.state.completion
        with contextlib.suppress(Exception):
            r.sink(SchedulerEvent(None, len(r.prompt_ids), len(c.token_ids), reason))

    def _release(self, r: _Request) -> None:
        if r.span is not None:
            c = r.state.completion
            r.span.set_attribute("gen_ai.usage.output_tokens", len(c.token_ids))
            r.span.set_attribute("expertmesh.finish_reason", str(c.finish_reason))
            r.span.end()
            r.span = None
        if self.observer is not None:
            self.observer.forget(r.request_id)
        with self._lock:
            if r in self._running:
                self._running.remove(r)
                self._reserved -= r.reserve
                self.cache.free(torch.tensor([r.slot]))
                self._free_slots.append(r.slot)
            self._by_id.pop(r.request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            reqs = list(self._running) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self._by_id.clear()
        for r in reqs:
            if r.span is not None:
                r.span.record_exception(error)
                r.span.end()
            with contextlib.suppress(Exception):
                r.sink(SchedulerEvent(None, len(r.prompt_ids), 0, None, error))

    def describe(self) -> dict[str, Any]:
        running, waiting = self.counts()
        return {
            "running": running,
            "waiting": waiting,
            "slots": self.config.num_slots,
            "kv_reserved_tokens": self._reserved,
            "kv_budget_tokens": self.kv_budget,
            "kv_bytes_in_use": self.kv_bytes_in_use(),
            "kv_bytes_allocated": self.cache.nbytes,
            "steps": self.stats.steps,
            "stats": dataclasses.asdict(self.stats),
        }
