"""`VLLMEngine` against real vLLM (marker `vllm`; `make test-vllm` builds .venv-vllm and runs
these): a Qwen3-MoE checkpoint with the demo tokenizer loads; plain and streaming chat go
through our OpenAI API (uvicorn, the official `openai` client) with vLLM behind it and give the
same greedy text as our own engine on the same files; a closed stream aborts vLLM's request;
vLLM's errors answer as ours. Without vLLM (the main venv) every test skips, naming what is
missing."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from expertmesh.serving.vllm_engine import vllm_available

T = TypeVar("T")
_MISSING = vllm_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING)),
    pytest.mark.timeout(600),
]
MODEL = "tiny-qwen3-moe"
WINDOW = 512
CHAT = [{"role": "user", "content": "Speak of the moon."}]


class Served:
    """vLLM behind `make_api` on a uvicorn server in a thread, with that thread's loop (the
    vLLM engine lives on it: direct engine calls go through `call`)."""

    def __init__(self, engine: Any) -> None:
        import socket

        import uvicorn

        from expertmesh.serving.api import make_api

        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(
            make_api(engine), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from expertmesh.models.synthetic import QWEN3_MOE_TINY, save_random_checkpoint

    path = tmp_path_factory.mktemp("vllm-qwen3-moe")
    save_random_checkpoint("qwen3_moe", QWEN3_MOE_TINY, path, seed=0, std=0.1)
    return path


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes 4
    from expertmesh.serving.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(
        MODEL,
        str(checkpoint),
        dtype="float32",
        enforce_eager=True,
        max_model_len=WINDOW,
        max_num_seqs=8,
    )
    served = Served(engine)
    yield served
    served.stop()
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def ours(checkpoint: Path) -> Iterator[Any]:
    """Our engine on the same files: the reference greedy text."""
    from expertmesh.serving.local_engine import ExpertMeshEngine

    engine = ExpertMeshEngine.load("ours", checkpoint)
    yield engine
    asyncio.run(engine.shutdown())


def our_reply(engine: Any, max_tokens: int) -> tuple[str, int, str]:
    """(text, prompt tokens, finish reason) of our engine's greedy reply to CHAT."""
    from expertmesh.models.generate import SamplingParams
    from expertmesh.serving.engine import EngineRequest, Message

    request = EngineRequest(
        "ref",
        "ours",
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=tuple(Message(m["role"], m["content"]) for m in CHAT),
    )

    async def run() -> tuple[str, int, str]:
        outs = [o async for o in engine.generate(request)]
        return "".join(o.text for o in outs), outs[-1].prompt_tokens, str(outs[-1].finish_reason)

    return asyncio.run(run())


def test_vllm_loads_the_checkpoint_and_our_api_lists_it(served: Served) -> None:
    models = served.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "vllm"
    assert models[0].model_extra["context_window"] == WINDOW
    assert served.engine.health().healthy


def test_plain_chat_is_the_same_greedy_text_as_our_engine(served: Served, ours: Any) -> None:
    reply = served.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0
    )
    text, prompt_tokens, finish = our_reply(ours, 24)
    assert reply.choices[0].message.content == text
    assert len(text) > 0
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.choices[0].finish_reason == finish


def test_streamed_chat_pieces_join_to_the_plain_reply(served: Served) -> None:
    client = served.client()
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True
    )
    pieces, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert sum(1 for p in pieces if p) > 1  # streamed, not one piece
    assert "".join(pieces) == plain.choices[0].message.content
    assert reasons[-1] == plain.choices[0].finish_reason


def test_closing_a_stream_aborts_the_request_in_vllm(served: Served) -> None:
    client = served.client()
    vllm = served.engine.engine
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=WINDOW - 32, temperature=0, stream=True
    )
    got = 0
    for chunk in stream:
        got += sum(1 for c in chunk.choices if c.delta.content)
        if got >= 2:
            break
    assert vllm.get_num_unfinished_requests() == 1  # still generating when we hang up
    stream.close()
    deadline = time.monotonic() + 20
    while vllm.get_num_unfinished_requests() or served.engine.running:
        assert time.monotonic() < deadline, "vLLM still holds the abandoned request"
        time.sleep(0.1)
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert again.choices[0].finish_reason in ("length", "stop")  # the slot is free again


def test_closing_the_engine_stream_aborts_at_once(served: Served) -> None:
    from expertmesh.models.generate import SamplingParams
    from expertmesh.serving.engine import EngineRequest

    params = SamplingParams(max_tokens=WINDOW - 32, ignore_eos=True)
    request = EngineRequest("cancel-1", MODEL, params, prompt="ROMEO:")
    vllm = served.engine.engine

    async def run() -> tuple[int, int]:
        stream = served.engine.generate(request)
        for _ in range(2):
            await anext(stream)
        before = vllm.get_num_unfinished_requests()
        await stream.aclose()
        return before, vllm.get_num_unfinished_requests()

    assert served.call(run()) == (1, 0)


def test_vllm_rejections_answer_as_our_errors(served: Served) -> None:
    import openai

    client = served.client()
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="moon " * (2 * WINDOW), max_tokens=4)
    assert too_long.value.status_code == 400
    assert too_long.value.body["type"] == "invalid_request_error"
    assert f"maximum context length is {WINDOW}" in too_long.value.body["message"]  # vLLM's
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=4)
    assert MODEL in unknown.value.body["message"]


def test_counted_prompt_tokens_are_what_vllm_reports(served: Served) -> None:
    from expertmesh.models.generate import SamplingParams
    from expertmesh.serving.engine import EngineRequest

    request = EngineRequest("count-1", MODEL, SamplingParams(max_tokens=2), prompt="ROMEO: hark")

    async def run() -> int:
        return [o async for o in served.engine.generate(request)][-1].prompt_tokens

    assert served.engine.count_prompt_tokens(request) == served.call(run())


def test_a_dead_engine_core_is_engine_dead_and_fails_health(served: Served) -> None:
    """Last in this module: it kills the shared engine's core process."""
    import openai
    import psutil

    cores = [
        p
        for p in psutil.Process().children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
    ]
    assert cores, "no vLLM engine core process found"
    for p in cores:
        os.kill(p.pid, signal.SIGKILL)
    client = served.client()
    deadline = time.monotonic() + 30
    while True:
        try:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        except openai.APIStatusError as e:
            assert e.status_code == 503
            assert e.body["type"] == "server_error"
            break
        assert time.monotonic() < deadline, "requests still served after the core was killed"
        time.sleep(0.2)
    health = served.engine.health()
    assert not health.healthy
