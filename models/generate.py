"""Batched generation on the single-process model: prompts of different lengths, greedy and
sampling, stop strings and tokens, max tokens, a streaming callback per token.

Prompts are prefilled in chunks of `prefill_chunk` tokens (rows of equal length together), so
a long prompt never needs memory for its full attention matrix; then all unfinished rows
decode together, one token per step, each at its own position in the KV cache.

Sampling is seeded per request (a `torch.Generator` per row), so a seeded request gives the
same text whatever else shares its batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .config import KVMode
from .device import model_device
from .errors import GenerationError
from .kv_cache import KVCache
from .model import MoEModel

if TYPE_CHECKING:
    from .router_stats import RouterStats
    from .tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StreamEvent:
    """One step of one request, passed to the streaming callback in order.

    `text` is the new text since the previous event (text that could still turn out to be
    the start of a stop string is held back). The last event of a request carries its
    `finish_reason`; its `token_id` is None when an end-of-sequence or stop token ended it.
    """

    index: int
    token_id: int | None
    text: str
    finish_reason: FinishReason | None


TokenCallback = Callable[[StreamEvent], None]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Strings that end generation; the matched string is not part of the output."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Completion:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: FinishReason = "length"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0


class RequestState:
    """Per-request decoding state: tokens, text, stop strings and their hold-back, seeded
    sampler. Shared by `Generator` and the serving scheduler."""

    def __init__(
        self, index: int, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None
    ):
        self.completion = Completion(index, prompt)
        self.params = params
        self.detok = None
        if tokenizer is not None:
            from .tokenizer import IncrementalDetokenizer

            self.detok = IncrementalDetokenizer(tokenizer)
        self.emitted = 0  # characters of text already passed to the callback
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator().manual_seed(
                params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            )
        self.done = False

    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    def held_back(self, text: str) -> int:
        """Characters at the end of `text` that could still become a stop string."""
        longest = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def accept(self, token: int, eos_ids: Sequence[int]) -> StreamEvent | None:
        """Take the sampled `token`; the event to stream (None when nothing is safe to show yet
        and the request goes on). Sets `done` when the request finished."""
        c, p = self.completion, self.params
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
            return self.finish("stop", None)
        c.token_ids.append(token)
        if self.detok is not None:
            self.detok.push(token)
            text = self.detok.text
            for stop in p.stop:
                # Search only where this token could have completed a match.
                at = text.find(stop, max(0, self.emitted - len(stop)))
                if at >= 0:
                    c.text = text[:at]
                    return self.finish("stop", token)
        if len(c.token_ids) >= p.max_tokens:
            return self.finish("length", token)
        text = self.text()
        safe_end = max(self.emitted, len(text) - self.held_back(text))
        event = StreamEvent(c.index, token, text[self.emitted : safe_end], None)
        self.emitted = safe_end
        return event

    def finish(self, reason: FinishReason, token: int | None) -> StreamEvent:
        """End the request; the last event carries the rest of the text and the reason."""
        c = self.completion
        c.finish_reason = reason
        if self.detok is not None and c.text is None:
            self.detok.flush()  # emit bytes held back for an incomplete UTF-8 character
            c.text = self.text()
        event = StreamEvent(c.index, token, (c.text or "")[self.emitted :], reason)
        self.emitted = len(c.text or "")
        self.done = True
        return event


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, rows: Sequence[RequestState]) -> list[int]:
    """Next token per row from logits (B, V)."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy:
            out.append(greedy[i])
            continue
        # On the host: each row's seeded torch.Generator is a CPU generator on every device.
        filtered = _filter_top_k_top_p(logits[i].float().cpu() / p.temperature, p.top_k, p.top_p)
        probs = filtered.softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=row.generator).item()))
    return out


