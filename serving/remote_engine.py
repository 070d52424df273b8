"""`RemoteOpenAIEngine`: any OpenAI-compatible API (another expertmesh, vLLM, a provider)
behind the `Engine` protocol, streaming over httpx.

The engine authenticates upstream with its own key (from the environment variable the config
names), never with the caller's: a client's credentials do not leave this server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from .engine import (
    EngineError,
    EngineHealth,
    EngineOutput,
    EngineRequest,
    FinishReason,
    InvalidRequest,
    ModelCard,
    Overloaded,
    UnknownModel,
)


class RemoteUnavailable(EngineError):
    """The upstream API did not answer or failed (5xx)."""

    status = 502
    type = "upstream_error"


class RemoteOpenAIEngine:
    def __init__(
        self,
        name: str,
        base_url: str,
        remote_model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        context_window: int = 0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.remote_model = remote_model
        self.context_window = context_window
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self.failures = 0
        self.last_ok = time.monotonic()
        self.last_error = ""

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> RemoteOpenAIEngine:
        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise InvalidRequest(
                    f"remote.api_key_env names ${spec.api_key_env}, which is not set; export it"
                )
        return cls(name, spec.base_url, spec.model, key, spec.timeout_s)

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, self.context_window, owned_by="remote")]

    def count_prompt_tokens(self, request: EngineRequest) -> None:
        """The remote API's tokenizer is not known here: the selector estimates (high)."""
        return None

    def _body(self, request: EngineRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.remote_model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if request.model != self.name:
            raise UnknownModel(f"model {request.model!r} is not served here; try {self.name!r}")
        path, body = self._body(request)
        headers = {"x-request-id": request.request_id, **request.trace_context}
        try:
            async with self.client.stream(
                "POST", self.base_url + path, json=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._error(response)
                prompt_tokens = completion_tokens = 0
                finish: str | None = None
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RemoteUnavailable(f"upstream error: {chunk['error'].get('message')}")
                    if chunk.get("usage"):
                        prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                        completion_tokens = chunk["usage"].get("completion_tokens", 0)
                    for choice in chunk.get("choices", []):
                        text = choice.get("text")
                        if text is None:
                            text = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            completion_tokens = max(completion_tokens, 0)
                            yield EngineOutput(text, None, prompt_tokens, completion_tokens)
                self.failures = 0
                self.last_ok = time.monotonic()
                reason: FinishReason = "length" if finish == "length" else "stop"
                yield EngineOutput("", reason, prompt_tokens, completion_tokens)
        except httpx.HTTPError as e:
            self.failures += 1
            self.last_error = repr(e)
            raise RemoteUnavailable(f"{self.base_url} did not answer: {e!r}") from e

    def _error(self, response: httpx.Response) -> EngineError:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        status = response.status_code
        if status == 429:
            retry = float(response.headers.get("retry-after", "1") or 1)
            return Overloaded(f"upstream is rate limiting: {message}", retry_after_s=retry)
        if status == 404:
            return UnknownModel(f"upstream: {message}")
        if 400 <= status < 500:
            return InvalidRequest(f"upstream rejected the request: {message}")
        self.failures += 1
        self.last_error = f"HTTP {status}: {message}"
        return RemoteUnavailable(f"upstream failed with HTTP {status}: {message}")

    def health(self) -> EngineHealth:
        healthy = self.failures < 3
        detail = "ok" if healthy else f"{self.failures} failures in a row: {self.last_error}"
        return EngineHealth(healthy, detail, last_progress_age_s=time.monotonic() - self.last_ok)

    async def shutdown(self) -> None:
        await self.client.aclose()
