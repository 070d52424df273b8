"""The HTTP API against a fake engine (through the `Engine` protocol): shapes, streaming,
errors, headers. The real engine behind real Ray Serve is in test_serve_e2e.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import pytest
from fastapi.testclient import TestClient

from expertmesh.serving.api import ApiSettings, make_api
from expertmesh.serving.engine import (
    ContextTooLong,
    Engine,
    EngineHealth,
    EngineOutput,
    EngineRequest,
    ModelCard,
    Overloaded,
    UnknownModel,
)


class FakeEngine:
    """Echoes the prompt's words back one per output; errors on request."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []
        self.error: Exception | None = None
        self.closed: list[str] = []
        self.healthy = True

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard("fake", 128)]

    def count_prompt_tokens(self, request: EngineRequest) -> None:
        return None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        if request.model != "fake":
            raise UnknownModel(f"model {request.model!r} is not served here")
        words = (request.prompt or request.messages[-1].content).split()
        words = words[: request.params.max_tokens]
        try:
            for i, w in enumerate(words):
                last = i == len(words) - 1
                reason = (
                    ("length" if len(words) == request.params.max_tokens else "stop")
                    if last
                    else None
                )
                yield EngineOutput(w + " ", reason, 3, i + 1)
        finally:
            self.closed.append(request.request_id)

    def health(self) -> EngineHealth:
        return EngineHealth(self.healthy, "ok" if self.healthy else "engine loop stalled")

    async def shutdown(self) -> None:
        pass


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    assert isinstance(engine, Engine)
    return TestClient(make_api(engine, ApiSettings(default_max_tokens=16)))


def chat(content: str, **extra):
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


def test_chat_completion_has_openai_shape_and_usage(client):
    r = client.post("/v1/chat/completions", json=chat("one two three"))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "one two three "}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert r.headers["x-request-id"] == body["id"]


def test_client_request_id_is_echoed(client):
    r = client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": "a b"},
        headers={"x-request-id": "abc-1"},
    )
    assert r.headers["x-request-id"] == "abc-1"
    assert r.json()["choices"][0]["text"] == "a b "


def test_stream_is_server_sent_events_ending_with_done(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat("a b c", stream=True, stream_options={"include_usage": True}),
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "a b c "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_max_tokens_reaches_the_engine_and_length_is_reported(client, engine):
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "a b c d", "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert engine.requests[-1].params.max_tokens == 2


def test_default_max_tokens_applies(client, engine):
    client.post("/v1/completions", json={"model": "fake", "prompt": "a"})
    assert engine.requests[-1].params.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake", "messages": []}, "messages"),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        ({"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "fake", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = client.post(path, json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param in err["message"]


def test_invalid_json_is_400(client):
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_overloaded_is_429_with_retry_after(client, engine):
    engine.error = Overloaded("queue full", retry_after_s=3)
    r = client.post("/v1/chat/completions", json=chat("x"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_context_too_long_is_400_naming_the_limit(client, engine):
    engine.error = ContextTooLong(100, 50, 128)
    r = client.post("/v1/chat/completions", json=chat("x"))
    assert r.status_code == 400
    assert "maximum context length is 128 tokens" in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json={**chat("x"), "model": "gpt-9"})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "model"


def test_models_and_health(client, engine):
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert client.get("/health").status_code == 200
    engine.healthy = False
    r = client.get("/health")
    assert r.status_code == 503 and "stalled" in r.json()["detail"]


def test_engine_stream_is_closed_when_done(client, engine):
    client.post("/v1/chat/completions", json=chat("a b", stream=True))
    assert engine.closed == [engine.requests[-1].request_id]
