"""Generation on one device: our engine against `transformers` and vLLM's CUDA build, the same
checkpoint, batch 1, 8 and 32. `benchmarks/gpu_check.sh` runs it on a GPU machine.

    python benchmarks/bench_gpu.py                               # GPU: the `small` model, bf16
    python benchmarks/bench_gpu.py --tests-junit gpu-tests.xml   # also records the gpu tests
    python benchmarks/bench_gpu.py --size tiny --device cpu --batches 1,2 --new-tokens 4 \\
        --prompt-tokens 8 --repeats 1 --results-dir benchmarks/out    # seconds, on a CPU

What is measured: a randomly initialised Qwen3-MoE-shaped model (vLLM implements the family;
`small` is about 0.7B parameters: hidden 1024, 12 layers, 32 experts top-4, vocab 32000) is
built with `transformers.Qwen3MoeConfig`, re-initialised with std 0.1 (norms 1; at 0.02 greedy
output collapses to a few tokens) and saved once. Every engine loads that one directory in the
same dtype (bf16 on CUDA, float32 on the CPU), generates `--new-tokens` tokens greedily (no
early stop) after a random `--prompt-tokens` prompt per row. Ours and transformers run in this
process on the same device, a warm-up call each, then `--repeats` calls interleaved (ours,
transformers, ours, ...) per batch size; the median is kept. vLLM runs in a child process
(its engine owns the GPU while it lives) with `enforce_eager=True` (no CUDA-graph capture: it
would take longer than this whole check), token-id prompts, the same warm-up and repeats.
tokens/s = batch x new tokens / wall time, prefill included. `agreement` is the mean fraction
of each row's greedy tokens ours shares with transformers before they first differ (1.0 in
float32; bf16 rounding may flip a near-tied token).

Without vLLM installed, or on the CPU (its CUDA build needs a GPU), the vLLM column is absent
and the JSON says why. Results: `benchmarks/results/gpu_check.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import invoked_command, make_console, median_times, print_table, write_result

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "small": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
    ),
}
COMMON: dict[str, Any] = dict(
    max_position_embeddings=4096,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    # No EOS/pad: no engine may stop early, so outputs compare token for token.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
INIT_STD = 0.1


def build_checkpoint(size: str, path: Path, seed: int = 0) -> int:
    """Save the benchmark model to `path`; returns its parameter count."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**SHAPES[size], **COMMON)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.ones_like(p)
                if "norm" in name
                else torch.randn(p.shape, generator=gen) * INIT_STD
            )
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


class Ours:
    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device) -> None:
        from expertmesh.models.checkpoint import load_model
        from expertmesh.models.generate import Generator

        self.generator = Generator(load_model(path, dtype, device=device))

    def __call__(self, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        from expertmesh.models.generate import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        return [c.token_ids for c in self.generator.generate(rows, params)]


class Transformers:
    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(rows, device=self.device)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, ids.shape[1] :].tolist()  # .tolist() waits for the GPU


