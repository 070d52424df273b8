"""Fixtures of the agents tests: a scripted engine behind the `Engine` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from expertmesh.serving.engine import EngineHealth, EngineOutput, EngineRequest, ModelCard


class ScriptedEngine:
    """Answers each request with the next reply in its script; records the requests."""

    def __init__(self, replies: Sequence[str], name: str = "expertmesh-demo") -> None:
        self.replies = list(replies)
        self.name = name
        self.requests: list[EngineRequest] = []

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, 2048)]

    def count_prompt_tokens(self, request: EngineRequest) -> None:
        return None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        yield EngineOutput(self.replies.pop(0), "stop", 10, 5)

    def health(self) -> EngineHealth:
        return EngineHealth(True, "ok")

    async def shutdown(self) -> None:
        return None


@pytest.fixture
def scripted() -> type[ScriptedEngine]:
    """`scripted(["SELECT 1", ...])`: an engine that replies with these, in order."""
    return ScriptedEngine
