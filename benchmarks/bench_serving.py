"""Serving under concurrency: N streaming clients against OpenAI-compatible servers, all on one
checkpoint, in one run: ours against vLLM's OpenAI server (`vllm serve`, the baseline).

    .venv/bin/python benchmarks/bench_serving.py [--clients 1 8 32] [--requests-per-client 2]
        [--max-tokens 32] [--stream-interval 1 4] [--no-vllm] [--no-tracing]

Servers, each on `models/synthetic.py`'s QWEN3_MOE_70M (Qwen3-MoE, 61M parameters, the demo
tokenizer), fp32, greedy, 32 batch slots, `--threads` cores:

- **expertmesh**: `build_app` on Ray Serve (continuous batching, 32 slots, no selector policy:
  vLLM has none either), reached through Ray Serve's direct ingress (`--ingress direct`, the
  default: the replica serves HTTP itself, `serving.app.DIRECT_INGRESS_ENV`), plus one row
  through Serve's proxy actor to the same replica (`expertmesh via Serve proxy`, stream
  interval 1; `--ingress proxy` runs every row that way);
- **vLLM** (the baseline): vLLM's OpenAI server (`vllm serve`'s) from .venv-vllm (`make venv-vllm`), a subprocess,
  eager mode, prefix caching off (the clients cycle through 8 prompts, a hit rate no real
  traffic has; ours has no prefix cache), its worker bound to the same cores;
- **transformers one-at-a-time**: `transformers`' model behind a minimal FastAPI/uvicorn server
  that streams `generate` output and serves one request at a time (what a naive deployment
  does).

Each client sends its requests one after another with the `openai` async client, streaming;
measured per request: time to first token (TTFT) and time per output token after the first
(TPOT); per server and N: output tokens per second over the wall time. At each N the servers
take turns (expertmesh, vLLM, transformers); idle servers hold no work. Ratios are against vLLM
at the same N and stream interval (goal: >= 1.0x at N = 32) and against the one-at-a-time
server.

Stream interval (`--stream-interval`, tokens per SSE chunk after the first): each value runs
on ours (`scheduler.stream_interval`, a second Serve app) and on vLLM (`--stream-interval`, a
second server) alike; 1 streams every token (both servers' default). The client's work per
chunk falls with it too, so ours at k is compared with vLLM at k. Our rows also carry what our
engine did in that run (from GET /health: prefill and decode forward passes, the decode batch
it formed, forward time over wall time). The greedy
texts of the same prompt are compared across servers. The JSON goes to
benchmarks/results/bench_serving.json.

Threads: Ray sets OMP_NUM_THREADS=1 in a worker that has no CPUs assigned (our replica asks for
none); our engine thread sets torch's thread count itself (`scheduler.threads`, here
--threads; its default is every CPU the replica may use), so nothing is set before Ray
starts. vLLM gets VLLM_CPU_OMP_THREADS_BIND=0-<threads-1>.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

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
MODEL_NAME = "qwen3-moe-70m"
SLOTS = 32
VLLM_BIN = REPO_ROOT / ".venv-vllm" / "bin" / "python"
"""vLLM's OpenAI server is started as `python -m vllm.entrypoints.openai.api_server`, the
server `vllm serve` runs: vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments
(it asks importlib.metadata for the version of a distribution named `vllm`; this build's is
`vllm-cpu`)."""
LOG_DIR = REPO_ROOT / "benchmarks" / "out"
"""Where the vLLM server's log goes (ignored by git)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 300, proc: subprocess.Popen[Any] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


# --------------------------------------------------------------------------- servers


def transformers_server(checkpoint: Path, port: int) -> threading.Thread:
    """One-at-a-time transformers server: a lock around `generate` with a text streamer."""
    import json
    import queue

    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from expertmesh.models.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(checkpoint)
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
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]}

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