def agreement(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> float:
    """Mean over rows of the fraction of tokens shared before the first difference."""
    shares = []
    for a, b in zip(ours, theirs):
        same = 0
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
        shares.append(same / max(len(a), 1))
    return sum(shares) / max(len(shares), 1)


def vllm_unavailable(device: torch.device) -> str | None:
    """Why vLLM is left out, or None when it can run here."""
    if device.type != "cuda":
        return f"vLLM's CUDA build needs a GPU; this run is on {device.type}"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment (gpu_check.sh installs it when online)"
    return None


def vllm_worker(args: argparse.Namespace) -> int:
    """Child process: vLLM on the checkpoint, the same prompts, timings as JSON on stdout."""
    from vllm import LLM
    from vllm import SamplingParams as VParams

    cfg = json.loads((Path(args.checkpoint) / "config.json").read_text())
    llm = LLM(
        model=args.checkpoint,
        dtype=args.dtype,
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.5,
        max_model_len=args.prompt_tokens + args.new_tokens + 8,
        seed=0,
    )
    params = VParams(
        max_tokens=args.new_tokens,
        min_tokens=args.new_tokens,
        temperature=0.0,
        ignore_eos=True,
        detokenize=False,
    )
    out: dict[str, Any] = {}
    for batch in parse_batches(args.batches):
        rows = [
            {"prompt_token_ids": r} for r in prompts(batch, args.prompt_tokens, cfg["vocab_size"])
        ]
        llm.generate(rows, params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = llm.generate(rows, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        out[str(batch)] = {
            "median_s": sorted(times)[len(times) // 2],
            "times_s": times,
            "tokens": [list(r.outputs[0].token_ids) for r in res],
        }
    print("VLLM_JSON " + json.dumps(out), flush=True)
    return 0


def run_vllm(args: argparse.Namespace, checkpoint: Path, dtype: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--vllm-worker", "--checkpoint", str(checkpoint)]
    argv += ["--dtype", dtype, "--batches", args.batches, "--repeats", str(args.repeats)]
    argv += ["--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.vllm_timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"vLLM did not finish within {args.vllm_timeout_s} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("VLLM_JSON ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {"status": f"vLLM failed (exit {done.returncode})", "log_tail": tail}
    return {
        "status": "ran",
        "wall_s": round(time.perf_counter() - t0, 1),
        "by_batch": json.loads(lines[-1].removeprefix("VLLM_JSON ")),
    }


def junit_summary(path: Path) -> dict[str, Any]:
    """tests / failures / errors / skipped of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    out: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return out


def parse_batches(text: str) -> list[int]:
    batches = [int(b) for b in text.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches: give positive batch sizes like 1,8,32; got {text!r}")
    return batches


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-timeout-s", type=int, default=240)
    p.add_argument("--tests-junit", type=Path, help="pytest --junitxml of the gpu tests")
    p.add_argument("--name", default="gpu_check", help="results file stem")
    p.add_argument("--results-dir", type=Path, help="default: benchmarks/results")
    p.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_worker:
        return vllm_worker(args)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    batches = parse_batches(args.batches)
    console = make_console()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        checkpoint = Path(tmp) / "qwen3-moe"
        params = build_checkpoint(args.size, checkpoint)
        vocab = SHAPES[args.size]["vocab_size"]
        why_not = vllm_unavailable(device)
        vllm = {"status": why_not} if why_not else run_vllm(args, checkpoint, dtype_name)
        engines = {
            "ours": Ours(checkpoint, dtype, device),
            "transformers": Transformers(checkpoint, dtype, device),
        }
        rows: list[dict[str, Any]] = []
        for batch in batches:
            rows_in = prompts(batch, args.prompt_tokens, vocab)
            timings = median_times(
                {
                    name: (lambda e=e, r=rows_in: e(r, args.new_tokens))
                    for name, e in engines.items()
                },
                repeats=args.repeats,
            )
            tokens = batch * args.new_tokens
            row: dict[str, Any] = {
                "batch": batch,
                "ours_tok_s": tokens / timings["ours"].median_s,
                "transformers_tok_s": tokens / timings["transformers"].median_s,
                "ours_times_s": timings["ours"].times_s,
                "transformers_times_s": timings["transformers"].times_s,
                "agreement_vs_transformers": agreement(
                    timings["ours"].result, timings["transformers"].result
                ),
            }
            row["ours_vs_transformers"] = row["ours_tok_s"] / row["transformers_tok_s"]
            got = vllm.get("by_batch", {}).get(str(batch))
            if got is not None:
                row["vllm_tok_s"] = tokens / got["median_s"]
                row["ours_vs_vllm"] = row["ours_tok_s"] / row["vllm_tok_s"]
                row["agreement_vs_vllm"] = agreement(timings["ours"].result, got["tokens"])
            rows.append(row)
    vllm.pop("by_batch", None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    columns = ["batch", "ours tok/s", "transformers tok/s", "ours/transformers", "agreement"]
    if any("vllm_tok_s" in r for r in rows):
        columns += ["vLLM tok/s", "ours/vLLM"]
    table = []
    for r in rows:
        cells = [r["batch"], r["ours_tok_s"], r["transformers_tok_s"], r["ours_vs_transformers"]]
        cells.append(r["agreement_vs_transformers"])
        if "vLLM tok/s" in columns:
            cells += [r.get("vllm_tok_s", "-"), r.get("ours_vs_vllm", "-")]
        table.append(cells)
    print_table(
        f"Greedy generation on {name}, {dtype_name}, {params / 1e6:.1f}M-parameter Qwen3-MoE, "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens",
        columns,
        table,
        console,
    )
    if why_not or vllm.get("status") != "ran":
        console.print(f"vLLM: {vllm.get('status')}")
    payload: dict[str, Any] = {
        "device": str(device),
        "device_name": name,
        "dtype": dtype_name,
        "model": {
            "family": "qwen3_moe",
            "size": args.size,
            "parameters": params,
            **SHAPES[args.size],
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "vllm": vllm,
    }
    if args.tests_junit is not None:
        payload["gpu_tests"] = (
            junit_summary(args.tests_junit)
            if args.tests_junit.is_file()
            else {"status": f"{args.tests_junit} was not written (the test run did not finish)"}
        )
    out = write_result(
        args.name,
        payload,
        command=invoked_command(),
        baseline="transformers generate on the same checkpoint, dtype and device, interleaved "
        "in this process; vLLM (enforce_eager) in a child process on the same GPU",
        results_dir=args.results_dir,
    )
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
