"""Placement planner vs DeepSeek's EPLB: balance, cross-node bytes and planner run time.

    .venv/bin/python benchmarks/bench_placement.py [--quick]   # -> benchmarks/results/bench_placement.json

Both planners get the same load trace and the same slot budget (EPLB's physical slots: the
same number on every GPU, in every layer). Each GPU is one planner node. Balancedness is
max / mean node time of the cost model in `cluster/placement.py`: "equal speeds" counts
tokens only (what EPLB optimises), "speeds counted" divides by each node's speed and adds its
link time (what a step really waits for). EPLB is `cluster/eplb.py`, written from DeepSeek's
published description and vectorised over layers. vLLM's shipped EPLB
(`DefaultEplbPolicy.rebalance_experts`) runs on the same inputs in `.venv-vllm` (`make
venv-vllm`; its own process, since vLLM pins its own torch): its time, and whether its mapping
equals ours (ties may be broken differently: the most loaded GPU is compared too).

Load traces are synthetic per-layer log-normal expert loads (seeds fixed)
on DeepSeek-V3's routed-expert shape: 58 MoE layers x 256 experts, top-8, hidden 7168,
fp8 experts of 3 x 7168 x 2048 weights.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import VLLM_PYTHON, make_console, print_table, write_result

from expertmesh.cluster.eplb import rebalance_experts
from expertmesh.cluster.placement import (
    ExpertShape,
    NodeCapacity,
    PlacementOptions,
    evaluate,
    placement_from_eplb,
    plan_placement,
)

DEEPSEEK_V3 = ExpertShape(
    num_layers=58,
    num_experts=256,
    top_k=8,
    hidden_size=7168,
    expert_bytes=3 * 7168 * 2048,
    dtype_bytes=1,
)


def skewed_load(shape: ExpertShape, seed: int, sigma: float = 0.8) -> np.ndarray:
    """(layers, experts) token counts for 4096 tokens a step: log-normal expert popularity
    (sigma 0.8 puts the hottest expert of a layer at about 4-8x the mean, the spread
    DeepSeek-V3 and Mixtral routing traces show), a different draw per layer."""
    rng = np.random.default_rng(seed)
    p = rng.lognormal(0.0, sigma, size=(shape.num_layers, shape.num_experts))
    return p / p.sum(axis=1, keepdims=True) * 4096 * shape.top_k


EplbCase = tuple[np.ndarray, int, int, int, int]
"""EPLB's inputs: (load, physical slots per layer, groups, nodes, GPUs)."""

VLLM_EPLB_CHILD = """
import json, sys, time
import numpy as np, torch
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
cases = json.loads(sys.argv[2])
loads = np.load(sys.argv[1])
out = {}
for i, (R, groups, num_nodes, G, repeats) in enumerate(cases):
    weight = torch.from_numpy(loads[f"load{i}"])
    best, phy2log = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        phy2log = DefaultEplbPolicy.rebalance_experts(weight, R, groups, num_nodes, G)
        best = min(best, time.perf_counter() - t)
    out[f"phy2log{i}"] = phy2log.numpy()
    out[f"ms{i}"] = np.array(best * 1e3)
np.savez(sys.argv[3], **out)
"""


