"""Training throughput with 1 and 2 Ray Train workers, and expert-load spread with and without
balancing, in one run.

    nice -n 19 .venv/bin/python benchmarks/bench_training.py            # JSON: benchmarks/results/bench_training.json
    nice -n 19 .venv/bin/python benchmarks/bench_training.py --quick    # a smoke run
    .venv/bin/python benchmarks/bench_training.py --phase speed         # one phase: bench_training_speed.json
    .venv/bin/python benchmarks/bench_training.py --phase dpo           # the DPO job: bench_training_dpo.json
    .venv/bin/python benchmarks/bench_training.py --phase distill       # the distillation job: bench_training_distill.json

Each phase holds its own baseline (throughput: 1 worker; balance: no regulariser; DPO: the
starting model; distillation: the same student trained on hard labels only), so they may run
apart (`--phase`) on a shared machine. `all` runs speed and balance (about 4 and 8 minutes on
an idle machine); dpo and distill run only when named.

DPO and distillation run the jobs exactly as `expertmesh train dpo|distill --config
examples/training/{dpo,distill}.yaml` do (the same configs, paths resolved against the
repository, Ray storage and outputs in a temporary folder); `--steps N` shortens either to N
optimiser steps (recorded in the JSON; the result name gets `_<N>steps`).

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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

from expertmesh.training.config import DistillConfig, DPOConfig, PretrainConfig, parse_config
from expertmesh.training.distill import run_distill
from expertmesh.training.dpo import run_dpo
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


EXAMPLES = REPO_ROOT / "examples" / "training"


def example_job(kind: str, storage: Path, steps: int | None) -> dict[str, Any]:
    """examples/training/<kind>.yaml as `expertmesh train <kind>` reads it, with its relative
    paths resolved against the repository, Ray storage and output under `storage`, no progress
    bar, and optionally `steps` optimiser steps (checkpoints and evaluations scaled with it)."""
    data = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())

    def repo(path: str) -> str:
        return str(REPO_ROOT / path)

    model = data["model"]
    for key in ("checkpoint", "tokenizer"):
        if key in model:
            model[key] = repo(model[key])
    for key in ("train", "val"):
        if key in data["data"]:
            data["data"][key] = repo(data["data"][key])
    if "distill" in data:
        data["distill"]["teacher"] = repo(data["distill"]["teacher"])
    run = data["run"]
    run.update({"storage_path": str(storage / "ray"), "progress_bar": False})
    if steps is not None:
        optim = data["optim"]
        optim["max_steps"] = steps
        optim["warmup_steps"] = min(optim.get("warmup_steps", 0), max(1, steps // 10))
        run["checkpoint_every"] = min(run.get("checkpoint_every", steps), steps)
        run["eval_every"] = min(run.get("eval_every", steps), steps)
    data["output"]["dir"] = str(storage / kind)
    return data


def train_tail(log_path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Steps, median step time, tokens/s and the last tenth's mean of `keys` of one run's log."""
    log = read_train_log(log_path)
    tail = log[-max(1, len(log) // 10) :]
    return {
        "steps": len(log),
        "median_step_s": statistics.median(r["step_s"] for r in log),
        "tokens_per_s": log[-1]["tokens_per_s"],
        **{f"train_{k}_last_tenth": statistics.mean(r[k] for r in tail) for k in keys},
    }


def run_dpo_phase(storage: Path, steps: int | None) -> dict[str, Any]:
    cfg = parse_config(example_job("dpo", storage, steps), DPOConfig, "dpo")
    t0 = time.perf_counter()
    out = run_dpo(cfg)
    wall = time.perf_counter() - t0
    if out.after is None:
        raise RuntimeError("dpo: the training run did not finish (no 'after' metrics)")
    return {
        "config": cfg.model_dump(mode="json"),
        "before": out.before,
        "after": out.after,
        "training": train_tail(out.training.log_path, ("loss", "reward_accuracy")),
        "wall_s": wall,
    }


def run_distill_phase(storage: Path, steps: int | None) -> dict[str, Any]:
    cfg = parse_config(example_job("distill", storage, steps), DistillConfig, "distill")
    if not cfg.distill.baseline:
        raise ValueError("distill: the bench needs distill.baseline (the hard-labels student)")
    t0 = time.perf_counter()
    out = run_distill(cfg)
    wall = time.perf_counter() - t0
    if out.student_val_perplexity is None or out.baseline is None:
        raise RuntimeError("distill: a training run did not finish")
    return {
        "config": cfg.model_dump(mode="json"),
        "teacher_val_perplexity": out.teacher_val_perplexity,
        "student_val_perplexity": out.student_val_perplexity,
        "baseline_val_perplexity": out.baseline_val_perplexity,
        "student_vs_baseline": out.student_val_perplexity / out.baseline_val_perplexity,
        "student_training": train_tail(out.student.log_path, ("loss",)),
        "baseline_training": train_tail(out.baseline.log_path, ("loss",)),
        "wall_s": wall,
    }


def main_job_phase(phase: str, steps: int | None, console: Any) -> None:
    """The DPO or distillation job with the example config, its table and JSON."""
    with tempfile.TemporaryDirectory(prefix=f"bench-training-{phase}-") as tmp:
        console.print(f"[bold]{phase}[/]: examples/training/{phase}.yaml" + (
            f", {steps} steps" if steps is not None else ""
        ))  # fmt: skip
        if phase == "dpo":
            result = run_dpo_phase(Path(tmp), steps)
        else:
            result = run_distill_phase(Path(tmp), steps)
    if phase == "dpo":
        b, a = result["before"], result["after"]
        print_table(
            f"DPO, held-out pairs, {result['training']['steps']} steps (before = the start model)",
            ["held-out metric", "before", "after"],
            [
                ["preference accuracy", b["val_preference_accuracy"], a["val_preference_accuracy"]],
                ["DPO reward accuracy", b["val_reward_accuracy"], a["val_reward_accuracy"]],
                ["DPO loss", b["val_dpo_loss"], a["val_dpo_loss"]],
            ],
            console,
        )
        baseline = {"before (the starting checkpoint, policy = reference)": b}
    else:
        print_table(
            f"Distillation, {result['student_training']['steps']} steps, held-out perplexity",
            ["model", "val perplexity", "vs hard labels only"],
            [
                ["teacher", result["teacher_val_perplexity"], "-"],
                ["student, KL + hard labels", result["student_val_perplexity"],
                 result["student_vs_baseline"]],
                ["same student, hard labels only", result["baseline_val_perplexity"], 1.0],
            ],
            console,
        )  # fmt: skip
        baseline = {
            "same student, same init and batches, hard labels only (kl_weight 0), same run": {
                "val_perplexity": result["baseline_val_perplexity"]
            }
        }
    suffix = f"_{steps}steps" if steps is not None else ""
    path = write_result(
        f"bench_training_{phase}{suffix}", {"phase": phase, "steps_override": steps, **result},
        baseline=baseline,
    )  # fmt: skip
    console.print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per throughput set-up")
    parser.add_argument(
        "--phase",
        choices=("all", "speed", "balance", "dpo", "distill"),
        default="all",
        help="run one phase only (JSON: bench_training_<phase>.json); all = speed + balance",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="dpo/distill: optimiser steps instead of the example config's",
    )
    args = parser.parse_args()
    if args.steps is not None and (args.steps < 1 or args.phase not in ("dpo", "distill")):
        parser.error("--steps N (N >= 1) goes with --phase dpo or --phase distill")
    if args.phase in ("dpo", "distill"):
        main_job_phase(args.phase, args.steps, make_console())
        return
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
