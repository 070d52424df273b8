"""Training throughput with 1 and 2 Ray Train workers, and expert-load spread with and without
balancing, in one run.

    nice -n 19 .venv/bin/python benchmarks/bench_training.py            # JSON: benchmarks/results/bench_training.json
    nice -n 19 .venv/bin/python benchmarks/bench_training.py --quick    # a smoke run
    .venv/bin/python benchmarks/bench_training.py --phase speed         # one phase: bench_training_speed.json

Each phase holds its own baseline (throughput: 1 worker; balance: no regulariser), so the two
may run apart (`--phase`, about 4 and 8 minutes on an idle machine) on a shared machine.

Throughput: the demo model's shape (DeepSeek-V3-style, 6.2M parameters) pre-trained on the
Shakespeare plays with the same global batch (16 x 256 tokens per step) by 1 worker with 2
CPUs (2 torch threads) and by 2 workers with 1 CPU each (gloo all-reduce). tokens/s counts all
workers' training tokens over the steps after the first.

Balance: the same model and data, one worker, trained three ways: no router regulariser, the
Switch load-balancing loss (0.01) + ST-MoE z-loss (0.001), and DeepSeek-V3's bias update
(gamma 0.001) with no auxiliary loss. Load spread = max / mean tokens per expert, averaged
over MoE layers and over the last quarter of the steps (1.0 is perfect balance).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

from expertmesh.training.config import PretrainConfig, parse_config
from expertmesh.training.pretrain import run_pretrain
from expertmesh.training.runner import read_train_log


def job(name: str, storage: Path, steps: int, workers: int, cpus: int, batch: int, seq_len: int,
        balance: dict[str, float]) -> PretrainConfig:  # fmt: skip
    return parse_config(
        {
            "model": {"preset": "demo", "tokenizer": str(REPO_ROOT / "expertmesh/demo"), "seed": 0},
            "data": {"seq_len": seq_len, "batch_size": batch, "val_windows": 8},
            "balance": balance,
            "optim": {"max_steps": steps, "warmup_steps": max(1, steps // 10), "lr": 3e-3},
            "run": {
                "name": name,
                "storage_path": str(storage),
                "num_workers": workers,
                "cpus_per_worker": cpus,
                "checkpoint_every": steps,
                "eval_every": steps,
                "log_every": steps,
                "progress_bar": False,
            },
            "output": {"dir": str(storage / name / "model")},
        },
        PretrainConfig,
        name,
    )


def run(cfg: PretrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    outcome = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    log = read_train_log(outcome.log_path)
    tail = log[-max(1, len(log) // 4) :]
    return {
        "tokens_per_s": log[-1]["tokens_per_s"],
        "load_spread_last_quarter": statistics.mean(r["load_spread"] for r in tail),
        "load_spread_per_step": [round(r["load_spread"], 4) for r in log],
        "final_loss": log[-1]["loss"],
        "val_perplexity": outcome.metrics.get("val_perplexity"),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per throughput set-up")
    parser.add_argument(
        "--phase",
        choices=("all", "speed", "balance"),
        default="all",
        help="run one phase only (JSON: bench_training_<phase>.json)",
    )
    args = parser.parse_args()
    phases = ("speed", "balance") if args.phase == "all" else (args.phase,)
    speed_steps, balance_steps = (6, 12) if args.quick else (30, 160)
    console = make_console()
    results: dict[str, Any] = {"speed": {}, "balance": {}}

    def save(complete: bool) -> Path:
        """Write what is measured so far (after each phase too: a run that dies in the balance
        phase on a crowded machine keeps its throughput figures, marked `complete: false`)."""
        suffix = ("" if args.phase == "all" else f"_{args.phase}") + (
            "_quick" if args.quick else ""
        )
        return write_result(
            "bench_training" + suffix,
            {
                "phases": list(phases),
                "quick": args.quick,
                "complete": complete,
                "speed_steps": speed_steps,
                "balance_steps": balance_steps,
                **results,
            },
            baseline="throughput: 1 worker with 2 CPUs; balance: no router regulariser; both "
            "alternating with the other set-ups in the same run",
        )

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        storage = Path(tmp)
        none = {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.0}
        # Alternate the two set-ups (1, 2, 1, 2, ...) so a change in machine load hits both.
        for rep in range(args.repeats if "speed" in phases else 0):
            for workers, cpus, batch in ((1, 2, 16), (2, 1, 8)):
                name = f"speed-{workers}w"
                console.print(f"[bold]{name}[/] run {rep + 1}: {workers} worker(s) x {cpus} CPU")
                results["speed"].setdefault(name, []).append(
                    run(job(f"{name}-{rep}", storage, speed_steps, workers, cpus, batch, 256, none))
                )
        save(complete=False)
        variants = {
            "no balancing": none,
            "aux loss + z-loss": {"aux_loss_coef": 0.01, "z_loss_coef": 0.001, "bias_update_rate": 0.0},
            "DeepSeek-V3 bias (aux-loss-free)": {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_update_rate": 0.001},
        }  # fmt: skip
        if "balance" not in phases:
            variants = {}
        for i, (label, balance) in enumerate(variants.items()):
            console.print(f"[bold]balance[/]: {label}")
            results["balance"][label] = run(
                job(f"balance-{i}", storage, balance_steps, 1, 2, 16, 128, balance)
            )
            save(complete=False)

    if "speed" in phases:
        print_speed(results, args.repeats, console)
    if "balance" in phases:
        print_table(
            f"Expert-load spread (max/mean), last quarter of {balance_steps} steps",
            ["balancing", "load spread", "final loss", "val perplexity"],
            [
                [label, r["load_spread_last_quarter"], r["final_loss"], r["val_perplexity"]]
                for label, r in results["balance"].items()
            ],
            console,
        )
    path = save(complete=True)
    console.print(f"wrote {path}")


def print_speed(results: dict[str, Any], repeats: int, console: Any) -> None:
    speed = {
        name: statistics.median(r["tokens_per_s"] for r in runs)
        for name, runs in results["speed"].items()
    }
    results["speed_median_tokens_per_s"] = speed
    base = speed["speed-1w"]
    results["speed_2w_vs_1w"] = speed["speed-2w"] / base

    def each(name: str) -> str:
        return ", ".join(f"{r['tokens_per_s']:.0f}" for r in results["speed"][name])

    print_table(
        f"Pre-training throughput, demo shape, global batch 16 x 256 (median of {repeats})",
        ["workers", "CPUs each", "tokens/s", "vs 1 worker", "runs"],
        [
            [1, 2, base, 1.0, each("speed-1w")],
            [2, 1, speed["speed-2w"], speed["speed-2w"] / base, each("speed-2w")],
        ],
        console,
    )


if __name__ == "__main__":
    main()
