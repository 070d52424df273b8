"""The OpenAI-compatible HTTP API as a FastAPI app over any `Engine`.

    api = make_api(engine, ApiSettings())

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or SSE streaming), GET /v1/models,
GET /health (503 when the engine is dead or its loop stalled), GET /metrics (Prometheus text).
Every response carries `x-request-id` (the client's, or a new one). Errors use the OpenAI
error body; 429 answers carry `Retry-After`. A `Gate` (the model selector, see
`routing/`) can authenticate the caller and choose the model; without one every request goes
to the engine's model it names.

`app.py` wraps this app in a Ray Serve deployment; tests can also serve it directly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from expertmesh.models.errors import GenerationError
from expertmesh.models.generate import SamplingParams
from expertmesh.observability.logs import bind_request_id

from .engine import (
    Engine,
    EngineError,
    EngineOutput,
    EngineRequest,
    InvalidRequest,
    Message,
)
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    now,
)

log = logging.getLogger("expertmesh.serving")


@dataclass(frozen=True)
class ApiSettings:
    default_max_tokens: int = 256
    """max_tokens when a request sets none."""
    request_timeout_s: float | None = 120.0
    """Deadline of every request, from arrival."""


@dataclass
class GateDecision:
    """What a gate decided for one request."""

    model: str
    headers: dict[str, str] = field(default_factory=dict)
    settle: Callable[[int, int], Awaitable[None]] | None = None
    """Called once with (prompt_tokens, completion_tokens) when the request completes."""
    max_tokens: int | None = None
    """The output cap to enforce (the budget reservation assumed it); None: the request's."""
    rewrite: Callable[[str], str] | None = None
    """Applied to every message / the prompt before the engine sees it (PII redaction)."""
    release: Callable[[], None] | None = None
    """Called instead of `settle` when the request fails (drops a budget hold)."""


class Gate(Protocol):
    """Authentication, authorisation and model choice in front of the engine (the selector)."""

    async def admit(
        self, request_id: str, headers: Mapping[str, str], body: BaseModel, kind: str
    ) -> GateDecision: ...


class Metrics:
    """The API's OpenTelemetry instruments (no-ops when telemetry is off)."""

    def __init__(self, meter: Any, engine: Engine) -> None:
        self.requests = meter.create_counter(
            "expertmesh.requests", unit="{request}", description="Requests by route and status"
        )
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to first token"
        )
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", description="Time per output token"
        )
        self.tokens = meter.create_counter(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens by type"
        )

        def queue(_options: Any) -> Any:
            from opentelemetry.metrics import Observation

            h = engine.health()
            return [
                Observation(h.waiting, {"state": "waiting"}),
                Observation(h.running, {"state": "running"}),
            ]

        meter.create_observable_gauge(
            "expertmesh.engine.requests", callbacks=[queue], description="Requests in the engine"
        )


def _error(exc: EngineError, request_id: str) -> JSONResponse:
    headers = {"x-request-id": request_id}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry)))
    return JSONResponse(
        error_body(str(exc), exc.type, exc.param), status_code=exc.status, headers=headers
    )


def _validation_error(e: ValidationError, request_id: str) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse(
        error_body(message, "invalid_request_error", param or None),
        status_code=400,
        headers={"x-request-id": request_id},
    )


def engine_request(
    rid: str,
    model: str,
    body: ChatCompletionRequest | CompletionRequest,
    params: SamplingParams,
    rewrite: Callable[[str], str] | None = None,
    deadline_s: float | None = None,
) -> EngineRequest:
    """The request the engine gets for `body`: its messages (chat) or prompt (completion), every
    text passed through `rewrite` (the gate's PII redaction). The gate counts prompt tokens on
    exactly this request, so what it reserves for is what the engine runs."""
    rewrite = rewrite or (lambda text: text)
    if isinstance(body, ChatCompletionRequest):
        messages = tuple(Message(m.role, rewrite(m.text())) for m in body.messages)
        return EngineRequest(rid, model, params, messages=messages, deadline_s=deadline_s)
    return EngineRequest(
        rid, model, params, prompt=rewrite(body.prompt_text()), deadline_s=deadline_s
    )


