"""Long context on a DeepSeek-shaped model with YaRN: peak RSS and time per generated token
against context length, our engine (chunked prefill, latent MLA cache) vs `transformers`.

    .venv/bin/python benchmarks/bench_long_context.py [--quick] [--contexts 8192 32768 131072]
        [--transformers-max 8192] [--new-tokens 48]

The model is DeepSeek-V3's published config.json (YaRN factor 40 over 4,096 original
positions, sigmoid router, noaux_tc, q LoRA) with the widths scaled down so a 128k prefill
fits the 2-core build machine: hidden 128, 2 layers (1 dense, 1 MoE), 4 heads, latent 32 +
rope 16 values per token and layer against 4 x (80 + 64) for the MHA-equivalent cache. Random
weights (seeded), saved once as a checkpoint both engines load.

Each (engine, context) runs in its own process, so its peak RSS (VmHWM) is its own: a
random prompt of `context` tokens, prefilled (ours: chunks of 512 through the latent cache;
transformers: one forward, as `generate` does), then `--new-tokens` greedy tokens, each step
timed (wall and process CPU time: the build machine is shared, and CPU time is what other
processes disturb least). Baseline: transformers on the same checkpoint, same run, same threads, at the contexts
up to `--transformers-max` (8k: its MLA attention has q/k head dim 80 and v head dim 64, so
PyTorch runs the math kernel over the whole prompt at once, h x L x L fp32 scores: 3.1 GB
peak RSS at 8k; at 32k the scores alone are 4 x 32k^2 x 4 B = 17 GB, more than the shared
machine has). Cache bytes: ours from the cache's tensors; the MHA-equivalent cache (our
`full` mode: per-head K and V) from the shapes; transformers' own from its cache object
(transformers 5.25 caches DeepSeek's latent too: the same size as ours).
Results: benchmarks/results/bench_long_context.json.

`--same-process` runs all of our contexts in one process instead (its peak RSS is then that of
all of them together): each context prefilled (chunked, latent cache; beyond `--prefill-max`
tiled as in `run_ours_tiled`; `--also-tiled` adds a tiled copy of each context prefilled for
real beyond `--tile-prefill`), then the decode steps go round-robin, one step of every context
per round, so a change in machine load hits every context alike and the ratio between
contexts does not depend on when each process ran. Each of our rows records how many decode
steps the compiled latent kernel ran (`latent_kernel_calls`, one per MLA layer and step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result

CONFIG: dict[str, Any] = {
    # deepseek-ai/DeepSeek-V3 config.json, every maths field as published; widths scaled down
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "first_k_dense_replace": 1,  # 3 of 61
    "hidden_act": "silu",
    "hidden_size": 128,  # 7168
    "intermediate_size": 256,  # 18432
    "kv_lora_rank": 32,  # 512
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 64,  # 2048
    "moe_layer_freq": 1,
    "n_group": 4,  # 8
    "n_routed_experts": 16,  # 256
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,  # 128
    "num_experts_per_tok": 4,  # 8
    "num_hidden_layers": 2,  # 61
    "num_key_value_heads": 4,
    "q_lora_rank": 64,  # 1536
    "qk_nope_head_dim": 64,  # 128
    "qk_rope_head_dim": 16,  # 64
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 2,  # 4
    "topk_method": "noaux_tc",
    "v_head_dim": 64,  # 128
    "vocab_size": 4096,  # 129280
    "bos_token_id": 0,
    "eos_token_id": 1,
}
CHUNK = 512


def build_checkpoint(path: Path) -> None:
    from expertmesh.models.adapters import adapter_for
    from expertmesh.models.checkpoint import save_model
    from expertmesh.models.model import MoEModel, init_random

    cfg = adapter_for(CONFIG).parse_config(CONFIG)
    save_model(init_random(MoEModel(cfg), seed=0, std=0.05), path)


def _prompt(context: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(context)
    return torch.randint(2, vocab, (context,), generator=gen).tolist()


def _rss_mib() -> float:
    # VmHWM, the process's own peak: ru_maxrss would report the parent's peak when it is
    # larger, as the child inherits it across the vfork + exec that started it.
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024  # kB


def run_ours_tiled(path: Path, context: int, new_tokens: int, prefilled: int) -> dict[str, Any]:
    """Decode at `context` without its O(L^2) prefill: prefill the first `prefilled` tokens for
    real (chunked, latent cache), then fill positions up to `context` with copies of those
    cache entries. Each decode step then reads and attends over `context` real-sized entries,
    so time per token and cache memory are those of that context; the tokens are not."""
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.kv_cache import KVCache, kv_bytes_per_token

    model = load_model(path)
    prompt = torch.tensor([_prompt(prefilled, model.config.vocab_size)])
    loaded = _rss_mib()
    cache = KVCache(model.config, "latent", 1, context + new_tokens)
    steps: list[float] = []
    cpu_steps: list[float] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for start in range(0, prefilled, CHUNK):
            logits = model(prompt[:, start : start + CHUNK], cache, None, "last")
        partial_prefill_s = time.perf_counter() - t0
        _fill_with_copies(cache, prefilled, context)
        tokens = [int(logits[0, -1].argmax())]
        for _ in range(new_tokens - 1):
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(torch.tensor([[tokens[-1]]]), cache, None, "last")
            tokens.append(int(logits[0, -1].argmax()))
            steps.append(time.perf_counter() - t0)
            cpu_steps.append(time.process_time() - c0)
    return {
        "prefill_s": None,
        "prefilled_tokens": prefilled,
        "partial_prefill_s": partial_prefill_s,
        "per_token_s": statistics.median(steps),
        "per_token_cpu_s": statistics.median(cpu_steps),
        "decode_s": sum(steps),
        "tokens": tokens,
        "rss_loaded_mib": loaded,
        "peak_rss_mib": _rss_mib(),
        "cache_bytes": cache.nbytes,
        "mha_cache_bytes": kv_bytes_per_token(model.config, "full", 4) * (context + new_tokens),
    }


def _fill_with_copies(cache: Any, prefilled: int, context: int) -> None:
    """Positions prefilled..context-1 of row 0 of every layer: copies of the first entries."""
    for layer in cache.layers:
        for store in (layer.first, layer.second):
            done = prefilled
            while done < context:
                n = min(prefilled, context - done)
                store.data[0, done : done + n] = store.data[0, :n]
                done += n
    cache.lengths[0] = context


def run_ours_same_process(
    path: Path, plan: list[tuple[int, int]], new_tokens: int
) -> list[dict[str, Any]]:
    """(context, tokens prefilled for real) pairs, each prefilled into its own latent cache
    (the rest of a context filled with copies, as run_ours_tiled), then `new_tokens` greedy
    decode steps round-robin: step i of every cache before step i + 1 of any."""
    from expertmesh.models import latent_kernel
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.kv_cache import KVCache, kv_bytes_per_token

    model = load_model(path)
    calls = [0]
    kernel = latent_kernel.latent_decode

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return kernel(*args)

    latent_kernel.latent_decode = counted  # attention dispatches through the module attribute
    loaded = _rss_mib()
    rows: list[dict[str, Any]] = []
    states: list[tuple[Any, list[int]]] = []
    with torch.inference_mode():
        for context, prefilled in plan:
            prompt = torch.tensor([_prompt(prefilled, model.config.vocab_size)])
            cache = KVCache(model.config, "latent", 1, context + new_tokens)
            t0 = time.perf_counter()
            for start in range(0, prefilled, CHUNK):
                logits = model(prompt[:, start : start + CHUNK], cache, None, "last")
            prefill_s = time.perf_counter() - t0
            if prefilled < context:
                _fill_with_copies(cache, prefilled, context)
            states.append((cache, [int(logits[0, -1].argmax())]))
            rows.append(
                {
                    "context": context,
                    "prefill_s": prefill_s if prefilled == context else None,
                    "prefilled_tokens": prefilled if prefilled < context else None,
                    "partial_prefill_s": prefill_s if prefilled < context else None,
                    "steps_s": [],
                    "steps_cpu_s": [],
                    "latent_kernel_calls": 0,
                    "cache_bytes": cache.nbytes,
                    "mha_cache_bytes": kv_bytes_per_token(model.config, "full", 4)
                    * (context + new_tokens),
                }
            )
            print(f"prefilled {context} ({prefilled} for real) in {prefill_s:.1f} s", flush=True)
        for _ in range(new_tokens - 1):
            for row, (cache, tokens) in zip(rows, states):
                before = calls[0]
                t0, c0 = time.perf_counter(), time.process_time()
                logits = model(torch.tensor([[tokens[-1]]]), cache, None, "last")
                tokens.append(int(logits[0, -1].argmax()))
                row["steps_s"].append(time.perf_counter() - t0)
                row["steps_cpu_s"].append(time.process_time() - c0)
                row["latent_kernel_calls"] += calls[0] - before
    peak = _rss_mib()
    for row, (_, tokens) in zip(rows, states):
        row.update(
            {
                "per_token_s": statistics.median(row["steps_s"]),
                "per_token_cpu_s": statistics.median(row["steps_cpu_s"]),
                "decode_s": sum(row["steps_s"]),
                "decode_steps": len(row["steps_s"]),
                "tokens": tokens,
                "rss_loaded_mib": loaded,
                "peak_rss_mib": peak,
                "peak_rss_scope": "the one process of every context",
            }
        )
    return rows


def run_ours(path: Path, context: int, new_tokens: int) -> dict[str, Any]:
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.kv_cache import KVCache, kv_bytes_per_token

    model = load_model(path)
    prompt = _prompt(context, model.config.vocab_size)
    loaded = _rss_mib()
    steps: list[float] = []
    cpu_steps: list[float] = []
    gen = Generator(model, kv_mode="latent", prefill_chunk=CHUNK)
    last = [time.perf_counter(), time.process_time()]

    def on_token(_event: Any) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        steps.append(now - last[0])
        cpu_steps.append(cpu - last[1])
        last[:] = [now, cpu]

    out = gen.generate([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True), on_token)
    stats = gen.stats
    cache = KVCache(model.config, "latent", 1, context + new_tokens)
    return {
        "prefill_s": stats.prefill_s,
        # steps[0] is the prefill plus the first token; the rest are one decode step each
        "per_token_s": statistics.median(steps[1:]),
        "per_token_cpu_s": statistics.median(cpu_steps[1:]),
        "decode_s": stats.decode_s,
        "tokens": out[0].token_ids,
        "rss_loaded_mib": loaded,
        "peak_rss_mib": _rss_mib(),
        "cache_bytes": cache.nbytes,
        "mha_cache_bytes": kv_bytes_per_token(model.config, "full", 4) * (context + new_tokens),
    }


def run_transformers(path: Path, context: int, new_tokens: int) -> dict[str, Any]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([_prompt(context, model.config.vocab_size)])
    loaded = _rss_mib()
    tokens: list[int] = []
    steps: list[float] = []
    cpu_steps: list[float] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        for _ in range(new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == new_tokens:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, logits_to_keep=1)
            steps.append(time.perf_counter() - t0)
            cpu_steps.append(time.process_time() - c0)
    cache_bytes = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    return {
        "prefill_s": prefill_s,
        "per_token_s": statistics.median(steps),
        "per_token_cpu_s": statistics.median(cpu_steps),
        "decode_s": sum(steps),
        "tokens": tokens,
        "rss_loaded_mib": loaded,
        "peak_rss_mib": _rss_mib(),
        "cache_bytes": cache_bytes,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    if args.worker == "ours-same-process":
        plan = [tuple(int(x) for x in item.split(":")) for item in args.plan.split(",")]
        rows = run_ours_same_process(path, plan, args.new_tokens)  # type: ignore[arg-type]
        from expertmesh.models import latent_kernel

        for row in rows:
            row["latent_kernel"] = latent_kernel.unavailable_reason() or "used"
        print("RESULT " + json.dumps(rows))
        return
    from expertmesh.models import latent_kernel

    calls = [0]
    kernel = latent_kernel.latent_decode

    def counted(*a: Any) -> Any:
        calls[0] += 1
        return kernel(*a)

    latent_kernel.latent_decode = counted  # attention dispatches through the module attribute
    if args.worker == "ours-tiled":
        result = run_ours_tiled(path, args.context, args.new_tokens, args.tile_prefill)
    else:
        run = run_ours if args.worker == "ours" else run_transformers
        result = run(path, args.context, args.new_tokens)
    if args.worker.startswith("ours"):
        # the compiled one-pass latent decode (models/latent_kernel.py) or why it was not used,
        # and how many layer calls it served (decode steps x MLA layers when it always ran)
        result["latent_kernel"] = latent_kernel.unavailable_reason() or "used"
        result["latent_kernel_calls"] = calls[0]
    print("RESULT " + json.dumps(result))


def measure_same_process(
    path: Path, plan: list[tuple[int, int]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """run_ours_same_process in a child process: one row per (context, prefilled) of `plan`."""
    argv = [sys.executable, __file__, "--worker", "ours-same-process", "--checkpoint", str(path)]
    argv += ["--plan", ",".join(f"{c}:{p}" for c, p in plan)]
    argv += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    base = [{"engine": "ours-same-process", "context": c} for c, _ in plan]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [{**b, "error": f"did not finish in {args.timeout:.0f} s"} for b in base]
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return [{**b, "error": f"exit {proc.returncode}: {tail[0][:200]}"} for b in base]
    found = json.loads(lines[-1].removeprefix("RESULT "))
    return [{**b, "wall_s": wall, **r} for b, r in zip(base, found)]


def measure(engine: str, path: Path, context: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", engine, "--checkpoint", str(path)]
    argv += ["--context", str(context), "--new-tokens", str(args.new_tokens)]
    argv += ["--threads", str(args.threads), "--tile-prefill", str(args.tile_prefill)]
    timeout = args.timeout
    row: dict[str, Any] = {"engine": engine, "context": context}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"did not finish in {timeout:.0f} s"}
    row["wall_s"] = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**row, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return {**row, **json.loads(lines[-1].removeprefix("RESULT "))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="contexts 2k and 8k only")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--transformers-max", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3000.0, help="per process, seconds")
    parser.add_argument(
        "--prefill-max",
        type=int,
        default=32768,
        help="longer contexts: real chunked prefill of this many tokens, the rest of the cache "
        "filled with copies (decode time and memory only; see run_ours_tiled)",
    )
    parser.add_argument(
        "--tile-prefill",
        type=int,
        default=8192,
        help="tokens prefilled for real before the copies, beyond --prefill-max",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="all of our contexts in one process, decode steps round-robin (see above)",
    )
    parser.add_argument(
        "--also-tiled",
        action="store_true",
        help="with --same-process: a tiled copy of every context prefilled for real beyond "
        "--tile-prefill, to compare the two in the same process",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        help="JSON lines of runs measured earlier with this script and config; those "
        "(engine, context) pairs are taken from it instead of run again",
    )
    parser.add_argument(
        "--result-name", default="bench_long_context", help="benchmarks/results/<name>.json"
    )
    parser.add_argument(
        "--worker",
        choices=["ours", "ours-tiled", "ours-same-process", "transformers"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    contexts = [2048, 8192] if args.quick else args.contexts
    previous = {}
    if args.previous:
        for line in args.previous.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                previous[row["engine"], row["context"]] = {**row, "from_previous_run": True}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deepseek-v3-yarn-tiny"
        build_checkpoint(path)
        if args.same_process:
            plan = [(c, c if c <= args.prefill_max else args.tile_prefill) for c in contexts]
            if args.also_tiled:
                plan += [(c, args.tile_prefill) for c, p in list(plan) if p > args.tile_prefill]
            for row in measure_same_process(path, plan, args):
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("steps")}))
                rows.append(row)
        for context in contexts:
            engines = [] if args.same_process else [
                "ours" if context <= args.prefill_max else "ours-tiled"
            ]  # fmt: skip
            engines += ["transformers"] if context <= args.transformers_max else []
            for engine in engines:
                row = previous.get((engine, context)) or measure(engine, path, context, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    ours = [r for r in rows if r["engine"].startswith("ours") and "error" not in r]
    ref = {r["context"]: r for r in rows if r["engine"] == "transformers" and "error" not in r}
    # the ratio's base: our shortest context (prefilled for real if it was both ways)
    first = min(ours, key=lambda r: (r["context"], bool(r.get("prefilled_tokens"))), default=None)
    summary = []
    for o in ours:
        context, t = o["context"], ref.get(o["context"])
        assert first is not None
        summary.append(
            {
                "context": context,
                "ours_engine": o["engine"],
                "ours_per_token_ms": o["per_token_s"] * 1e3,
                "ours_per_token_cpu_ms": o["per_token_cpu_s"] * 1e3,
                "ours_prefill_s": o["prefill_s"],
                "ours_cache_filled_by": "copies" if o.get("prefilled_tokens") else "prefill",
                "ours_latent_kernel_calls": o.get("latent_kernel_calls"),
                "ours_decode_steps": o.get("decode_steps"),
                "ours_peak_rss_mib": o["peak_rss_mib"],
                "ours_cache_mib": o["cache_bytes"] / 2**20,
                "mha_cache_mib": o["mha_cache_bytes"] / 2**20,
                "cache_vs_mha": o["cache_bytes"] / o["mha_cache_bytes"],
                "per_token_vs_first_context": o["per_token_s"] / first["per_token_s"],
                "cpu_per_token_vs_first_context": o["per_token_cpu_s"] / first["per_token_cpu_s"],
                "hf_per_token_ms": t and t["per_token_s"] * 1e3,
                "hf_per_token_cpu_ms": t and t["per_token_cpu_s"] * 1e3,
                "hf_prefill_s": t and t["prefill_s"],
                "hf_peak_rss_mib": t and t["peak_rss_mib"],
                "hf_cache_mib": t and t["cache_bytes"] / 2**20,
                "per_token_speedup_vs_hf": t and t["per_token_s"] / o["per_token_s"],
                # tokens after a cache of copies are not those of the prompt: not compared
                "greedy_identical": None
                if t is None or o.get("prefilled_tokens")
                else o["tokens"] == t["tokens"],
            }
        )
    print_table(
        "Long context: DeepSeek-V3-shaped (YaRN x40), latent cache, chunked prefill vs transformers",
        ["context", "cache by", "ours ms/tok", "CPU ms/tok", "x vs first (CPU)", "ours prefill s",
         "ours peak RSS MiB", "cache MiB", "vs MHA cache", "HF ms/tok", "HF CPU ms/tok",
         "HF prefill s", "HF peak RSS MiB", "HF cache MiB", "speed-up", "same greedy"],
        [[s["context"], s["ours_cache_filled_by"], s["ours_per_token_ms"], s["ours_per_token_cpu_ms"],
          s["cpu_per_token_vs_first_context"], s["ours_prefill_s"], s["ours_peak_rss_mib"],
          s["ours_cache_mib"], s["cache_vs_mha"], s["hf_per_token_ms"],
          s["hf_per_token_cpu_ms"], s["hf_prefill_s"], s["hf_peak_rss_mib"], s["hf_cache_mib"],
          s["per_token_speedup_vs_hf"], s["greedy_identical"]] for s in summary],
    )  # fmt: skip
    errors = [r for r in rows if "error" in r]
    path = write_result(
        args.result_name,
        {
            "config": CONFIG,
            "prefill_chunk": CHUNK,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "same_process": args.same_process,
            "summary": summary,
            "runs": rows,
            "errors": errors,
        },
        baseline=(
            "transformers AutoModelForCausalLM on the same checkpoint, same run and threads, "
            f"one-pass prefill, contexts <= {args.transformers_max}; the MHA-equivalent cache "
            "size from the model's shapes"
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
