"""Generation throughput of our engine against `transformers` on the same checkpoint, plus
KV-cache bytes per token for each cache mode.

    .venv/bin/python benchmarks/bench_engine.py                  # ~1.5 min on 2 idle cores
    .venv/bin/python benchmarks/bench_engine.py --quick          # 1 timed repeat
    .venv/bin/python benchmarks/bench_engine.py --threads 2 --out benchmarks/out/bench_engine.json

What is measured: a randomly initialised OLMoE-shaped model of about 100M parameters is built
with `transformers.OlmoeConfig`, re-initialised with a fixed seed and saved once with
`save_pretrained`; both engines load that one checkpoint in fp32, in this process, with the
same torch thread count. Each engine generates 64 tokens greedily (no early stop) after a
128-token random prompt, at batch 1 and batch 8. After one warm-up call per engine and batch
size, R calls per engine are timed, interleaved (ours, transformers, ours, ...) so changes in
machine load hit both alike, and the median kept; tokens/s = generated tokens / wall time,
prefill included. Greedy outputs of the two engines are compared token for token.

Weights are drawn with std 0.1 (norms 1), not the usual 0.02: at 0.02 this model's greedy
output collapses to 1-3 distinct tokens per row, which makes the identical-output check
nearly vacuous and routes every decode step to the same experts (unrealistically
cache-friendly). At 0.1 rows generate ~60 distinct tokens of 64 and still match exactly.
The shared build machine is noisy: read the load average recorded in the JSON with results.

KV-cache bytes per token are computed (not measured) with `kv_bytes_per_token` for this model
and for a DeepSeek-V3-shaped config with its real attention sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timing, make_console, median_times, print_table, write_json

from expertmesh.models.adapters import adapter_for
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.config import KVMode, ModelConfig
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.kv_cache import kv_bytes_per_token

# OLMoE shape scaled down to ~100M parameters. Expert intermediate 304 (a multiple of 16)
# lands at 101.0M: 32.8M embeddings + LM head, 8.4M attention, 59.8M experts.
OLMOE_SIZES: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=304,  # per expert in OLMoE
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    # No EOS/pad: neither engine may stop early or suppress a token, so greedy outputs are
    # comparable token for token (transformers' min_new_tokens would mask an EOS id).
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

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
BATCH_SIZES = (1, 8)
ENGINES = ("ours", "transformers")


def build_checkpoint(path: Path, seed: int = 0, std: float = 0.1) -> int:
    """Save the random OLMoE-shaped model to `path` with `save_pretrained`; its parameter count.

    Every weight is redrawn from N(0, std) with a seeded generator, norms set to 1, so the
    checkpoint is the same on every run whatever transformers' own init does.
    """
    import transformers

    config = transformers.OlmoeConfig(**OLMOE_SIZES)
    model = transformers.OlmoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def random_prompts(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """(batch, PROMPT_LEN) token ids; row i is the same whatever `batch` is."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (max(BATCH_SIZES), PROMPT_LEN), generator=gen)[:batch]


class OursEngine:
    """`load_model` + `Generator`, greedy, EOS ignored."""

    name = "ours"

    def __init__(self, checkpoint: Path) -> None:
        self.generator = Generator(load_model(checkpoint, dtype="float32"))
        self.params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

    def runner(self, prompts: torch.Tensor) -> Callable[[], list[list[int]]]:
        rows = prompts.tolist()
        return lambda: [c.token_ids for c in self.generator.generate(rows, self.params)]

    def last_split_s(self) -> dict[str, float] | None:
        stats = self.generator.stats
        return {"prefill_s": stats.prefill_s, "decode_s": stats.decode_s}


class TransformersEngine:
    """`AutoModelForCausalLM.from_pretrained` + `generate`, greedy, exactly NEW_TOKENS tokens."""

    name = "transformers"

    def __init__(self, checkpoint: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32
        ).eval()

    def runner(self, prompts: torch.Tensor) -> Callable[[], list[list[int]]]:
        mask = torch.ones_like(prompts)  # equal lengths: no padding

        @torch.inference_mode()
        def run() -> list[list[int]]:
            out = self.model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            return out[:, PROMPT_LEN:].tolist()

        return run

    def last_split_s(self) -> dict[str, float] | None:
        return None


@dataclass(frozen=True)
class Measurement:
    engine: str
    batch_size: int
    timing: Timing[list[list[int]]]
    split_s: dict[str, float] | None  # our prefill/decode split of the last timed call

    @property
    def generated_tokens(self) -> int:
        return sum(len(row) for row in self.timing.result)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.timing.median_s

    def to_json(self) -> dict[str, Any]:
        out = {
            "median_s": self.timing.median_s,
            "times_s": list(self.timing.times_s),
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.tokens_per_s,
        }
        if self.split_s is not None:
            out["last_call_split_s"] = self.split_s
        return out


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> dict[str, int] | None:
    for row, (x, y) in enumerate(zip(a, b)):
        for pos, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return {"row": row, "position": pos}
        if len(x) != len(y):
            return {"row": row, "position": min(len(x), len(y))}
    return None