async def parse_body(request: Request, schema: type[BaseModel], rid: str) -> BaseModel | Response:
    """The validated body, or the 400 naming what is wrong (not JSON, or the first bad field)."""
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return JSONResponse(
            error_body("the request body is not valid JSON", "invalid_request_error"),
            status_code=400,
            headers={"x-request-id": rid},
        )
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        return _validation_error(e, rid)


def models_doc(engine: Engine) -> dict[str, Any]:
    """GET /v1/models."""
    return {
        "object": "list",
        "data": [
            {
                "id": card.id,
                "object": "model",
                "created": 0,
                "owned_by": card.owned_by,
                "context_window": card.context_window,
            }
            for card in engine.models()
        ],
    }


def health_response(engine: Engine) -> JSONResponse:
    """GET /health: 200 with the engine's queue, 503 when it is dead or its loop stalled."""
    h = engine.health()
    doc = {
        "status": "ok" if h.healthy else "unhealthy",
        "detail": h.detail,
        "running": h.running,
        "waiting": h.waiting,
        "last_progress_age_s": round(h.last_progress_age_s, 3),
        **h.extra,
    }
    return JSONResponse(doc, status_code=200 if h.healthy else 503)


def metrics_response(registry: Any) -> Response:
    """GET /metrics: the Prometheus text of `registry` (telemetry's, not the process default)."""
    if registry is None:
        return PlainTextResponse("# metrics are off (telemetry.metrics_exporter)\n")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


Body = ChatCompletionRequest | CompletionRequest


@dataclass
class Exchange:
    """One admitted request on its way out: who asked, what the engine runs, and where its
    output goes (the root span, the gate's settle/release)."""

    rid: str
    kind: str
    """"chat" or "completion"."""
    body: Body
    span: Any
    decision: GateDecision
    request: EngineRequest
    stream: AsyncIterator[EngineOutput]
    first: EngineOutput
    arrived: float
    headers: dict[str, str]
    created: int = field(default_factory=now)

    @property
    def model(self) -> str:
        return self.request.model

    def fail(self, error: EngineError) -> None:
        """A failure after admission: drop the budget hold, mark the span."""
        if self.decision.release is not None:
            self.decision.release()
        _span_error(self.span, error)