def vllm_server(
    checkpoint: Path, port: int, threads: int, log: IO[str], stream_interval: int = 1
) -> subprocess.Popen[Any]:
    """vLLM's OpenAI server on the checkpoint (from .venv-vllm), logging to `log`;
    `stream_interval`: its `--stream-interval` (tokens per streamed chunk, its default 1)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: 32 x 512 positions need ~0.5 GB
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    env.pop("OMP_NUM_THREADS", None)  # vLLM sets its worker's own from the binding
    command = [
        str(VLLM_BIN),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-num-seqs",
        str(SLOTS),
        "--max-model-len",
        "512",
        "--no-enable-prefix-caching",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        "--seed",
        "0",
        "--stream-interval",
        str(stream_interval),
    ]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- load generator


async def one_request(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    stamps = []
    tokens = 0
    prompt_tokens = 0
    pieces = []
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    headers = time.perf_counter()  # the response's headers are in (the stream is open)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            pieces.append(chunk.choices[0].text)
            stamps.append(now)
            if first is None:
                first = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
            prompt_tokens = chunk.usage.prompt_tokens
    end = stamps[-1] if stamps else time.perf_counter()
    ttft = (first or end) - t0
    tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else 0.0
    return {
        "headers_s": headers - t0,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "prompt": prompt,
        "text": "".join(pieces),
    }


async def load(
    url: str, model: str, clients: int, per_client: int, max_tokens: int
) -> dict[str, Any]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",  # no selector policy on any server
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=clients + 8), timeout=600
        ),
    )

    async def worker(i: int) -> list[dict[str, Any]]:
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
        "headers_p50_ms": pct([r["headers_s"] for r in results], 50) * 1e3,
        "headers_p99_ms": pct([r["headers_s"] for r in results], 99) * 1e3,
        "ttft_s": ttft,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "tpot_p50_ms": pct(tpot, 50) * 1e3 if tpot else 0.0,
        "tpot_p99_ms": pct(tpot, 99) * 1e3 if tpot else 0.0,
        "texts": {r["prompt"]: r["text"] for r in results},
        "prompt_tokens": {r["prompt"]: r["prompt_tokens"] for r in results},
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def same_texts(rows: list[dict[str, Any]], server: str, baseline: str) -> dict[str, Any]:
    """Prompts whose greedy text from `server` equals `baseline`'s, over every N."""
    ours: dict[str, str] = {}
    base: dict[str, str] = {}
    for r in rows:
        target = ours if r["server"] == server else base if r["server"] == baseline else None
        if target is not None:
            target.update(r["texts"])
    common = sorted(set(ours) & set(base))
    differ = [p for p in common if ours[p] != base[p]]
    return {"prompts": len(common), "identical": len(common) - len(differ), "differ": differ}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--stream-interval",
        type=int,
        nargs="+",
        default=[1, 4],
        help="tokens per streamed chunk, each value run on ours (scheduler.stream_interval) "
        "and vLLM (--stream-interval) alike; 1 = every token (vLLM's default)",
    )
    parser.add_argument(
        "--ingress",
        choices=["direct", "proxy"],
        default="direct",
        help="direct: Ray Serve's direct ingress (our replicas serve HTTP themselves; also one "
        "row through Serve's proxy to the same replica, stream interval 1); proxy: only "
        "through Serve's proxy actor (Serve's default)",
    )
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM (no .venv-vllm)")
    parser.add_argument("--no-tracing", action="store_true", help="skip the tracing-cost rows")
    parser.add_argument(
        "--quick", action="store_true", help="N = 1 and 8, 1 request each; *_quick.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client = [1, 8], 1
    if not args.no_vllm and not VLLM_BIN.exists():
        raise SystemExit(f"{VLLM_BIN} not found: run `make venv-vllm` first, or pass --no-vllm")
    console = make_console(150)

    import ray
    import torch
    from ray import serve

    from expertmesh.models.synthetic import QWEN3_MOE_70M, save_random_checkpoint
    from expertmesh.serving.app import DIRECT_INGRESS_ENV, build_app

    if args.ingress == "direct":  # read by Serve's controller and replicas: before Ray starts
        os.environ.update(DIRECT_INGRESS_ENV)

    torch.set_num_threads(args.threads)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp,
        (LOG_DIR / "bench_serving_vllm.log").open("w") as vllm_log,
    ):
        checkpoint = Path(tmp) / "qwen3-moe-70m"
        params = save_random_checkpoint("qwen3_moe", QWEN3_MOE_70M, checkpoint, seed=0)
        console.print(f"Qwen3-MoE: {params:,} parameters, fp32, {args.threads} threads")
        ours_port, base_port = free_port(), free_port()
        vllm_procs: dict[int, tuple[int, subprocess.Popen[Any]]] = {}
        if not args.no_vllm:  # they load while Ray starts
            for k in args.stream_interval:
                port = free_port()
                vllm_procs[k] = (port, vllm_server(checkpoint, port, args.threads, vllm_log, k))
            console.print(f"vLLM serve starting; its log: {vllm_log.name}")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": ours_port})
            common_config: dict[str, Any] = {
                "model": str(checkpoint),
                "model_name": MODEL_NAME,
                "policy": None,
                "scheduler": {"num_slots": SLOTS, "max_waiting": 512, "threads": args.threads},
                "request_timeout_s": 600,
            }
            for k in args.stream_interval:
                config = {**common_config}
                config["scheduler"] = {**common_config["scheduler"], "stream_interval": k}
                serve.run(build_app(config), name=f"expertmesh-s{k}", route_prefix=f"/s{k}")
            if not args.no_tracing:
                traced = {
                    **common_config,
                    "telemetry": {
                        "exporter": "jsonl",
                        "jsonl_path": str(Path(tmp) / "spans.jsonl"),
                        "metrics_exporter": "prometheus",
                    },
                }
                traced["scheduler"] = {
                    **common_config["scheduler"],
                    "stream_interval": args.stream_interval[0],
                }
                serve.run(build_app(traced), name="expertmesh-traced", route_prefix="/traced")
            proxy_url = f"http://127.0.0.1:{ours_port}"
            apps = [f"s{k}" for k in args.stream_interval]
            apps += [] if args.no_tracing else ["traced"]
            ours_urls = {app: app_url(app, proxy_url, args.ingress) for app in apps}
            transformers_server(checkpoint, base_port)
            servers: dict[str, str] = {}
            procs: dict[str, subprocess.Popen[Any]] = {}
            for k in args.stream_interval:
                servers[label("expertmesh", k)] = ours_urls[f"s{k}"]
                if k == 1 and args.ingress == "direct":  # the same replica through the proxy
                    servers[PROXY_ROW] = f"{proxy_url}/s{k}"
                if k in vllm_procs:
                    port, proc = vllm_procs[k]
                    servers[label("vLLM serve", k)] = f"http://127.0.0.1:{port}"
                    procs[label("vLLM serve", k)] = proc
            servers["transformers one-at-a-time"] = f"http://127.0.0.1:{base_port}"
            for name, url in servers.items():
                wait_ready(url, proc=procs.get(name))
            rows = measure(servers, args, console)
            overhead = [] if args.no_tracing else tracing_overhead(ours_urls, args, console)
        finally:
            serve.shutdown()
            ray.shutdown()
            for _, proc in vllm_procs.values():
                stop_process(proc)
    report(rows, overhead, args, params, console)


