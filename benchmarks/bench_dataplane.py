"""The expert-parallel data plane: transport round trip, wire formats, overlap, throughput.

    .venv/bin/python benchmarks/bench_dataplane.py [--batches 8 32] [--max-tokens 16]
        [--topologies mixed two-racks] [--repeats 3] [--rig]

One process run, the bundled demo model, greedy, everything measured here:

1. `dispatch_roundtrip_us`: a zero-compute round trip of one MoE layer (decode-size rows to
   every node that holds experts, echoed back) through one Ray actor task per node (today's
   path), a Ray Compiled Graph over the same shard actors, and our persistent channels.
2. Wire formats on the fp32 demo: each format's relative error on real activations (vs fp32)
   and the greedy token-match rate against one process; the bf16 model over the bf16 wire
   (identical output expected).
3. `throughput` (tok/s) per topology and batch: `attention_node_alone` (the whole model in
   this one process: the baseline), `ours` (our placement, channels, overlap on auto),
   `ours_no_overlap`, `eplb` (EPLB's placement on the same data plane); outputs compared.
4. `overlap_fraction`: link and expert time hidden / total, from the time the attention
   worker waited for shards with overlap forced on vs off (same batch, same run).
5. `prediction_error` per node: the planner's per-node time (scaled linearly from its
   tokens_per_step to the tokens served) vs the shards' measured busy time.

Without `--rig` this is the embedded cluster (`ray.cluster_utils.Cluster`): every node shares
this machine's CPU, slower nodes and links are emulated by sleeping (`cluster/shard.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import REPO_ROOT, make_console, median_times, print_table, write_result

from expertmesh.cluster.dispatch import DispatchStats, PoolTransport
from expertmesh.cluster.planning import baseline_placement
from expertmesh.cluster.pool import RayShardPool
from expertmesh.cluster.profile import CallLog, replan_measured
from expertmesh.cluster.runtime import ExpertParallelModel, routes_from_placement
from expertmesh.cluster.topology import load_topology
from expertmesh.cluster.transport import ChannelTransport
from expertmesh.cluster.wire import WIRE_FORMATS, ShardRequest, pack, unpack, wire_for
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_dir(DEMO_MODEL_DIR)
TOPOLOGIES = REPO_ROOT / "examples" / "topologies"
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


# ----------------------------------------------------------------------------- 1. round trip


def echo_requests(ep: ExpertParallelModel, rows: int) -> dict[str, ShardRequest]:
    """What one decode layer call sends each node, echoed back instead of computed: every
    node that runs a shard (empty ones included: the harder case than the nodes with work)."""
    nodes = sorted(getattr(ep.pool, "handles", {}) or ep.dispatcher.table.nodes)
    x = torch.randn(rows, ep.config.hidden_size)
    req = ShardRequest(
        ep.config.moe_layer_ids[0],
        pack(x, "fp32"),
        np.arange(rows, dtype=np.int32),
        np.zeros(rows, dtype=np.int32),
        echo=True,
    )
    return dict.fromkeys(nodes, req)


def transport_roundtrip_us(transport: Any, requests: dict[str, ShardRequest], n: int) -> float:
    def once() -> None:
        for _, got in transport.replies(transport.send(requests)):
            assert not isinstance(got, Exception), got

    for _ in range(20):
        once()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def compiled_graph_roundtrip_us(
    ep: ExpertParallelModel, requests: dict[str, ShardRequest], n: int
) -> float | str:
    """The same echo through a Ray Compiled Graph bound to the shard actors."""
    import ray
    from ray.dag import InputNode, MultiOutputNode

    pool: Any = ep.pool
    nodes = list(requests)
    try:
        with InputNode() as inp:
            dag = MultiOutputNode(
                [pool.handles[node].compute_request.bind(inp[i]) for i, node in enumerate(nodes)]
            )
        compiled = dag.experimental_compile()
    except Exception as e:  # recorded, not hidden: why compiled graphs are not the default
        return f"failed: {type(e).__name__}: {e}"[:300]
    try:
        args = [requests[node] for node in nodes]
        for _ in range(20):
            ray.get(compiled.execute(*args))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(compiled.execute(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    except Exception as e:  # e.g. its channels time out across the rig's namespaces
        return f"failed: {type(e).__name__}: {e}"[:300]
    finally:
        with contextlib.suppress(Exception):
            compiled.teardown()


def roundtrips(ep: ExpertParallelModel, rows: int, n: int) -> dict[str, Any]:
    requests = echo_requests(ep, rows)
    out: dict[str, Any] = {"nodes": list(requests), "rows_per_node": rows}
    spin_us = spin_of(ep.pool)
    channel = ChannelTransport(ep.pool, spin_us=spin_us)
    out["actor_call"] = transport_roundtrip_us(PoolTransport(ep.pool), requests, n)
    out["channel"] = transport_roundtrip_us(channel, requests, n)
    out["channel_spin_us"] = spin_us
    if spin_us:  # the same channels, the attention side sleeping in select at once
        channel.spin_s = 0.0
        out["channel_no_spin"] = transport_roundtrip_us(channel, requests, n)
    out["compiled_graph"] = compiled_graph_roundtrip_us(ep, requests, n)
    channel.close()
    return out


def spin_of(pool: Any) -> float:
    """The reply polling the data plane uses on this pool (a colocated pool's remote part)."""
    return float(getattr(getattr(pool, "remote", pool), "spin_us", 0.0))


# ----------------------------------------------------------------------------- 2. wire


def capture_rows(ep: ExpertParallelModel, prompts: list[str], params: SamplingParams) -> list:
    """The activations the dispatcher sends during one generate (what the wire carries)."""
    seen: list[torch.Tensor] = []
    start = ep.dispatcher.start

    def recording(layer: int, x: torch.Tensor, *rest: Any) -> Any:
        seen.append(x.detach().clone())
        return start(layer, x, *rest)

    ep.dispatcher.start = recording  # type: ignore[method-assign]
    try:
        Generator(ep.model, TOKENIZER).generate(prompts, params)
    finally:
        del ep.dispatcher.start
    return seen


def wire_formats(
    ep: ExpertParallelModel, prompts: list[str], params: SamplingParams, want: list[list[int]]
) -> dict[str, Any]:
    rows = torch.cat(capture_rows(ep, prompts, params))
    out: dict[str, Any] = {}
    before = ep.dispatcher.wire
    for fmt in WIRE_FORMATS:
        back = unpack(pack(rows, fmt), torch.float32)
        rel = float((back - rows).norm() / rows.norm())
        ep.dispatcher.wire = fmt
        ep.dispatcher.stats = DispatchStats()
        got = [c.token_ids for c in Generator(ep.model, TOKENIZER).generate(prompts, params)]
        same = [a == b for g, w in zip(got, want) for a, b in zip(g, w)]
        out[fmt] = {
            "activation_rel_error": rel,
            "token_match_rate": sum(same) / max(len(same), 1),
            "identical_rows": sum(g == w for g, w in zip(got, want)) / len(want),
            "bytes_per_token": ep.dispatcher.stats.bytes_sent / max(sum(len(g) for g in got), 1),
        }
    ep.dispatcher.wire = before
    return out


def bf16_identical(
    ep: ExpertParallelModel, prompts: list[str], params: SamplingParams, emulate: bool
) -> dict[str, Any]:
    """The bf16 model over the bf16 wire ('auto') on the same cluster vs one bf16 process."""
    single = Generator(load_model(DEMO_MODEL_DIR, "bfloat16"), TOKENIZER)
    want = [c.token_ids for c in single.generate(prompts, params)]
    assignment = ep.dispatcher.table.node_experts()
    pool = RayShardPool(
        str(DEMO_MODEL_DIR), assignment, "bfloat16", namespace_prefix="bench-bf16", standby=False
    )
    try:
        bf = ExpertParallelModel.from_routes(
            DEMO_MODEL_DIR, ep.dispatcher.table.routes, pool, "bfloat16"
        )
        got = [c.token_ids for c in Generator(bf.model, TOKENIZER).generate(prompts, params)]
        wire = wire_for(bf.dispatcher.wire, torch.bfloat16)
    finally:
        _kill(pool)
    return {"wire": "auto (bf16 for a bf16 model)", "identical": got == want, "resolved": wire}


def _kill(pool: Any) -> None:
    import ray

    for handle in [*pool.handles.values(), *pool.standbys.values()]:
        ray.kill(handle, no_restart=True)


# ----------------------------------------------------------------------------- 3-5. throughput


class CallTimes(CallLog):
    """`CallLog` (each call's rows and time per node: a remote node's round trip from the send
    to the reply's arrival, the attention node's own experts' compute) beside what the
    planner's cost model predicts for the same calls: rows x the node's cost per
    token-assignment, plus its per-call latency (`cluster/placement_model.py`)."""

    def __init__(self, cost: Any, names: list[str]) -> None:
        local = [n for n, c in zip(names, cost.colocated.tolist()) if c and cost.in_process]
        super().__init__(local)
        self.cost = cost
        self.index = {n: i for i, n in enumerate(names)}

    def take(self) -> dict[str, dict[str, float]]:
        """The report of the calls so far, and start afresh."""
        out = self.report()
        self.clear()
        return out

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for node, (calls, rows, measured) in self.measured().items():
            i = self.index[node]
            cost = self.cost
            predicted = rows * float(cost.token_s[i]) + calls * float(cost.latency_s[i])
            out[node] = {
                "calls": calls,
                "rows": rows,
                "measured_us_per_call": measured / calls * 1e6,
                "predicted_us_per_call": predicted / calls * 1e6,
                "error": predicted / measured - 1,
            }
        return out


def cost_for(ep: ExpertParallelModel, topology: Any) -> tuple[Any, list[str]]:
    """The cost model the placement was planned with (the measured topology on a rig)."""
    from expertmesh.cluster.placement_model import cost_model
    from expertmesh.cluster.planning import planner_inputs

    opts = ep.plan_options
    nodes, shape, options = planner_inputs(
        topology,
        ep.config,
        reference_tflops=opts.reference_tflops,
        colocate=opts.colocate,
        tokens_per_step=opts.tokens_per_step,
        measured=ep.node_costs or None,
    )
    return cost_model(nodes, shape, options), [n.name for n in nodes]


def eplb_model(ep: ExpertParallelModel, topology: Any, emulation: Any) -> ExpertParallelModel:
    """EPLB's placement on the same data plane (the attention node's share in this process
    too when ours runs it there)."""
    opts = ep.plan_options
    placement = baseline_placement(
        "eplb",
        topology,
        ep.config,
        reference_tflops=opts.reference_tflops,
        colocate=opts.colocate,
        tokens_per_step=opts.tokens_per_step,
        measured=ep.node_costs or None,
    )
    routes = routes_from_placement(placement)
    from expertmesh.cluster.colocated import ColocatedPool, local_shard
    from expertmesh.cluster.dispatch import RoutingTable

    held = RoutingTable(routes).node_experts()
    head = topology.attention_nodes[0].name
    pool: Any = RayShardPool(
        str(DEMO_MODEL_DIR),
        {n: e for n, e in held.items() if not (opts.colocate and n == head)},
        emulation=emulation,
        namespace_prefix="bench-eplb",
        standby=False,
        spin_us=spin_of(ep.pool),
    )
    if opts.colocate:
        shard = local_shard(head, str(DEMO_MODEL_DIR), held.get(head, {}), "float32", "cpu")
        pool = ColocatedPool(pool, head, shard)
    return ExpertParallelModel.from_routes(DEMO_MODEL_DIR, routes, pool, placement=placement)


@contextlib.contextmanager
def cluster_for(
    name: str,
    rig: bool,
    colocate: bool = True,
    tokens_per_step: int | None = None,
    profile: bool = True,
) -> Iterator[tuple[ExpertParallelModel, Any, Any]]:
    """(model, per-node emulation or None, topology the planner read) on the embedded cluster,
    or on a rig (`cluster/rig`: namespaces, tc links, CPU quotas; nothing sleeps) brought up
    for this topology and taken down after; this process is then the driver on the
    attention node, in its CPU group, so the single-process baseline runs there too."""
    from expertmesh.cluster.local import emulation_for

    path = TOPOLOGIES / f"{name}.yaml"
    topology = load_topology(path)
    plan = {"colocate": colocate, "tokens_per_step": tokens_per_step, "profile": profile}
    if not rig:
        with ExpertParallelModel.launch(DEMO_MODEL_DIR, topology, **plan) as ep:
            yield ep, emulation_for(topology), topology
        return
    from expertmesh.cluster.rig.rig import driver, measured_topology, rig_down, rig_up

    state = rig_up(topology, str(path))
    try:
        with driver(state):
            measured = measured_topology(state)
            ep = ExpertParallelModel.launch(
                DEMO_MODEL_DIR, measured, local=False, emulate=False, **plan
            )
            yield ep, None, measured
    finally:
        rig_down()


def run_topology(
    name: str, args: argparse.Namespace, single: Generator, console: Any
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    out: dict[str, Any] = {"throughput": [], "same_output": {}}
    console.print(f"[{name}] starting the {'rig' if args.rig else 'embedded cluster'}...")
    with cluster_for(name, args.rig, args.colocate, max(args.batches), args.profile) as (
        ep,
        emulation,
        topology,
    ):
        eplb = eplb_model(ep, topology, emulation)
        ours_gen, eplb_gen = Generator(ep.model, TOKENIZER), Generator(eplb.model, TOKENIZER)
        policy = ep.model.overlap_policy  # type: ignore[attr-defined]
        out["placement_profiled"] = {n: len(ep.placement.experts_on(n)) for n in ep.placement.nodes}
        if args.refine and args.profile:
            # Costs measured under real traffic (the planned batch, overlap off), then the
            # plan made again on them: what a running cluster's rebalancer does. Each round
            # measures the nodes the last plan used; what earlier rounds measured stays.
            out["node_costs_profiled"] = {n: c.to_dict() for n, c in ep.node_costs.items()}
            out["placement_rounds"] = []
            batch = max(args.batches)
            for round_ in range(args.refine_rounds):
                log = CallLog(local=getattr(ep.pool, "local_nodes", ()))
                ep.dispatcher.observers.append(log)
                policy.mode = "off"
                for _ in range(args.refine):
                    ours_gen.generate((PROMPTS * (batch // len(PROMPTS) + 1))[:batch], params)
                policy.mode = "auto"
                ep.dispatcher.observers.remove(log)
                before = {n: len(ep.placement.experts_on(n)) for n in ep.placement.nodes}
                replan_measured(ep, log.fit(prior=ep.node_costs))
                after = {n: len(ep.placement.experts_on(n)) for n in ep.placement.nodes}
                out["placement_rounds"].append(after)
                console.print(
                    f"[{name}] round {round_ + 1}: re-planned on costs measured in "
                    f"{args.refine} passes: {after}"
                )
                if after == before:
                    break
        out["placement"] = {
            "ours": {n: len(ep.placement.experts_on(n)) for n in ep.placement.nodes},
            "eplb": {n: len(eplb.placement.experts_on(n)) for n in eplb.placement.nodes},
        }
        cost, names = cost_for(ep, topology)
        calls = CallTimes(cost, names)
        ep.dispatcher.observers.append(calls)
        eplb_calls = CallTimes(cost, names)
        eplb.dispatcher.observers.append(eplb_calls)
        for batch in args.batches:
            prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
            want = [c.token_ids for c in single.generate(prompts, params)]

            def ours(mode: str, prompts: list[str] = prompts) -> list[list[int]]:
                policy.mode = mode
                return [c.token_ids for c in ours_gen.generate(prompts, params)]

            timed = median_times(
                {
                    "attention_node_alone": lambda p=prompts: [
                        c.token_ids for c in single.generate(p, params)
                    ],
                    "ours": lambda: ours("auto"),
                    "ours_no_overlap": lambda: ours("off"),
                    "eplb": lambda p=prompts: [c.token_ids for c in eplb_gen.generate(p, params)],
                },
                repeats=args.repeats,
                warmup=1,
            )
            tokens = batch * args.max_tokens
            console.print(
                f"[{name}] batch {batch}: "
                + ", ".join(f"{k} {tokens / t.median_s:.0f} tok/s" for k, t in timed.items())
            )
            for setup, t in timed.items():
                out["throughput"].append(
                    {"setup": setup, "topology": name, "batch": batch, "tok_s": tokens / t.median_s}
                )
                out["same_output"][f"{setup}@{batch}"] = t.result == want
            out.setdefault("prediction_by_batch", {})[str(batch)] = {
                "ours": calls.take(),
                "eplb": eplb_calls.take(),
            }
            # Overlap fraction: wait for shards per pass, forced on vs off.
            waits = {}
            for mode in ("off", "on"):
                ep.dispatcher.stats = DispatchStats()
                ours(mode)
                waits[mode] = ep.dispatcher.stats.wait_s
            out.setdefault("overlap", {})[str(batch)] = {
                "wait_s_off": waits["off"],
                "wait_s_on": waits["on"],
                "overlap_fraction": 1 - waits["on"] / waits["off"] if waits["off"] else 0.0,
                "auto_passes_on": policy.passes_on,
                "auto_passes_off": policy.passes_off,
            }
            policy.mode = "auto"
        calls.take(), eplb_calls.take()  # the overlap runs above are not a throughput run
        planned = out["prediction_by_batch"][str(max(args.batches))]
        out["prediction_error"] = planned["ours"]  # at the batch the plan was made for
        out["prediction_error_eplb"] = planned["eplb"]
        opts = ep.plan_options
        out["node_costs"] = {n: c.to_dict() for n, c in ep.node_costs.items()}
        out["cost_model"] = {
            "tokens_per_step": opts.tokens_per_step,
            "reference_tflops": opts.reference_tflops,
            "call_overhead_us": opts.call_overhead_us,
            "colocate": opts.colocate,
            "token_us": dict(zip(names, (cost.token_s * 1e6).tolist())),
            "latency_us": dict(zip(names, (cost.latency_s * 1e6).tolist())),
        }
        out["prediction_note"] = (
            "per layer call and node, over every call of the throughput runs: measured = a "
            "remote node's round trip from send to the reply's arrival, the attention node's "
            "own experts' compute; predicted = the planner's cost model for the rows the call "
            "carried (rows x cost per token-assignment + link latency); error = predicted / "
            "measured - 1"
        )
        if name == "mixed":
            console.print(f"[{name}] transport round trips...")
            # On EPLB's placement: experts on every node, so every layer crosses the links
            # (ours may keep a layer whole in this process, where no wire is used).
            out["dispatch_roundtrip_us"] = roundtrips(eplb, rows=args.roundtrip_rows, n=args.iters)
            prompts = PROMPTS[:8]
            want = [c.token_ids for c in single.generate(prompts, params)]
            console.print(f"[{name}] wire formats...")
            out["wire"] = wire_formats(eplb, prompts, params, want)
            out["wire_placement"] = "eplb (every node holds experts)"
            out["bf16_model"] = bf16_identical(eplb, prompts, params, True)
        _kill(eplb.pool)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--topologies", nargs="+", default=["mixed", "two-racks"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=300, help="round trips timed per transport")
    parser.add_argument("--rig", action="store_true", help="on a rig (cluster/rig), as root")
    parser.add_argument("--name", help="results file stem (default bench_dataplane[_rig])")
    parser.add_argument("--roundtrip-rows", type=int, default=6, help="rows per node (decode)")
    parser.add_argument(
        "--refine",
        type=int,
        default=2,
        help="generate passes whose measured call costs the plan is made again on (0: none)",
    )
    parser.add_argument(
        "--refine-rounds",
        type=int,
        default=1,
        help="measure-and-re-plan rounds (stops early once a round keeps the plan; 3 rounds "
        "measured no better than 1 on two-racks, benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="plan on the modelled costs only (no profile of real layer calls first)",
    )
    parser.add_argument(
        "--no-colocate",
        dest="colocate",
        action="store_false",
        help="run the attention node's experts on a shard actor too (not in this process)",
    )
    args = parser.parse_args()
    console = make_console(140)
    torch.manual_seed(0)
    single = Generator(load_model(DEMO_MODEL_DIR), TOKENIZER)
    results: dict[str, Any] = {"throughput": [], "topologies": {}}
    for name in args.topologies:
        got = run_topology(name, args, single, console)
        results["throughput"] += got.pop("throughput")
        results["topologies"][name] = got
        time.sleep(1.0)
    mixed = results["topologies"].get("mixed", {})
    rt = mixed.get("dispatch_roundtrip_us", {})
    results["dispatch_roundtrip_us"] = rt.get("channel")
    results["dispatch_roundtrip_baseline_us"] = {
        k: rt.get(k) for k in ("actor_call", "compiled_graph")
    }
    results["overlap_fraction"] = {
        f"{name}@{b}": o["overlap_fraction"]
        for name, t in results["topologies"].items()
        for b, o in t.get("overlap", {}).items()
    }
    results["prediction_error"] = {
        name: {n: e["error"] for n, e in t.get("prediction_error", {}).items()}
        for name, t in results["topologies"].items()
    }
    results["colocate"] = args.colocate
    results["profile"] = args.profile
    results["setting"] = (
        "rig (cluster/rig): one Ray node per topology node in its own network namespace, "
        "links limited by tc, node speed by CPU quota; nothing sleeps"
        if args.rig
        else "embedded cluster (ray.cluster_utils.Cluster) on this machine: all nodes share "
        "its CPU; node speeds and links emulated by sleeping"
    )
    results["outputs_identical"] = all(
        all(t["same_output"].values()) for t in results["topologies"].values()
    )
    base = {
        (e["topology"], e["batch"]): e["tok_s"]
        for e in results["throughput"]
        if e["setup"] == "attention_node_alone"
    }
    eplb = {
        (e["topology"], e["batch"]): e["tok_s"]
        for e in results["throughput"]
        if e["setup"] == "eplb"
    }
    print_table(
        "Throughput, tok/s (ratio vs the attention node alone / vs EPLB, same run)",
        ["topology", "batch", "setup", "tok/s", "x alone", "x eplb"],
        [
            [
                e["topology"],
                e["batch"],
                e["setup"],
                e["tok_s"],
                e["tok_s"] / base[(e["topology"], e["batch"])],
                e["tok_s"] / eplb[(e["topology"], e["batch"])],
            ]
            for e in results["throughput"]
        ],
        console,
    )
    print_table(
        f"Planner's cost model vs measured, per layer call at batch {max(args.batches)} (the batch planned for)",
        [
            "topology",
            "placement",
            "node",
            "calls",
            "rows/call",
            "measured us",
            "predicted us",
            "error",
        ],
        [
            [
                name,
                which,
                node,
                e["calls"],
                e["rows"] / e["calls"],
                e["measured_us_per_call"],
                e["predicted_us_per_call"],
                f"{e['error']:+.0%}",
            ]
            for name, t in results["topologies"].items()
            for which in ("ours", "eplb")
            for node, e in t.get("prediction_by_batch", {})
            .get(str(max(args.batches)), {})
            .get(which, {})
            .items()
        ],
        console,
    )
    if rt:
        print_table(
            f"Zero-compute round trip of one MoE layer ({len(rt['nodes'])} nodes), us",
            ["actor call (baseline)", "compiled graph", "channel (ours)", "channel, no polling"],
            [
                [
                    rt["actor_call"],
                    rt["compiled_graph"],
                    rt["channel"],
                    rt.get("channel_no_spin", "-"),
                ]
            ],
            console,
        )
    if "wire" in mixed:
        print_table(
            "Wire formats on the fp32 demo (vs fp32 / one process)",
            ["format", "activation rel. error", "token match", "identical rows", "bytes/token"],
            [
                [
                    f,
                    w["activation_rel_error"],
                    w["token_match_rate"],
                    w["identical_rows"],
                    w["bytes_per_token"],
                ]
                for f, w in mixed["wire"].items()
            ],
            console,
        )
        console.print(
            f"bf16 model over the bf16 wire identical to one bf16 process: {mixed['bf16_model']}"
        )
    console.print(f"overlap fraction: {results['overlap_fraction']}")
    console.print(f"outputs identical: {results['outputs_identical']}")
    path = write_result(
        args.name or ("bench_dataplane_rig" if args.rig else "bench_dataplane"),
        results,
        baseline=(
            "attention_node_alone: the whole demo model in this one process; round trip: one "
            "Ray actor task per node per layer (the previous path), measured in the same run"
        ),
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