def measure_throughput(
    checkpoint: Path, vocab: int, repeats: int, seed: int, console: Console
) -> dict[int, dict[str, Measurement]]:
    """{batch_size: {engine: Measurement}}; engines loaded once, timed calls interleaved."""
    results: dict[int, dict[str, Measurement]] = {b: {} for b in BATCH_SIZES}
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        load = progress.add_task("loading engines", total=len(ENGINES))
        engines: dict[str, OursEngine | TransformersEngine] = {}
        for cls in (OursEngine, TransformersEngine):
            engines[cls.name] = cls(checkpoint)
            progress.advance(load)
        for batch in BATCH_SIZES:
            prompts = random_prompts(batch, vocab, seed)
            tasks = {e: progress.add_task(f"{e} batch {batch}", total=1 + repeats) for e in ENGINES}

            def advance(engine: str, tasks: dict[str, TaskID] = tasks) -> None:
                progress.advance(tasks[engine])

            timings = median_times(
                {e: engines[e].runner(prompts) for e in ENGINES}, repeats, warmup=1, on_call=advance
            )
            for engine, timing in timings.items():
                m = Measurement(engine, batch, timing, engines[engine].last_split_s())
                results[batch][engine] = m
                times = ", ".join(f"{t:.2f}" for t in timing.times_s)
                progress.console.print(
                    f"{engine} batch {batch}: {m.tokens_per_s:.2f} tok/s "
                    f"(median {timing.median_s:.2f} s of [{times}] s)"
                )
    return results


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


def report_throughput(
    results: dict[int, dict[str, Measurement]], threads: int, console: Console
) -> list[dict[str, Any]]:
    """Print the throughput table; its rows for the JSON, with the output comparison."""
    throughput_rows, throughput_json = [], []
    for batch in BATCH_SIZES:
        ours, ref = results[batch]["ours"], results[batch]["transformers"]
        mismatch = first_mismatch(ours.timing.result, ref.timing.result)
        identical = mismatch is None
        ratio = ours.tokens_per_s / ref.tokens_per_s
        throughput_rows.append(
            [batch, ours.generated_tokens, ours.tokens_per_s, ref.tokens_per_s, ratio, identical]
        )
        throughput_json.append(
            {
                "batch_size": batch,
                "ours": ours.to_json(),
                "transformers": ref.to_json(),
                "ratio_ours_over_transformers": ratio,
                "outputs_identical": identical,
                "first_mismatch": mismatch,
                "distinct_tokens_generated": len({t for row in ours.timing.result for t in row}),
            }
        )
    print_table(
        f"Greedy generation, fp32, {threads} threads (tokens/s = generated / wall, prefill included)",
        [
            "batch",
            "generated",
            "ours tok/s",
            "transformers tok/s",
            "ours/transformers",
            "outputs identical",
        ],
        throughput_rows,
        console,
    )
    return throughput_json


def report_kv_bytes(model_config: ModelConfig, console: Console) -> list[dict[str, Any]]:
    """Print KV-cache bytes per token, this model and the DeepSeek-V3 shape; JSON rows."""
    deepseek = adapter_for(DEEPSEEK_V3_RAW).parse_config(DEEPSEEK_V3_RAW)
    kv = kv_rows("OLMoE-100M", model_config, ("full", "int8")) + kv_rows(
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed repeat instead of --repeats")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per engine and batch size"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both engines)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
    parser.add_argument(
        "--init-std", type=float, default=0.1, help="std of the random weights (see module doc)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_engine.json"))
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    console = make_console()

    import transformers

    transformers.logging.set_verbosity_error()  # generation-config chatter, not results
    transformers.logging.disable_progress_bar()  # we show our own progress
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        checkpoint = Path(tmp)
        with console.status("building and saving the ~100M-parameter checkpoint"):
            params = build_checkpoint(checkpoint, args.seed, args.init_std)
        console.print(
            f"OLMoE-shaped model: [bold]{params:,}[/] parameters, fp32; "
            f"{args.threads} torch threads; prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens; "
            f"median of {repeats} after 1 warm-up"
        )
        model_config = read_config(checkpoint)
        results = measure_throughput(
            checkpoint, OLMOE_SIZES["vocab_size"], repeats, args.seed, console
        )

    throughput = report_throughput(results, args.threads, console)
    kv = report_kv_bytes(model_config, console)

    path = write_json(
        args.out,
        {
            "benchmark": "bench_engine",
            "settings": {
                "threads": args.threads,
                "repeats": repeats,
                "warmup": 1,
                "quick": args.quick,
                "seed": args.seed,
                "init_std": args.init_std,
                "prompt_len": PROMPT_LEN,
                "new_tokens": NEW_TOKENS,
                "batch_sizes": list(BATCH_SIZES),
                "dtype": "float32",
                "load_average_at_start": load_at_start,
            },
            "model": {"family": "olmoe", "param_count": params, "hf_config": OLMOE_SIZES},
            "throughput": throughput,
            "kv_bytes_per_token": kv,
            "deepseek_v3_config": DEEPSEEK_V3_RAW,
        },
    )
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