PROXY_ROW = "expertmesh via Serve proxy"
"""With --ingress direct: our stream-interval-1 replica reached through Serve's proxy actor
(Serve's default path), in the same run: the before/after of direct ingress."""


def app_url(key: str, proxy_url: str, ingress: str) -> str:
    """Where the client reaches our Serve app `expertmesh-<key>` (route prefix /<key>): its
    replica's own HTTP server under direct ingress, else Serve's proxy."""
    from expertmesh.serving.app import ingress_urls

    if ingress == "proxy":
        return f"{proxy_url}/{key}"
    urls = ingress_urls(f"expertmesh-{key}")
    if not urls:
        raise RuntimeError(f"direct ingress: no replica HTTP server for app expertmesh-{key}")
    return urls[0]


def engine_stats(url: str) -> dict[str, float]:
    """Our scheduler's cumulative counters (GET /health: steps, forwards, forward time)."""
    import httpx

    return dict(httpx.get(f"{url}/health", timeout=10).json()["stats"])


def engine_row(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    """What the engine did during one load run: steps, forwards, the decode batch it formed,
    and how much of the wall time went to forward passes and to whole steps."""
    d = {k: after[k] - before[k] for k in after}
    decode = max(1, int(d["decode_forwards"]))
    return {
        "steps": int(d["steps"]),
        "prefill_forwards": int(d["prefill_forwards"]),
        "decode_forwards": int(d["decode_forwards"]),
        "mean_decode_batch": d["decode_tokens"] / decode,
        "forward_s": d["forward_s"],
        "step_s": d["step_s"],
        "forward_share_of_wall": d["forward_s"] / wall_s,
        "step_share_of_wall": d["step_s"] / wall_s,
        "ms_per_forward": 1e3 * d["forward_s"] / max(1, decode + int(d["prefill_forwards"])),
        "ms_per_decode_forward": 1e3 * d.get("decode_forward_s", 0.0) / decode,
    }


def _busy_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def settle(max_wait_s: float = 8.0, busy_below: float = 0.15) -> tuple[float, float]:
    """Wait until the machine is idle (CPU busy < `busy_below` over 0.5 s), so a run does not
    start while the previous server still works (a server that keeps spinning after its run
    would slow the next one); (seconds waited, the last busy fraction)."""
    t0 = time.monotonic()
    while True:
        b0, a0 = _busy_ticks()
        time.sleep(0.5)
        b1, a1 = _busy_ticks()
        busy = (b1 - b0) / max(1, a1 - a0)
        if busy < busy_below or time.monotonic() - t0 > max_wait_s:
            return time.monotonic() - t0, busy


def label(server: str, stream_interval: int) -> str:
    """A server's row name: `server` at stream interval 1, else `server stream k`."""
    return server if stream_interval == 1 else f"{server} stream {stream_interval}"


def interval_of(name: str) -> int:
    """The stream interval of a row name made by `label` (the one-at-a-time server: 1)."""
    head, _, k = name.rpartition(" stream ")
    return int(k) if head and k.isdigit() else 1


def measure(
    servers: dict[str, str], args: argparse.Namespace, console: Any
) -> list[dict[str, Any]]:
    """Rows of (server, N) results; at each N the servers take turns. Our rows carry what the
    engine did (`engine`: steps, forwards, decode batch, forward time over wall time)."""
    for url in servers.values():  # warm-up (first-call costs are not what we measure)
        asyncio.run(load(url, MODEL_NAME, 2, 1, 4))
    rows: list[dict[str, Any]] = []
    for n in args.clients:
        for name, url in servers.items():
            console.print(f"N={n}: {name}...", end=" ")
            ours = name.startswith("expertmesh")
            waited, busy = settle()
            before = engine_stats(url) if ours else None
            r = asyncio.run(load(url, MODEL_NAME, n, args.requests_per_client, args.max_tokens))
            row = {"server": name, "clients": n, "load_average": os.getloadavg()[0], **r}
            row["settle"] = {"waited_s": waited, "cpu_busy_at_start": busy}
            if before is not None:
                row["engine"] = engine_row(before, engine_stats(url), r["wall_s"])
            console.print(
                f"{r['tokens_per_s']:.0f} tok/s (waited {waited:.1f} s for an idle machine, "
                f"CPU {busy:.0%} busy at start)"
            )
            rows.append(row)
    return rows


def report(
    rows: list[dict[str, Any]],
    overhead: list[dict[str, Any]],
    args: argparse.Namespace,
    params: int,
    console: Any,
) -> None:
    by = {(r["server"], r["clients"]): r for r in rows}
    for r in rows:
        n = r["clients"]
        r["stream_interval"] = interval_of(r["server"])
        vllm = by.get((label("vLLM serve", r["stream_interval"]), n))  # same interval
        r["ratio_vs_vllm"] = r["tokens_per_s"] / vllm["tokens_per_s"] if vllm else None
        vllm1 = by.get(("vLLM serve", n))  # vLLM as it ships (every token streamed)
        r["ratio_vs_vllm_stream_1"] = r["tokens_per_s"] / vllm1["tokens_per_s"] if vllm1 else None
        base = by[("transformers one-at-a-time", n)]
        r["ratio_vs_one_at_a_time"] = r["tokens_per_s"] / base["tokens_per_s"]
    print_table(
        f"Streaming clients, Qwen3-MoE 61M fp32, {args.requests_per_client} requests per client, "
        f"max_tokens {args.max_tokens} (ratios: tokens/s over vLLM at the same stream interval "
        "/ over one-at-a-time, same N; engine: our scheduler's forward passes (prefill + "
        "decode), mean decode batch, forward time over wall time)",
        [
            "server",
            "N",
            "tokens/s",
            "vs vLLM",
            "vs one-at-a-time",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TPOT p50 ms",
            "TPOT p99 ms",
            "requests",
            "engine",
        ],
        [
            [
                r["server"],
                r["clients"],
                r["tokens_per_s"],
                f"{r['ratio_vs_vllm']:.2f}x" if r["ratio_vs_vllm"] else "-",
                f"{r['ratio_vs_one_at_a_time']:.2f}x",
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
                r["tpot_p50_ms"],
                r["tpot_p99_ms"],
                r["requests"],
                engine_cell(r.get("engine")),
            ]
            for r in rows
        ],
        console,
    )
    has_vllm = any(r["server"].startswith("vLLM serve") for r in rows)
    texts: dict[str, Any] = {}
    for k in args.stream_interval:
        ours, suffix = label("expertmesh", k), "" if k == 1 else f"_stream_{k}"
        peer = label("vLLM serve", k)
        texts[f"expertmesh_vs_vllm{suffix}"] = same_texts(rows, ours, peer) if has_vllm else None
        texts[f"expertmesh_vs_transformers{suffix}"] = same_texts(
            rows, ours, "transformers one-at-a-time"
        )
    if any(r["server"] == PROXY_ROW for r in rows):
        texts["expertmesh_via_proxy_vs_direct"] = same_texts(rows, PROXY_ROW, "expertmesh")
    for name, t in texts.items():
        if t is not None:
            console.print(f"greedy text {name}: {t['identical']}/{t['prompts']} prompts identical")
    goals: dict[str, bool | None] = {}
    for k in args.stream_interval:
        at32 = by.get((label("expertmesh", k), 32))
        suffix = "" if k == 1 else f"_stream_{k}"
        goals[f"vs_vllm_at_32_ge_1{suffix}"] = (
            None if at32 is None or at32["ratio_vs_vllm"] is None else at32["ratio_vs_vllm"] >= 1.0
        )
        goals[f"vs_one_at_a_time_at_32_ge_3{suffix}"] = (
            None if at32 is None else at32["ratio_vs_one_at_a_time"] >= 3.0
        )
    console.print(f"goals: {goals}")
    import expertmesh

    path = write_result(
        "bench_serving_quick" if args.quick else "bench_serving",
        {
            "model": {"family": "qwen3_moe", "param_count": params, "dtype": "float32"},
            "settings": {
                "clients": args.clients,
                "requests_per_client": args.requests_per_client,
                "max_tokens": args.max_tokens,
                "threads": args.threads,
                "slots": SLOTS,
                "stream_intervals": args.stream_interval,
                "expertmesh_imported_from": str(Path(expertmesh.__file__).parent),
                "ingress": args.ingress,
                "vllm": "not run (--no-vllm)"
                if not has_vllm
                else "vllm serve, enforce_eager, prefix caching off, max_model_len 512",
            },
            "rows": rows,
            "greedy_text": texts,
            "goals": goals,
            "tracing_overhead": overhead,
        },
        baseline="vLLM's OpenAI server (`vllm serve`, vllm-cpu) on the same checkpoint and "
        "cores, driven by the same client code, its runs taking turns with ours in this run"
        if has_vllm
        else "transformers one-at-a-time server (vLLM not run: --no-vllm)",
    )
    console.print(f"wrote {path}")


def engine_cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return "-"
    return (
        f"{e['prefill_forwards']}+{e['decode_forwards']} fw, batch {e['mean_decode_batch']:.1f}, "
        f"{e['ms_per_forward']:.0f} ms/fw ({e['ms_per_decode_forward']:.0f} decode), "
        f"{e['forward_share_of_wall']:.0%} of wall"
    )


def tracing_overhead(
    urls: dict[str, str], args: argparse.Namespace, console: Any
) -> list[dict[str, Any]]:
    """Throughput with every request traced (JSONL spans: HTTP, engine request and steps) vs
    tracing off, same engine settings, runs interleaved off/on/off/on."""
    rows = []
    for n in [c for c in args.clients if c > 1]:
        runs: dict[str, list[float]] = {"off": [], "on": []}
        off_url = urls[f"s{args.stream_interval[0]}"]
        for _ in range(2):
            for mode, base in (("off", off_url), ("on", urls["traced"])):
                r = asyncio.run(
                    load(base, MODEL_NAME, n, args.requests_per_client, args.max_tokens)
                )
                runs[mode].append(r["tokens_per_s"])
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


if __name__ == "__main__":
    main()