def gpu_max_load(phy2log: np.ndarray, load: np.ndarray, gpus: int) -> float:
    """EPLB's own objective for a phy2log: the most loaded GPU's tokens (each replica taking
    an equal share of its expert's), summed over layers."""
    L, R = phy2log.shape
    count = np.stack([np.bincount(row, minlength=load.shape[1]) for row in phy2log])
    rows = np.arange(L)[:, None]
    per_slot = load[rows, phy2log] / count[rows, phy2log]
    return float(per_slot.reshape(L, gpus, R // gpus).sum(axis=2).max(axis=1).sum())


def vllm_eplb_times(cases: list[EplbCase], repeats: int) -> list[tuple[float, np.ndarray]] | str:
    """vLLM's shipped EPLB (`DefaultEplbPolicy.rebalance_experts`, in `.venv-vllm`: vLLM's
    torch pins differ from ours) on each (load, slots, groups, nodes, GPUs) case: its best
    time of `repeats` in that process and its phy2log; or why it did not run."""
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} not found (`make venv-vllm`)"
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        loads, out = Path(tmp) / "loads.npz", Path(tmp) / "out.npz"
        arrays: dict[str, Any] = {f"load{i}": c[0] for i, c in enumerate(cases)}
        np.savez(loads, **arrays)
        spec = json.dumps([[*c[1:], repeats] for c in cases])
        proc = subprocess.run(
            [str(VLLM_PYTHON), "-c", VLLM_EPLB_CHILD, str(loads), spec, str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode:
            return "vLLM's EPLB failed: " + proc.stderr.strip().splitlines()[-1]
        got = np.load(out)
        return [(float(got[f"ms{i}"]), got[f"phy2log{i}"]) for i in range(len(cases))]


def best_time(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def scenario(
    name: str,
    speeds: list[float],
    gpus_per_node: int,
    slots_per_gpu: int,
    load: np.ndarray,
    shape: ExpertShape,
    repeats: int,
    link_gbps: float = 400.0,
) -> tuple[dict[str, Any], EplbCase, np.ndarray]:
    """The row, the inputs EPLB got (for vLLM's EPLB on the same) and EPLB's phy2log."""
    G = len(speeds)
    R = slots_per_gpu * G
    nodes = [
        NodeCapacity(f"gpu{i}", s, slots_per_gpu * shape.num_layers, link_gbps, 5.0)
        for i, s in enumerate(speeds)
    ]
    options = PlacementOptions(slot_budget=R * shape.num_layers)
    groups = 8
    num_nodes = G // gpus_per_node
    t_eplb, result = best_time(lambda: rebalance_experts(load, R, groups, num_nodes, G), repeats)
    t_ours, ours = best_time(lambda: plan_placement(nodes, shape, load, options), repeats)
    eplb = evaluate(placement_from_eplb(result, nodes, shape, load), nodes, shape, load, options)
    ev = evaluate(ours, nodes, shape, load, options)
    row: dict[str, Any] = {
        "scenario": name,
        "gpus": G,
        "slots_per_layer": R,
        "eplb_balancedness": eplb["balancedness"],
        "ours_balancedness": ev["balancedness"],
        "eplb_balancedness_equal_speed": eplb["balancedness_equal_speed"],
        "ours_balancedness_equal_speed": ev["balancedness_equal_speed"],
        "eplb_step_time_ms": eplb["step_time_s"] * 1e3,
        "ours_step_time_ms": ev["step_time_s"] * 1e3,
        "step_time_ratio": ev["step_time_s"] / eplb["step_time_s"],
        "eplb_cross_node_mb_per_token": eplb["cross_node_bytes_per_token"] / 1e6,
        "ours_cross_node_mb_per_token": ev["cross_node_bytes_per_token"] / 1e6,
        "eplb_plan_ms": t_eplb * 1e3,
        "ours_plan_ms": t_ours * 1e3,
        "plan_time_ratio": t_ours / t_eplb,
        "slots_over": ev["slots_over"],
    }
    return row, (load, R, groups, num_nodes, G), result.phy2log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats")
    args = parser.parse_args()
    shape = DEEPSEEK_V3
    repeats = 7
    if args.quick:
        shape = ExpertShape(8, 256, 8, 7168, 3 * 7168 * 2048, 1)
        repeats = 3
    half = lambda n: [1.0] * (n // 2) + [0.5] * (n // 2)  # noqa: E731
    cases = [
        ("identical 32", [1.0] * 32, 8, 9),
        ("identical 64", [1.0] * 64, 8, 5),
        ("half slower 32", half(32), 8, 9),
        ("half slower 64", half(64), 8, 5),
        ("4 speeds 32", [1.0, 0.75, 0.5, 0.25] * 8, 8, 9),
    ]
    rows, eplb_cases, eplb_maps = [], [], []
    for name, speeds, per_node, slots in tqdm(cases, desc="scenarios"):
        for seed in (0, 1):
            load = skewed_load(shape, seed)
            row, case, phy2log = scenario(name, speeds, per_node, slots, load, shape, repeats)
            row["seed"] = seed
            rows.append(row)
            eplb_cases.append(case)
            eplb_maps.append(phy2log)

    vllm = vllm_eplb_times(eplb_cases, repeats)
    if not isinstance(vllm, str):
        for r, (load, *_, G), ours_eplb, (ms, phy2log) in zip(rows, eplb_cases, eplb_maps, vllm):
            r["vllm_eplb_plan_ms"] = ms
            r["plan_time_vs_vllm_eplb"] = r["ours_plan_ms"] / ms
            r["vllm_eplb_same_phy2log"] = bool(np.array_equal(phy2log, ours_eplb))
            r["vllm_eplb_gpu_max_vs_ours"] = gpu_max_load(phy2log, load, G) / gpu_max_load(
                ours_eplb, load, G
            )

    console = make_console(160)
    print_table(
        f"Placement vs EPLB, {shape.num_layers} layers x {shape.num_experts} experts "
        "(balancedness = max/mean node time; lower is better, 1.0 is perfect)",
        [
            "scenario",
            "seed",
            "EPLB bal (speeds)",
            "ours bal (speeds)",
            "EPLB bal (equal)",
            "ours bal (equal)",
            "step time ours/EPLB",
            "EPLB MB/token",
            "ours MB/token",
            "EPLB plan ms",
            "ours plan ms",
            "plan time ours/EPLB",
        ],
        [
            [
                r["scenario"],
                r["seed"],
                r["eplb_balancedness"],
                r["ours_balancedness"],
                r["eplb_balancedness_equal_speed"],
                r["ours_balancedness_equal_speed"],
                r["step_time_ratio"],
                r["eplb_cross_node_mb_per_token"],
                r["ours_cross_node_mb_per_token"],
                r["eplb_plan_ms"],
                r["ours_plan_ms"],
                r["plan_time_ratio"],
            ]
            for r in rows
        ],
        console,
    )
    identical = [r for r in rows if r["scenario"].startswith("identical")]
    hetero = [r for r in rows if r["scenario"].startswith("half")]
    goals = {
        "identical_within_0.01_of_eplb": all(
            r["ours_balancedness"] <= r["eplb_balancedness"] + 0.01 for r in identical
        ),
        "half_slower_at_most_1.10": all(r["ours_balancedness"] <= 1.10 for r in hetero),
        "planner_no_slower_than_eplb": all(r["plan_time_ratio"] <= 1.0 for r in rows),
        "memory_never_exceeded": all(not r["slots_over"] for r in rows),
    }
    if isinstance(vllm, str):
        console.print(f"vLLM's shipped EPLB not timed: {vllm}")
    else:
        print_table(
            "vLLM's shipped EPLB (.venv-vllm, its own process, best of the same repeats)",
            [
                "scenario",
                "seed",
                "vLLM EPLB ms",
                "EPLB (ours) ms",
                "ours plan ms",
                "ours / vLLM EPLB",
                "same phy2log as cluster/eplb.py",
                "its max GPU load / ours",
            ],
            [
                [
                    r["scenario"],
                    r["seed"],
                    r["vllm_eplb_plan_ms"],
                    r["eplb_plan_ms"],
                    r["ours_plan_ms"],
                    r["plan_time_vs_vllm_eplb"],
                    r["vllm_eplb_same_phy2log"],
                    r["vllm_eplb_gpu_max_vs_ours"],
                ]
                for r in rows
            ],
            console,
        )
    console.print(
        "goals: " + ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in goals.items())
    )
    path = write_result(
        "bench_placement" + ("_quick" if args.quick else ""),
        {
            "quick": args.quick,
            "shape": shape.__dict__,
            "repeats": repeats,
            "rows": rows,
            "goals": goals,
        },
        baseline="EPLB (cluster/eplb.py) on the same load trace and slot budget, same run; "
        "vLLM's shipped EPLB (.venv-vllm) timed on the same inputs in the same run",
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
