"""The engine's KV-pressure detector on the real engine and scheduler: a burst past the bounded
queue (429s) is detected once and clears when the queue drains; a run within capacity reports
nothing."""

from __future__ import annotations

import asyncio
import time

from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability.events import KV_CACHE_EXHAUSTED, FaultEvent
from expertmesh.serving.engine import EngineRequest, Overloaded
from expertmesh.serving.engine_detect import KvPressure
from expertmesh.serving.local_engine import ExpertMeshEngine
from expertmesh.serving.scheduler import SchedulerConfig


class ListSink:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.events.append(event)
        return event


def engine_with_pressure(max_waiting: int):
    engine = ExpertMeshEngine(
        "expertmesh-demo",
        load_model(DEMO_MODEL_DIR),
        Tokenizer.from_dir(DEMO_MODEL_DIR),
        SchedulerConfig(num_slots=2, max_waiting=max_waiting),
    )
    sink = ListSink()
    engine.kv_pressure = KvPressure(sink, engine.batcher, clear_after_s=0.3)
    return engine, sink


async def burst(engine, n: int) -> int:
    async def one(i: int) -> int:
        request = EngineRequest(
            f"r{i}", "expertmesh-demo", SamplingParams(max_tokens=8), prompt="ROMEO: " * 20
        )
        try:
            async for _ in engine.generate(request):
                pass
        except Overloaded:
            return 1
        return 0

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def test_refusals_are_detected_once_and_clear_when_the_queue_drains():
    engine, sink = engine_with_pressure(max_waiting=2)
    try:
        refused = asyncio.run(burst(engine, 12))
        assert refused > 0
        time.sleep(1.5)  # past the refusal window (1 s) and the clearing time
        engine.kv_pressure.check()
    finally:
        asyncio.run(engine.shutdown())
    assert [(e.kind, e.failure_mode, e.source) for e in sink.events] == [
        ("detected", KV_CACHE_EXHAUSTED, "serving.engine"),
        ("recovered", KV_CACHE_EXHAUSTED, "serving.engine"),
    ]


def test_load_within_capacity_reports_nothing():
    engine, sink = engine_with_pressure(max_waiting=32)
    try:
        assert asyncio.run(burst(engine, 4)) == 0
        engine.kv_pressure.check()
    finally:
        asyncio.run(engine.shutdown())
    assert sink.events == []
