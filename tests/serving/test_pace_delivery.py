"""`scheduler.pace_delivery_s`: after a step the engine thread waits until the event loop
handed that step's outputs to their streams (`_Outbox.settled`), so the HTTP path's per-token
work runs between forward passes; the streamed text is the same with and without the wait."""

from __future__ import annotations

import asyncio
import threading

import pytest

from expertmesh.models.generate import SamplingParams, StreamEvent
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.serving.config import SchedulerSpec
from expertmesh.serving.engine import EngineRequest
from expertmesh.serving.local_engine import ExpertMeshEngine, _Outbox
from expertmesh.serving.scheduler import SchedulerConfig, SchedulerEvent


def _event(text: str) -> SchedulerEvent:
    return SchedulerEvent(StreamEvent(0, 1, text, None), 1, 1)


def test_outbox_settles_after_the_woken_consumer_ran() -> None:
    async def main() -> tuple[bool, bool, list[str]]:
        loop = asyncio.get_running_loop()
        outbox = _Outbox(loop)
        queue: asyncio.Queue[SchedulerEvent] = asyncio.Queue()
        seen: list[str] = []

        async def consumer() -> None:
            item = await queue.get()
            assert item.event is not None
            seen.append(item.event.text)

        task = asyncio.create_task(consumer())
        await asyncio.sleep(0)  # the consumer waits on the queue
        thread = threading.Thread(target=outbox.put, args=(queue, _event("hi")))
        thread.start()
        thread.join()
        cleared = not outbox.settled.is_set()
        settled = await asyncio.to_thread(outbox.settled.wait, 5.0)
        await task
        return cleared, settled, seen

    cleared, settled, seen = asyncio.run(main())
    assert cleared  # a pending delivery clears it
    assert settled
    assert seen == ["hi"]  # the consumer had run by the time it was set


def test_engine_waits_for_delivery_only_when_pacing() -> None:
    paced = ExpertMeshEngine.load(
        "expertmesh-demo", DEMO_MODEL_DIR, SchedulerConfig(num_slots=2, pace_delivery_s=0.005)
    )
    unpaced = ExpertMeshEngine.load(
        "expertmesh-demo", DEMO_MODEL_DIR, SchedulerConfig(num_slots=2, pace_delivery_s=0.0)
    )
    try:
        assert paced.batcher.after_step_hook is not None
        assert unpaced.batcher.after_step_hook is None
        texts = []
        for engine in (paced, unpaced):
            request = EngineRequest(
                "r", "expertmesh-demo", SamplingParams(max_tokens=12), prompt="ROMEO:"
            )

            async def run(
                engine: ExpertMeshEngine = engine, request: EngineRequest = request
            ) -> str:
                return "".join([out.text async for out in engine.generate(request)])

            texts.append(asyncio.run(run()))
        assert texts[0] == texts[1] and texts[0]
    finally:
        asyncio.run(paced.shutdown())
        asyncio.run(unpaced.shutdown())


def test_negative_pace_is_refused() -> None:
    with pytest.raises(ValueError, match="pace_delivery_s"):
        SchedulerConfig(pace_delivery_s=-0.001)
    with pytest.raises(ValueError):
        SchedulerSpec(pace_delivery_s=-1)