class CompletionHandlers:
    """The two generation routes, one small step per method: `handle` (id, parse) -> `traced`
    (root span) -> `admit` (gate, engine request, first output) -> `whole` (JSON) or `events`
    (SSE) -> `finish` (logs, span, metrics, settle)."""

    def __init__(
        self,
        engine: Engine,
        settings: ApiSettings,
        gate: Gate | None,
        metrics: Metrics,
        tracer: Any,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.gate = gate
        self.metrics = metrics
        self.tracer = tracer

    def sampling(self, body: Body, limit: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=limit or self.settings.default_max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop_list(),
            )
        except GenerationError as e:
            raise InvalidRequest(str(e)) from e

    async def handle(
        self, request: Request, kind: str, schema: type[BaseModel], id_prefix: str
    ) -> Response:
        rid = request.headers.get("x-request-id") or new_id(id_prefix)
        body = await parse_body(request, schema, rid)
        if isinstance(body, Response):
            return body
        assert isinstance(body, ChatCompletionRequest | CompletionRequest)
        with bind_request_id(rid):
            log.info("request received", extra={"route": kind, "model": body.model})
            return await self.traced(request, kind, body, rid)

    async def traced(self, request: Request, kind: str, body: Body, rid: str) -> Response:
        """`respond` inside the request's root span (one trace per request, continuing the
        caller's `traceparent` if it sent one)."""
        if self.tracer is None:
            return await self.respond(request, kind, body, rid, None)
        from opentelemetry import context as otel_context
        from opentelemetry import propagate, trace

        operation = "chat" if kind == "chat" else "text_completion"
        span = self.tracer.start_span(
            f"{operation} {body.model}",
            context=propagate.extract(dict(request.headers)),
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": body.model,
                "gen_ai.request.temperature": body.temperature,
                "gen_ai.request.top_p": body.top_p,
                "gen_ai.request.max_tokens": body.output_limit()
                or self.settings.default_max_tokens,
                "gen_ai.response.id": rid,
                "expertmesh.request_id": rid,
                "expertmesh.stream": body.stream,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = await self.respond(request, kind, body, rid, span)
        except BaseException as e:
            span.record_exception(e)
            span.end()
            raise
        finally:
            otel_context.detach(token)
        if span.is_recording():
            response.headers["x-trace-id"] = format(span.get_span_context().trace_id, "032x")
        if not isinstance(response, StreamingResponse):
            span.end()  # a stream ends its span when it closes
        return response

    async def respond(
        self, request: Request, kind: str, body: Body, rid: str, span: Any
    ) -> Response:
        admitted = await self.admit(request, kind, body, rid, span)
        if isinstance(admitted, Response):
            return admitted
        if body.stream:
            return StreamingResponse(
                self.events(admitted), media_type="text/event-stream", headers=admitted.headers
            )
        return await self.whole(admitted)

    async def admit(
        self, request: Request, kind: str, body: Body, rid: str, span: Any
    ) -> Exchange | Response:
        """Gate, engine request and the first output; an error before the first token is an
        HTTP error (and releases what the gate held)."""
        arrived = time.monotonic()
        headers = {"x-request-id": rid}
        decision: GateDecision | None = None
        try:
            decision = (
                await self.gate.admit(rid, request.headers, body, kind)
                if self.gate is not None
                else GateDecision(body.model)
            )
            headers.update(decision.headers)
            er = engine_request(
                rid,
                decision.model,
                body,
                self.sampling(body, decision.max_tokens or body.output_limit()),
                decision.rewrite,
                _deadline(arrived, self.settings),
            )
            stream = self.engine.generate(er)
            first = await anext(stream)
        except EngineError as e:
            self.metrics.requests.add(1, {"route": kind, "status": e.status})
            if decision is not None and decision.release is not None:
                decision.release()
            _span_error(span, e)
            log.warning("request refused: %s", e, extra={"status": e.status})
            return _with(_error(e, rid), headers)
        except StopAsyncIteration:
            first = EngineOutput("", "stop", 0, 0)
            stream = _empty()
        assert decision is not None
        self.metrics.ttft.record(time.monotonic() - arrived, {"gen_ai.request.model": er.model})
        if span is not None and span.is_recording():
            span.set_attribute("gen_ai.response.model", er.model)
            for k, v in decision.headers.items():
                if k.startswith("x-expertmesh-"):
                    span.set_attribute("expertmesh.selector." + k[len("x-expertmesh-") :], v)
        return Exchange(rid, kind, body, span, decision, er, stream, first, arrived, headers)

    async def finish(self, ex: Exchange, out: EngineOutput, started: float) -> None:
        """The request completed: log line, span usage, metrics, the gate's settlement."""
        with bind_request_id(ex.rid):
            log.info(
                "request finished",
                extra={
                    "model": ex.model,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "finish_reason": _reason(out),
                },
            )
        span = ex.span
        if span is not None and span.is_recording():
            span.set_attribute("gen_ai.usage.input_tokens", out.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", out.completion_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [_reason(out)])
        metrics = self.metrics
        metrics.requests.add(1, {"route": ex.kind, "status": 200})
        metrics.tokens.add(out.prompt_tokens, {"gen_ai.token.type": "input"})
        metrics.tokens.add(out.completion_tokens, {"gen_ai.token.type": "output"})
        if out.completion_tokens > 1:
            metrics.tpot.record(
                (time.monotonic() - started) / (out.completion_tokens - 1),
                {"gen_ai.request.model": ex.model},
            )
        if ex.decision.settle is not None:
            await ex.decision.settle(out.prompt_tokens, out.completion_tokens)

    async def whole(self, ex: Exchange) -> Response:
        """A non-streaming answer: every output joined into one OpenAI response."""
        parts = [ex.first.text]
        last = ex.first
        try:
            while last.finish_reason is None:
                last = await anext(ex.stream)
                parts.append(last.text)
        except EngineError as e:
            ex.fail(e)
            return _with(_error(e, ex.rid), ex.headers)
        await self.finish(ex, last, ex.arrived)
        usage = _usage(last)
        text = "".join(parts)
        if ex.kind == "chat":
            doc = chat_response(ex.rid, ex.model, text, _reason(last), usage, ex.created)
        else:
            if isinstance(ex.body, CompletionRequest) and ex.body.echo:
                text = ex.body.prompt_text() + text
            doc = completion_response(ex.rid, ex.model, text, _reason(last), usage, ex.created)
        return JSONResponse(doc, headers=ex.headers)

    async def events(self, ex: Exchange) -> AsyncIterator[bytes]:
        """The SSE stream: a chunk per output, usage when asked, `[DONE]`; an engine error
        mid-stream is an error event; the engine's stream is closed however it ends (a client
        that goes away frees its batch slot)."""
        rid, model, created, chat = ex.rid, ex.model, ex.created, ex.kind == "chat"
        body = ex.body
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        out = ex.first
        started = time.monotonic()
        try:
            if chat:
                yield _sse(
                    chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None)
                )
            while True:
                if out.text or out.finish_reason is not None:
                    reason = _reason(out) if out.finish_reason is not None else None
                    if chat:
                        delta = {"content": out.text} if out.text else {}
                        yield _sse(chat_chunk(rid, model, created, delta, reason))
                    else:
                        yield _sse(completion_chunk(rid, model, created, out.text, reason))
                if out.finish_reason is not None:
                    break
                out = await anext(ex.stream)
            await self.finish(ex, out, started)
            if include_usage:
                chunk = chat_chunk if chat else completion_chunk
                yield _sse(chunk(rid, model, created, None, None, _usage(out)))
            yield b"data: [DONE]\n\n"
        except EngineError as e:
            ex.fail(e)
            yield _sse(error_body(str(e), e.type, e.param))
            yield b"data: [DONE]\n\n"
        finally:  # done, failed, or the client went away (GeneratorExit at a yield)
            close = getattr(ex.stream, "aclose", None)  # frees the batch slot
            if close is not None:
                await close()
            if ex.span is not None:
                if out.finish_reason is None:
                    ex.span.set_attribute("expertmesh.ended_by", "client_disconnected")
                ex.span.end()


def make_api(
    engine: Engine,
    settings: ApiSettings | None = None,
    gate: Gate | None = None,
    meter: Any = None,
    prometheus_registry: Any = None,
    tracer: Any = None,
) -> FastAPI:
    """The FastAPI app: the routes below over `engine` (see the module docstring)."""
    settings = settings or ApiSettings()
    if meter is None:
        from opentelemetry.metrics import NoOpMeter

        meter = NoOpMeter("expertmesh.serving")
    handlers = CompletionHandlers(engine, settings, gate, Metrics(meter, engine), tracer)
    app = FastAPI(title="expertmesh", version="0.1.0")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handlers.handle(request, "chat", ChatCompletionRequest, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handlers.handle(request, "completion", CompletionRequest, "cmpl")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_doc(engine)

    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(engine)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return metrics_response(prometheus_registry)

    return app


def _span_error(span: Any, error: EngineError) -> None:
    if span is None or not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", type(error).__name__)
    span.set_attribute("http.response.status_code", error.status)
    span.set_status(Status(StatusCode.ERROR, str(error)))


async def _empty() -> AsyncIterator[EngineOutput]:
    return
    yield  # pragma: no cover


def _with(response: Response, headers: Mapping[str, str]) -> Response:
    for k, v in headers.items():
        response.headers.setdefault(k, v)
    return response


def _deadline(arrived: float, settings: ApiSettings) -> float | None:
    return None if settings.request_timeout_s is None else arrived + settings.request_timeout_s


def _usage(out: EngineOutput) -> Usage:
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
    )


def _reason(out: EngineOutput) -> str:
    return "length" if out.finish_reason in ("length", "deadline") else "stop"


def _sse(doc: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
