"""The `Engine` protocol the API server depends on, its request/output types and its errors.

Engines: `ExpertMeshEngine` (our model, single-process or expert-parallel, with the
continuous-batching scheduler), `VLLMEngine` (whole-model replicas on GPU nodes) and
`RemoteOpenAIEngine` (any OpenAI-compatible endpoint). The server never imports a concrete
engine; `build_app` injects one.

Errors split as vLLM v1 does: per-request errors (`InvalidRequest`, `ContextTooLong`,
`Overloaded`, `DeadlineExceeded`) fail one request; `EngineDead` means the engine must be
restarted (the replica's health check reports it, Ray Serve replaces the replica).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from expertmesh.models.generate import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "deadline"]


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class EngineRequest:
    """One generation request. Exactly one of `prompt` (raw completion) or `messages` (chat:
    the engine applies its model's chat template) is set."""

    request_id: str
    model: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    deadline_s: float | None = None
    """time.monotonic() by which the request must finish, or None."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C trace context (traceparent) to continue the caller's trace."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("EngineRequest needs exactly one of prompt or messages")


@dataclass(frozen=True)
class EngineOutput:
    """One streamed piece of a request: new text since the last piece; the last piece carries
    `finish_reason` and the final token counts."""

    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelCard:
    id: str
    context_window: int
    owned_by: str = "expertmesh"


@dataclass(frozen=True)
class EngineHealth:
    healthy: bool
    detail: str
    running: int = 0
    waiting: int = 0
    last_progress_age_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What the API server needs from an engine."""

    def models(self) -> Sequence[ModelCard]: ...

    def count_prompt_tokens(self, request: EngineRequest) -> int | None:
        """The exact number of prompt tokens the model will be fed for `request` (chat template
        applied), or None where the engine cannot know before it runs (a remote API). The
        selector gate reserves budgets on it, on the text after PII redaction, so a reservation
        is a true upper bound; an engine that counts may keep the ids for the `generate` call
        with the same request id and text (tokenise once)."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream the request's output. Raises (before the first output, where it can) one of
        the errors below. Closing the iterator early cancels the request and frees its slot."""
        ...

    def health(self) -> EngineHealth: ...

    async def shutdown(self) -> None: ...


class EngineError(Exception):
    """Base of engine errors; `status` is the HTTP status the server answers with."""

    status = 500
    type = "server_error"
    param: str | None = None


class InvalidRequest(EngineError):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_window: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_window} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "max_tokens.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window


class UnknownModel(EngineError):
    status = 404
    type = "invalid_request_error"
    param = "model"


class Overloaded(EngineError):
    """The bounded queue is full: answer 429 with Retry-After."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    status = 504
    type = "timeout_error"


class EngineDead(EngineError):
    status = 503
    type = "server_error"
