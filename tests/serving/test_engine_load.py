"""Our engine behind the API under load, without Ray Serve: backpressure (429 + Retry-After,
never an unbounded backlog), a stalled loop failing health (the vLLM engine: test_vllm_engine.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.serving.api import make_api
from expertmesh.serving.app import ApiServer
from expertmesh.serving.engine import EngineDead
from expertmesh.serving.local_engine import ExpertMeshEngine
from expertmesh.serving.scheduler import SchedulerConfig


@pytest.fixture
def engine():
    e = ExpertMeshEngine.load(
        "expertmesh-demo",
        DEMO_MODEL_DIR,
        SchedulerConfig(num_slots=1, max_waiting=2, stall_after_s=0.3),
    )
    yield e
    asyncio.run(e.shutdown())


def test_full_queue_answers_429_with_retry_after_and_serves_the_rest(engine):
    app = make_api(engine)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            body = {"model": "expertmesh-demo", "prompt": "ROMEO:", "max_tokens": 24}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2  # at least the two the queue holds (one may already run)
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert set(codes) <= {200, 429}
    assert engine.batcher.counts() == (0, 0)


def test_stalled_loop_fails_health_and_the_serve_health_check(engine):
    engine.batcher.step_hook = lambda: time.sleep(1.5)
    engine.batcher.submit("h", [1, 2, 3], engine_params(), lambda e: None)
    time.sleep(0.8)
    health = engine.health()
    assert not health.healthy and "stalled" in health.detail
    server = ApiServer.__new__(ApiServer)  # the deployment's check_health, on this engine
    server.engine = engine
    with pytest.raises(EngineDead, match="stalled"):
        server.check_health()
    engine.batcher.step_hook = None


def engine_params():
    from expertmesh.models.generate import SamplingParams

    return SamplingParams(max_tokens=2)


def test_a_counted_prompt_is_tokenised_once(engine):
    from expertmesh.models.generate import SamplingParams
    from expertmesh.serving.engine import EngineRequest, Message

    request = EngineRequest(
        "r-1", engine.name, SamplingParams(max_tokens=2), messages=(Message("user", "ROMEO:"),)
    )
    n = engine.count_prompt_tokens(request)
    counted = engine._counted["r-1"][1]
    assert n == len(counted) > 0
    assert engine.prompt_ids(request) is counted  # the ids the count made, not a second pass
    assert "r-1" not in engine._counted
    other = EngineRequest(
        "r-2", engine.name, SamplingParams(max_tokens=2), messages=(Message("user", "JULIET:"),)
    )
    engine.count_prompt_tokens(other)
    changed = EngineRequest("r-2", engine.name, SamplingParams(max_tokens=2), prompt="ROMEO:")
    assert engine.prompt_ids(changed) == engine.tokenizer.encode("ROMEO:", add_special_tokens=True)