class Generator:
    """Generates with one model in this process. Reusable; not thread-safe."""

    def __init__(
        self,
        model: MoEModel,
        tokenizer: Tokenizer | None = None,
        kv_mode: KVMode | None = None,
        prefill_chunk: int = 512,
        tracer: Any | None = None,
        router_stats: RouterStats | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kv_mode: KVMode = model.config.check_kv_mode(kv_mode or model.config.default_kv_mode)
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.tracer = tracer
        self.router_stats = router_stats
        self.stats = GenerationStats()

    def _span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(
                    "a text prompt needs a tokenizer; pass token ids or load tokenizer.json"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise GenerationError(
                f"prompt token ids {bad[:5]} are outside the vocabulary (size {self.model.config.vocab_size})"
            )
        return ids

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        if not prompts:
            return []
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(prompts):
            raise GenerationError(f"got {len(prompts)} prompts but {len(per_row)} SamplingParams")
        encoded = [self.encode(p) for p in prompts]
        if any(p.stop for p in per_row) and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to detokenize the output")
        limit = self.model.config.max_position
        for i, (ids, p) in enumerate(zip(encoded, per_row)):
            if len(ids) + p.max_tokens > limit:
                raise GenerationError(
                    f"prompt {i}: {len(ids)} prompt tokens + max_tokens {p.max_tokens} exceed the "
                    f"model's context window of {limit} tokens"
                )
        with self._span(
            "expertmesh.generate",
            **{
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.max_tokens": max(p.max_tokens for p in per_row),
                "gen_ai.usage.input_tokens": sum(map(len, encoded)),
                "expertmesh.batch_size": len(encoded),
                "expertmesh.kv_cache.mode": self.kv_mode,
            },
        ) as span:
            completions = self._run(encoded, per_row, on_token)
            if span is not None:
                span.set_attribute("gen_ai.usage.output_tokens", self.stats.generated_tokens)
        return completions

    def _run(
        self,
        encoded: list[list[int]],
        per_row: list[SamplingParams],
        on_token: TokenCallback | None,
    ) -> list[Completion]:
        rows = [
            RequestState(i, ids, p, self.tokenizer)
            for i, (ids, p) in enumerate(zip(encoded, per_row))
        ]
        max_len = max(len(ids) + p.max_tokens for ids, p in zip(encoded, per_row))
        cache = KVCache(
            self.model.config,
            self.kv_mode,
            len(rows),
            max_len,
            self.model.dtype,
            model_device(self.model),
        )
        stats = self.stats = GenerationStats(prompt_tokens=sum(map(len, encoded)))

        t0 = time.perf_counter()
        last_logits = self._prefill(encoded, cache)
        stats.prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        active = list(range(len(rows)))
        logits = last_logits
        while True:
            tokens = sample(logits, [rows[i] for i in active])
            for i, tok in zip(active, tokens):
                self._accept(rows[i], tok, on_token)
            active = [i for i in active if not rows[i].done]
            if not active:
                break
            with self._span("expertmesh.decode_step", **{"expertmesh.batch_size": len(active)}):
                step_ids = torch.tensor([[rows[i].completion.token_ids[-1]] for i in active])
                logits = self.model(
                    step_ids, cache, torch.tensor(active), "last", self.router_stats
                )[:, -1]
            stats.decode_steps += 1
        stats.decode_s = time.perf_counter() - t0
        stats.generated_tokens = sum(len(r.completion.token_ids) for r in rows)
        return [r.completion for r in rows]

    def _prefill(self, encoded: list[list[int]], cache: KVCache) -> torch.Tensor:
        """Run every prompt through the model in chunks; logits of each prompt's last token (B, V)."""
        last = torch.empty(
            len(encoded),
            self.model.config.vocab_size,
            dtype=self.model.dtype,
            device=model_device(self.model),
        )
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        for length, idx in by_length.items():
            batch = torch.tensor([encoded[i] for i in idx])
            rows = torch.tensor(idx)
            with self._span(
                "expertmesh.prefill",
                **{"expertmesh.batch_size": len(idx), "expertmesh.prompt_tokens": length},
            ):
                for start in range(0, length, self.prefill_chunk):
                    chunk = batch[:, start : start + self.prefill_chunk]
                    out = self.model(chunk, cache, rows, "last", self.router_stats)
            last[rows.to(last.device)] = out[:, -1]
        return last

    def _accept(self, row: RequestState, token: int, on_token: TokenCallback | None) -> None:
        event = row.accept(token, self.eos_ids())
        if event is not None and on_token is not None:
            on_token(event)

    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return tuple(ids)
