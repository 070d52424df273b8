"""Expert-parallel model on the emulated 3-node mixed topology vs the single-process model.

    .venv/bin/python benchmarks/bench_cluster.py [--batch 8] [--max-tokens 32]   # -> benchmarks/results/bench_cluster.json

One run, same checkpoint (the bundled demo), same prompts, greedy: tokens/s of

- the single-process model (the baseline),
- the expert-parallel model on `examples/topologies/mixed.yaml` as an embedded Ray cluster,
  with node speeds and links emulated (sleeps, see `cluster/shard.py`),
- the same cluster with emulation off (what Ray dispatch itself costs on one machine),

and the time of one forward pass split into attention-side work (attention, norms, routers,
sampling: everything outside the dispatcher), expert compute on the slowest shard of each
layer (real + emulated slowdown), emulated link time of that shard, and dispatch (Ray calls,
serialisation, gather). Outputs are checked equal to the single-process model's.

Then live rebalancing on the emulated cluster: skewed traffic (repetitive prompts) drifts the
expert load; while a request streams, the rebalancer moves experts. Reported: bytes moved,
load time (serving continues), the routing-table swap (what a request can wait), and the
request's largest gap between tokens during the rebalance vs its median gap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from common import REPO_ROOT, make_console, median_times, print_table, write_result

from expertmesh.cluster.dispatch import DispatchStats
from expertmesh.cluster.rebalance import Rebalancer
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

TOPOLOGY = REPO_ROOT / "examples" / "topologies" / "mixed.yaml"
PROMPTS = [
    "ROMEO:",
    "JULIET:",
    "To be, or not to be",
    "Now is the winter of our discontent",
    "HAMLET:",
    "Friends, Romans, countrymen",
    "All the world's a stage",
    "KING LEAR:",
]


def breakdown(stats: DispatchStats, wall_s: float, moe_layers: int) -> dict[str, float]:
    """Milliseconds per forward pass: attention side, slowest-shard compute, link, dispatch."""
    passes = max(stats.steps // moe_layers, 1)
    dispatch = stats.wall_s - stats.slowest_compute_s - stats.slowest_link_s
    return {
        "forward_passes": passes,
        "ms_per_pass": wall_s / passes * 1e3,
        "attention_side_ms": (wall_s - stats.wall_s) / passes * 1e3,
        "expert_compute_ms": stats.slowest_compute_s / passes * 1e3,
        "emulated_link_ms": stats.slowest_link_s / passes * 1e3,
        "dispatch_ms": dispatch / passes * 1e3,
        "bytes_over_links_per_pass": stats.bytes_sent / passes,
    }


def rebalance(ep: ExpertParallelModel, topology: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    """Drift the load with skewed traffic, then rebalance while one request streams."""
    gen = Generator(ep.model, tokenizer)
    ep.dispatcher.stats = DispatchStats()
    gen.generate([[7] * 48, [7, 8] * 24, [9] * 48], SamplingParams(max_tokens=16, ignore_eos=True))
    rebalancer = Rebalancer(ep, topology, threshold=1.05, min_tokens=1)
    stamps: list[float] = []
    started = threading.Event()

    def stream() -> None:
        def on_token(event: Any) -> None:
            stamps.append(time.perf_counter())
            started.set()

        gen.generate(["ROMEO:"], SamplingParams(max_tokens=64, ignore_eos=True), on_token=on_token)

    thread = threading.Thread(target=stream)
    thread.start()
    started.wait()
    t0 = time.perf_counter()
    report = rebalancer.check()
    t1 = time.perf_counter()
    thread.join()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    during = [b - a for a, b in itertools.pairwise(stamps) if b >= t0 and a <= t1]
    return {
        "applied": report.applied,
        "balancedness_before": report.balancedness_before,
        "balancedness_after": report.balancedness_after,
        "step_time_before_ms": report.step_time_before_s * 1e3,
        "step_time_after_ms": report.step_time_after_s * 1e3,
        "moves": report.moves,
        "bytes_moved": report.bytes_moved,
        "plan_ms": report.plan_s * 1e3,
        "load_ms": report.load_s * 1e3,
        "swap_pause_ms": report.pause_s * 1e3,
        "drop_ms": report.drop_s * 1e3,
        "median_token_gap_ms": statistics.median(gaps) * 1e3,
        "max_token_gap_during_rebalance_ms": max(during, default=0.0) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = make_console(140)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    topology = load_topology(TOPOLOGY)

    single = Generator(load_model(DEMO_MODEL_DIR), tokenizer)
    expected = [c.text for c in single.generate(prompts, params)]
    tokens = args.batch * args.max_tokens

    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for label, emulate in (("emulated links and speeds", True), ("no emulation", False)):
        console.print(f"starting the embedded cluster ({label})...")
        with ExpertParallelModel.launch(DEMO_MODEL_DIR, topology, emulate=emulate) as ep:
            gen = Generator(ep.model, tokenizer)
            texts = [c.text for c in gen.generate(prompts, params)]
            ep.dispatcher.stats = DispatchStats()
            timed = median_times(
                {
                    "single": lambda: single.generate(prompts, params),
                    "cluster": lambda gen=gen: gen.generate(prompts, params),
                },
                repeats=args.repeats,
                warmup=0,
            )
            stats = replace(ep.dispatcher.stats)
            split = breakdown(stats, sum(timed["cluster"].times_s), len(ep.config.moe_layer_ids))
            held = {n: len(ep.placement.experts_on(n)) for n in ep.placement.nodes}
            if emulate:
                results["rebalance"] = rebalance(ep, topology, tokenizer)
        row = {
            "cluster": label,
            "single_tokens_per_s": tokens / timed["single"].median_s,
            "cluster_tokens_per_s": tokens / timed["cluster"].median_s,
            "ratio": timed["single"].median_s / timed["cluster"].median_s,
            "same_text": texts == expected,
            "experts_held": held,
            **split,
        }
        rows.append(row)
        results[label] = row
        time.sleep(1.0)  # let the previous cluster's processes exit

    print_table(
        f"Demo model, batch {args.batch}, {args.max_tokens} new tokens, topology mixed "
        "(ratio = cluster tokens/s over single-process tokens/s, same run)",
        ["cluster", "single tok/s", "cluster tok/s", "ratio", "same text"],
        [
            [
                r["cluster"],
                r["single_tokens_per_s"],
                r["cluster_tokens_per_s"],
                r["ratio"],
                r["same_text"],
            ]
            for r in rows
        ],
        console,
    )
    print_table(
        "One forward pass of the cluster model, ms",
        ["cluster", "total", "attention side", "expert compute", "emulated link", "dispatch"],
        [
            [
                r["cluster"],
                r["ms_per_pass"],
                r["attention_side_ms"],
                r["expert_compute_ms"],
                r["emulated_link_ms"],
                r["dispatch_ms"],
            ]
            for r in rows
        ],
        console,
    )
    rb = results.get("rebalance")
    if rb is not None:
        print_table(
            "Live rebalance under skewed load, emulated cluster (a request streams meanwhile)",
            [
                "applied",
                "predicted step ms before -> after",
                "moves",
                "bytes moved",
                "plan ms",
                "load ms",
                "swap pause ms",
                "median token gap ms",
                "max gap during rebalance ms",
            ],
            [
                [
                    rb["applied"],
                    f"{rb['step_time_before_ms']:.2f} -> {rb['step_time_after_ms']:.2f}",
                    rb["moves"],
                    rb["bytes_moved"],
                    rb["plan_ms"],
                    rb["load_ms"],
                    rb["swap_pause_ms"],
                    rb["median_token_gap_ms"],
                    rb["max_token_gap_during_rebalance_ms"],
                ]
            ],
            console,
        )
    path = write_result(
        "bench_cluster",
        {
            "rebalance": rb,
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "topology": str(TOPOLOGY.relative_to(REPO_ROOT)),
            "rows": rows,
        },
        baseline="the single-process model (same checkpoint, prompts, greedy), timed "
        "interleaved with the cluster in the same run",
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
