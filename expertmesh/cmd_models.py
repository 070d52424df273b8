"""`expertmesh generate` and `expertmesh inspect`: the model core from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.config import KV_MODES
from expertmesh.models.generate import Generator, SamplingParams, StreamEvent
from expertmesh.models.model import MoEModel
from expertmesh.models.paths import resolve_model
from expertmesh.models.router_stats import RouterStats
from expertmesh.models.summary import summarize
from expertmesh.models.tokenizer import Tokenizer


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a checkpoint on this machine")
    p.add_argument("prompt", help="prompt text (with --chat: the user message)")
    p.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (default)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--kv-cache", choices=KV_MODES, default=None, help="default: latent for MLA, else full"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens"
    )
    p.add_argument("--trace-jsonl", type=Path, default=None, help="write OpenTelemetry spans here")
    p.add_argument(
        "--record-trace",
        type=Path,
        default=None,
        help="write the routing trace (tokens per expert) here",
    )
    p.add_argument(
        "--cluster",
        type=Path,
        default=None,
        metavar="TOPOLOGY",
        help="run the experts on an embedded expert-parallel cluster for this topology YAML",
    )
    p.set_defaults(func=run_generate)


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="parameters and KV-cache bytes per token of a checkpoint")
    p.add_argument("model", help="checkpoint directory, or 'demo'")
    p.add_argument(
        "--kv-dtype-bytes",
        type=int,
        choices=[1, 2, 4],
        default=2,
        help="element size of a full-precision cache (2 = bf16)",
    )
    p.set_defaults(func=run_inspect)


def run_generate(args: argparse.Namespace) -> int:
    path = resolve_model(args.model)
    config = read_config(path)  # a missing or bad checkpoint is reported first
    if args.kv_cache is not None:  # refuse a bad option before spending time on weights
        config.check_kv_mode(args.kv_cache)
    tokenizer = Tokenizer.from_dir(path)
    if args.cluster is not None:
        from expertmesh.cluster.runtime import ExpertParallelModel
        from expertmesh.cluster.topology import load_topology

        with ExpertParallelModel.launch(path, load_topology(args.cluster), dtype=args.dtype) as ep:
            return _generate(args, ep.model, tokenizer)
    return _generate(args, load_model(path, dtype=args.dtype), tokenizer)


def _generate(args: argparse.Namespace, model: MoEModel, tokenizer: Tokenizer) -> int:
    telemetry = None
    tracer = None
    if args.trace_jsonl is not None:
        from expertmesh.observability import TelemetryConfig, configure_telemetry

        telemetry = configure_telemetry(
            TelemetryConfig(exporter="jsonl", jsonl_path=args.trace_jsonl)
        )
        tracer = telemetry.tracer
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    stats = RouterStats(model.config) if args.record_trace else None
    gen = Generator(model, tokenizer, kv_mode=args.kv_cache, tracer=tracer, router_stats=stats)

    def show(event: StreamEvent) -> None:
        sys.stdout.write(event.text)
        sys.stdout.flush()

    if not args.chat:
        sys.stdout.write(args.prompt)
    start = time.perf_counter()
    [completion] = gen.generate([prompt], params, on_token=show)
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    n = len(completion.token_ids)
    Console(stderr=True).print(
        f"[dim]{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s), finish_reason={completion.finish_reason}, "
        f"kv cache={gen.kv_mode}[/dim]"
    )
    if telemetry is not None:
        telemetry.shutdown()
    if stats is not None:
        args.record_trace.write_text(json.dumps(stats.to_dict()))
    return 0


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run_inspect(args: argparse.Namespace) -> int:
    path = resolve_model(args.model)
    config = read_config(path)
    s = summarize(config, dtype_bytes=args.kv_dtype_bytes)
    console = Console()
    head = Table(title=f"{path} ({s.model_type})", show_header=False)
    head.add_row("layers (MoE)", f"{s.layers} ({s.moe_layers})")
    head.add_row("routed experts / per token", f"{s.experts} / {s.experts_per_token}")
    head.add_row("total parameters", f"{_fmt(s.total_params)} ({s.total_params:,})")
    head.add_row("active parameters per token", f"{_fmt(s.active_params)} ({s.active_params:,})")
    head.add_row("attention", config.attention.kind.upper())
    console.print(head)
    kv = Table(title=f"KV cache per token (full precision = {s.dtype_bytes}-byte elements)")
    for col in ("mode", "bytes/token", "reduction vs full MHA cache"):
        kv.add_column(col, justify="right" if col != "mode" else "left")
    for m in s.kv:
        kv.add_row(m.mode, f"{m.bytes_per_token:,}", f"{m.reduction_vs_mha:.1%}")
    console.print(kv)
    return 0
