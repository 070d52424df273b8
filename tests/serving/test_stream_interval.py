"""`scheduler.stream_interval`: the engine hands k tokens at once to a request's stream (the
first token and the last piece at once), the same text and counts as token by token; the
scheduler's step counters (forward passes, their time) that GET /health reports."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from expertmesh.models.generate import SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.serving.api import make_api
from expertmesh.serving.config import SchedulerSpec
from expertmesh.serving.engine import EngineOutput, EngineRequest
from expertmesh.serving.local_engine import ExpertMeshEngine
from expertmesh.serving.scheduler import SchedulerConfig

NEW_TOKENS = 14


def _engine(interval: int) -> ExpertMeshEngine:
    return ExpertMeshEngine.load(
        "expertmesh-demo", DEMO_MODEL_DIR, SchedulerConfig(num_slots=4, stream_interval=interval)
    )


async def _outputs(engine: ExpertMeshEngine, rid: str, prompt: str) -> list[EngineOutput]:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    request = EngineRequest(rid, "expertmesh-demo", params, prompt=prompt)
    return [out async for out in engine.generate(request)]


@pytest.fixture(scope="module")
def every_token() -> list[list[EngineOutput]]:
    engine = _engine(1)
    try:
        return asyncio.run(_gather(engine))
    finally:
        asyncio.run(engine.shutdown())


async def _gather(engine: ExpertMeshEngine) -> list[list[EngineOutput]]:
    prompts = ["ROMEO:", "To be, or not to be", "JULIET: O Romeo"]
    return list(
        await asyncio.gather(*(_outputs(engine, f"r{i}", p) for i, p in enumerate(prompts)))
    )


def test_pieces_of_k_tokens_same_text_and_counts(every_token) -> None:
    engine = _engine(4)
    try:
        grouped = asyncio.run(_gather(engine))
        stats = engine.batcher.describe()["stats"]
    finally:
        asyncio.run(engine.shutdown())
    for ones, fours in zip(every_token, grouped, strict=True):
        assert "".join(o.text for o in fours) == "".join(o.text for o in ones)
        assert fours[-1].completion_tokens == ones[-1].completion_tokens == NEW_TOKENS
        assert fours[-1].finish_reason == ones[-1].finish_reason == "length"
        counts = [o.completion_tokens for o in fours]
        assert counts[0] == 1  # the first token is not held back (time to first token)
        # every piece ends on a k boundary (a consumer that fell behind may merge several)
        assert all((c - 1) % 4 == 0 for c in counts[:-1]), counts
        assert len(fours) <= 1 + -(-(NEW_TOKENS - 1) // 4)
    # the counters GET /health shows: 3 requests decoded NEW_TOKENS - 1 tokens each after prefill
    assert stats["decode_tokens"] == 3 * (NEW_TOKENS - 1)
    assert stats["prefill_forwards"] >= 1 and stats["decode_forwards"] >= NEW_TOKENS - 1
    assert 0 < stats["forward_s"] <= stats["step_s"]


def test_sse_stream_with_interval_is_a_valid_openai_stream() -> None:
    engine = _engine(3)
    app = make_api(engine)

    async def run() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            body = {
                "model": "expertmesh-demo",
                "prompt": "ROMEO:",
                "max_tokens": 10,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                return [line async for line in r.aiter_lines() if line.startswith("data: ")]

    try:
        lines = asyncio.run(run())
        health = asyncio.run(_health(app))
    finally:
        asyncio.run(engine.shutdown())
    import json

    assert lines[-1] == "data: [DONE]"
    docs = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    usage = docs[-1]["usage"]
    pieces = [d["choices"][0] for d in docs[:-1]]
    assert pieces[-1]["finish_reason"] in ("stop", "length")
    assert all(p["finish_reason"] is None for p in pieces[:-1])
    if pieces[-1]["finish_reason"] == "length":  # 1 + 3 + 3 + 3 tokens
        assert usage["completion_tokens"] == 10 and len(pieces) <= 4
    assert health["stats"]["steps"] >= 1


async def _health(app) -> dict:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return (await c.get("/health")).json()


def test_closing_the_stream_early_frees_the_slot() -> None:
    engine = _engine(8)

    async def run() -> str:
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        stream = engine.generate(EngineRequest("c", "expertmesh-demo", params, prompt="ROMEO:"))
        first = await anext(stream)
        await stream.aclose()  # the client went away while tokens were held
        for _ in range(200):
            if engine.batcher.counts() == (0, 0):
                break
            await asyncio.sleep(0.01)
        return first.text

    try:
        asyncio.run(run())
        assert engine.batcher.counts() == (0, 0)
        assert engine.batcher.stats.cancelled == 1
    finally:
        asyncio.run(engine.shutdown())


def test_stream_interval_below_one_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"scheduler\.stream_interval"):
        SchedulerConfig(stream_interval=0)
    with pytest.raises(ValidationError, match="stream_interval"):
        SchedulerSpec(stream_interval=0)
