"""Placements measured on the rig: real links (tc), real node speeds (CPU quotas), no sleeps.

    .venv/bin/python benchmarks/bench_rig.py [--max-tokens 16] [--batches 8 32]
        # as root -> benchmarks/results/bench_rig.json

For `examples/topologies/mixed.yaml` and `two-racks.yaml`: bring the rig up (`cluster/rig`),
calibrate it (declared vs measured speed per node, bandwidth and round trip per link), then
generate greedily with the demo model at batch 8 and 32 under four set-ups, all with this
process as the attention worker inside the attention node's namespace and CPU group:

- `attention_node_alone` (the baseline): the whole model in this process, no Ray, at the
  attention node's CPU quota: what the attention node does without a cluster;
- `ours`: the planner's placement on the *measured* topology;
- `eplb`: DeepSeek EPLB's placement (every node with slots as one of its GPUs);
- `attention_only`: every expert once, on the attention node's shard (the dispatch path with
  no link crossed).

tok/s = batch x new tokens / wall time of one `generate` (prefill included), median of
`--repeats`. Every set-up's texts must equal the baseline's. The rig goes down at the end
(also on failure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

from expertmesh.cluster.planning import baseline_placement, plan_for_topology
from expertmesh.cluster.rig.rig import driver, launch_placement, rig_down, rig_up, startup_window
from expertmesh.cluster.rig.system import check_support
from expertmesh.cluster.topology import load_topology, parse_topology
from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

TOPOLOGIES = ("mixed.yaml", "two-racks.yaml")
SETUPS = ("attention_node_alone", "ours", "eplb", "attention_only")
PROMPTS = [
    "ROMEO:",
    "JULIET:",
    "To be, or not to be",
    "Now is the winter of our discontent",
    "What light through yonder window breaks",
    "Friends, Romans, countrymen",
    "All the world's a stage",
    "Once more unto the breach",
]


def prompts(batch: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}" + " ." * (i // len(PROMPTS)) for i in range(batch)]


def timed(model: Any, tok: Tokenizer, batch: int, params: SamplingParams, repeats: int):  # type: ignore[no-untyped-def]
    gen = Generator(model, tok)
    gen.generate(prompts(batch)[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    times, texts = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(prompts(batch), params)
        times.append(time.perf_counter() - t0)
        texts = [c.text for c in out]
    times.sort()
    return times[len(times) // 2], texts


def stop_shards(ep: Any) -> None:
    import ray

    for handle in [*ep.pool.handles.values(), *ep.pool.standbys.values()]:
        ray.kill(handle)


def run_topology(name: str, args: argparse.Namespace, console: Any) -> dict[str, Any]:
    path = REPO_ROOT / "examples" / "topologies" / name
    declared = load_topology(path)
    config = read_config(DEMO_MODEL_DIR)
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    console.print(f"[bold]{name}[/bold]: bringing the rig up...")
    state = rig_up(
        declared, str(path), shape=(64, config.hidden_size, config.moe.expert_intermediate)
    )
    try:
        cal = state.calibration or {}
        measured = parse_topology(state.measured_topology or {})
        rows: list[dict[str, Any]] = []
        with driver(state):
            reference: dict[int, list[str | None]] = {}
            model = load_model(DEMO_MODEL_DIR)
            for batch in args.batches:
                s, texts = timed(model, tok, batch, params, args.repeats)
                reference[batch] = texts
                rows.append(row("attention_node_alone", name, batch, s, args, True))
            placements = {
                "ours": plan_for_topology(measured, config),
                "eplb": baseline_placement("eplb", measured, config),
                "attention_only": baseline_placement("attention_only", measured, config),
            }
            for setup, placement in placements.items():
                with startup_window(state):
                    ep = launch_placement(DEMO_MODEL_DIR, measured, placement, "float32")
                try:
                    for batch in args.batches:
                        s, texts = timed(ep.model, tok, batch, params, args.repeats)
                        same = texts == reference[batch]
                        r = row(setup, name, batch, s, args, same)
                        r["nodes_used"] = sorted(
                            n.name for n in measured.nodes if placement.experts_on(n.name)
                        )
                        rows.append(r)
                finally:
                    stop_shards(ep)
        return {"calibration": cal, "throughput": rows, "up_s": cal.get("up_s")}
    finally:
        rig_down()


def row(
    setup: str, topology: str, batch: int, s: float, args: argparse.Namespace, same: bool
) -> dict[str, Any]:
    return {
        "placement": setup,
        "topology": topology.removesuffix(".yaml"),
        "batch": batch,
        "tok_s": batch * args.max_tokens / s,
        "seconds": s,
        "greedy_identical": same,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    args = parser.parse_args()
    check_support()
    console = make_console()
    links, nodes, throughput, up = [], [], [], {}
    for name in args.topologies:
        result = run_topology(name, args, console)
        topo = name.removesuffix(".yaml")
        up[topo] = result["up_s"]
        for link in result["calibration"]["links"]:
            links.append({"topology": topo, **link})
        for node in result["calibration"]["nodes"]:
            nodes.append({"topology": topo, **node})
        base = {r["batch"]: r["tok_s"] for r in result["throughput"] if r["placement"] == SETUPS[0]}
        for r in result["throughput"]:
            r["vs_attention_node_alone"] = r["tok_s"] / base[r["batch"]]
        throughput += result["throughput"]
    print_table(
        "links: declared, rig rate (declared x scale), measured",
        [
            "topology",
            "pair",
            "declared Gbit/s",
            "rig Gbit/s",
            "measured Gbit/s",
            "measured/rig",
            "declared latency us",
            "measured RTT us",
        ],
        [
            [
                k["topology"],
                f"{k['a']}-{k['b']}",
                k["declared_gbps"],
                k["rig_rate_gbps"],
                k["measured_gbps"],
                k["measured_gbps"] / k["rig_rate_gbps"],
                k["declared_latency_us"],
                k["rtt_us"],
            ]
            for k in links
        ],
        console,
    )
    print_table(
        "nodes: declared vs measured speed (expert GEMM under the node's CPU quota)",
        [
            "topology",
            "node",
            "CPU cores",
            "declared speed",
            "GFLOP/s",
            "measured speed",
            "call RTT us",
        ],
        [
            [
                n["topology"],
                n["name"],
                n["cpu_cores"],
                n["declared_speed"],
                n["gflops"],
                n["measured_speed"],
                n["call_rtt_us"],
            ]
            for n in nodes
        ],
        console,
    )
    print_table(
        "throughput (greedy, demo model): tok/s and ratio vs the attention node alone",
        ["topology", "batch", "placement", "tok/s", "vs alone", "identical"],
        [
            [
                r["topology"],
                r["batch"],
                r["placement"],
                r["tok_s"],
                r["vs_attention_node_alone"],
                r["greedy_identical"],
            ]
            for r in throughput
        ],
        console,
    )
    identical = all(r["greedy_identical"] for r in throughput)
    path = write_result(
        "bench_rig",
        {
            "links": links,
            "nodes": nodes,
            "throughput": throughput,
            "rig_up_s": up,
            "greedy_identical": identical,
            "max_tokens": args.max_tokens,
            "latency": "not emulated (no netem in this kernel): measured round trip only",
        },
        baseline="attention_node_alone: the whole model in one process at the attention node's "
        "CPU quota, measured in the same run on the same rig",
    )
    console.print(f"wrote {path}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
