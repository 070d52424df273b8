"""Serving under concurrency: N streaming clients against the OpenAI API on the demo model.

    .venv/bin/python benchmarks/bench_serving.py [--clients 1 8 32] [--requests-per-client 2]
        [--max-tokens 32] [--out benchmarks/out/bench_serving.json]

Servers, all in this run, each on the bundled demo checkpoint, greedy:

- **expertmesh**: `build_app` on Ray Serve (continuous batching, 32 slots);
- **transformers one-at-a-time** (the baseline): `transformers`' model for the same checkpoint
  behind a minimal FastAPI/uvicorn server that streams `generate` output and serves one
  request at a time (what a naive deployment does);
- **vLLM** OpenAI server on the same checkpoint, where a CPU build of vLLM is installed
  (reported as not run otherwise).

Each client sends its requests one after another with the `openai` async client, streaming;
measured per request: time to first token (TTFT) and time per output token after the first
(TPOT); per server and N: output tokens per second over the wall time. Ratios are against the
baseline at the same N. Goal: >= 3x the one-at-a-time baseline at N = 32.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_console, print_table, write_json
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from expertmesh.models.paths import DEMO_MODEL_DIR

PROMPTS = [
    "ROMEO:",
    "JULIET: O Romeo, Romeo!",
    "To be, or not to be",
    "Now is the winter of our discontent",
    "HAMLET:",
    "Friends, Romans, countrymen, lend me your ears",
    "All the world's a stage",
    "KING LEAR: Blow, winds",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


# --------------------------------------------------------------------------- baseline server


def transformers_server(port: int) -> threading.Thread:
    """One-at-a-time transformers server: a lock around `generate` with a text streamer."""
    import json
    import queue

    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from expertmesh.models.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    lock = threading.Lock()
    app = FastAPI()

    class _Streamer(BaseStreamer):  # token ids out as generate produces them
        def __init__(self) -> None:
            self.queue: queue.Queue[int | None] = queue.Queue()
            self.first = True

        def put(self, value: Any) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.queue.put(int(value.reshape(-1)[0]))

        def end(self) -> None:
            self.queue.put(None)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "demo", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = torch.tensor([tok.encode(body["prompt"], add_special_tokens=True)])
        streamer = _Streamer()

        def run() -> None:
            with lock, torch.inference_mode():
                model.generate(
                    ids,
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=0,
                )

        async def events() -> Any:
            thread = threading.Thread(target=run)
            thread.start()
            loop = asyncio.get_running_loop()
            n = 0
            while True:
                token = await loop.run_in_executor(None, streamer.queue.get)
                if token is None:
                    break
                n += 1
                chunk = {
                    "choices": [{"index": 0, "text": tok.decode([token]), "finish_reason": None}]
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {
                "prompt_tokens": int(ids.shape[1]),
                "completion_tokens": n,
                "total_tokens": n + int(ids.shape[1]),
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- load generator


async def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    first = None
    stamps = []
    tokens = 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            stamps.append(now)
            if first is None:
                first = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = stamps[-1] if stamps else time.perf_counter()
    ttft = (first or end) - t0
    tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else 0.0
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens}


async def load(
    url: str, model: str, clients: int, per_client: int, max_tokens: int
) -> dict[str, Any]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="sk-expertmesh-dev",  # the default policy's dev key
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=clients + 8), timeout=600
        ),
    )

    async def worker(i: int) -> list[dict[str, float]]:
        out = []
        for j in range(per_client):
            out.append(
                await one_request(client, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
            )
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - t0
    await client.close()
    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] for r in results if r["tpot_s"] > 0]
    return {
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "tpot_p50_ms": pct(tpot, 50) * 1e3 if tpot else 0.0,
        "tpot_p99_ms": pct(tpot, 99) * 1e3 if tpot else 0.0,
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_serving.json"))
    args = parser.parse_args()
    console = make_console(150)

    import ray
    from ray import serve

    from expertmesh.serving.app import build_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ours_port, base_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": ours_port})
    serve.run(
        build_app({"scheduler": {"num_slots": 32, "max_waiting": 512}, "request_timeout_s": 600}),
        name="expertmesh",
        route_prefix="/",
    )
    spans = args.out.with_name("bench_serving_spans.jsonl")
    spans.unlink(missing_ok=True)
    serve.run(
        build_app(
            {
                "scheduler": {"num_slots": 32, "max_waiting": 512},
                "request_timeout_s": 600,
                "telemetry": {
                    "exporter": "jsonl",
                    "jsonl_path": str(spans.resolve()),
                    "metrics_exporter": "prometheus",
                },
            }
        ),
        name="expertmesh-traced",
        route_prefix="/traced",
    )
    ours_url, base_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{base_port}"
    transformers_server(base_port)
    wait_ready(ours_url)
    wait_ready(base_url)
    servers = {
        "expertmesh": (ours_url, "expertmesh-demo"),
        "transformers one-at-a-time": (base_url, "demo"),
    }

    # Warm-up both (first-call costs are not what we measure).
    for url, model in servers.values():
        asyncio.run(load(url, model, 2, 1, 4))

    rows: list[dict[str, Any]] = []
    for n in args.clients:
        for name, (url, model) in servers.items():
            console.print(f"N={n}: {name}...")
            r = asyncio.run(load(url, model, n, args.requests_per_client, args.max_tokens))
            rows.append({"server": name, "clients": n, **r})
    base = {r["clients"]: r for r in rows if r["server"].startswith("transformers")}
    for r in rows:
        r["throughput_ratio_vs_baseline"] = r["tokens_per_s"] / base[r["clients"]]["tokens_per_s"]
    vllm_note = vllm_status()
    print_table(
        f"Streaming clients on the demo model, {args.requests_per_client} requests per client, "
        f"max_tokens {args.max_tokens} (ratio = tokens/s over the one-at-a-time baseline, same N)",
        [
            "server",
            "N",
            "tokens/s",
            "ratio",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TPOT p50 ms",
            "TPOT p99 ms",
            "requests",
        ],
        [
            [
                r["server"],
                r["clients"],
                r["tokens_per_s"],
                r["throughput_ratio_vs_baseline"],
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
                r["tpot_p50_ms"],
                r["tpot_p99_ms"],
                r["requests"],
            ]
            for r in rows
        ],
        console,
    )
    overhead = tracing_overhead(ours_url, args, console)
    at32 = [r for r in rows if r["server"] == "expertmesh" and r["clients"] == 32]
    goal = bool(at32) and at32[0]["throughput_ratio_vs_baseline"] >= 3.0
    console.print(f"vLLM: {vllm_note}", markup=False)
    console.print(f"goal >= 3x baseline at N=32: {'met' if goal else 'NOT met'}")
    path = write_json(
        args.out,
        {
            "rows": rows,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "vllm": vllm_note,
            "goal_3x_at_32": goal,
            "tracing_overhead": overhead,
        },
    )
    console.print(f"wrote {path}")
    serve.shutdown()
    ray.shutdown()


def tracing_overhead(url: str, args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    """Throughput with every request traced (JSONL spans: HTTP, selector, engine request and
    steps) vs tracing off, same engine settings, runs interleaved off/on/off/on."""
    rows = []
    for n in [c for c in args.clients if c > 1]:
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(2):
            for label, base in (("off", url), ("on", f"{url}/traced")):
                r = asyncio.run(
                    load(base, "expertmesh-demo", n, args.requests_per_client, args.max_tokens)
                )
                runs[label].append(r["tokens_per_s"])
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        rows.append(
            {"clients": n, "off_tokens_per_s": off, "on_tokens_per_s": on, "cost": 1 - on / off}
        )
    print_table(
        "Tracing every request: throughput on vs off (goal: cost <= 5%)",
        ["N", "tracing off tok/s", "tracing on tok/s", "cost"],
        [
            [r["clients"], r["off_tokens_per_s"], r["on_tokens_per_s"], f"{r['cost']:.1%}"]
            for r in rows
        ],
        console,
    )
    return rows


def vllm_status() -> str:
    from expertmesh.serving.vllm_engine import vllm_available

    why = vllm_available()
    return (
        "not run: " + why
        if why
        else "installed, but its OpenAI server is not run by this benchmark yet"
    )


if __name__ == "__main__":
    main()
