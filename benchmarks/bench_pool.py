"""One shared expert pool vs today's private pools, for 1, 2 and 3 attention (API) replicas.

    # on the rig: one attention replica per attention node, the pool on the expert nodes
    flock -w 1800 /work/notes/cpu.lock sh -c '.venv/bin/expertmesh rig up \
        --topology examples/topologies/pool-3attn.yaml --memory-gb 14 && \
        .venv/bin/python benchmarks/bench_pool.py --rig; .venv/bin/expertmesh rig down'
    # -> benchmarks/results/bench_pool.json
    # embedded (one machine, speeds and links emulated, every replica on the same cores)
    .venv/bin/python benchmarks/bench_pool.py [--replicas 1 2 3] [--batch 4] [--max-tokens 16]
        [--repeats 2] [--rounds 3] [--quick]
    # -> benchmarks/results/bench_pool_embedded.json (--quick: bench_pool_quick.json)

Each replica is its own Ray actor running the demo model's attention side with greedy batches:

- `shared`: the replicas attach to one pool (`pool_attachment.attach_pool`, one set of shards
  and one controller for all of them);
- `private` (the baseline, what `num_replicas > 1` does today): each replica starts its own
  shards and standbys (`RayShardPool`), as `ExpertParallelModel.launch` does.

Per setup and replica count: `expert_bytes_total` (the expert weights every serving shard
holds, from the shards' own status), the shard processes, and `tok_s` (generated tokens of
all replicas / wall time, the replicas running at once). Greedy outputs are compared with
the single-process model.

On the rig (`--rig`, a rig already up for a topology with several attention nodes, e.g.
examples/topologies/pool-3attn.yaml): replica i runs on attention node i (its own network
namespace and CPU quota), the pool's experts on the nodes without attention (`expert_nodes`),
the controller on the last expert node; the private pools get the shared pool's placement, so
only sharing differs. Each node's CPU time (cgroup cpuacct) and throttled periods (cpu.stat)
over the timed rounds say which side bounds throughput. Embedded, every replica shares the
same CPUs, so tok_s says what the data path costs, not how attention scales.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

POOL = "bench-pool"
TOPOLOGY = REPO_ROOT / "examples" / "topologies" / "mixed.yaml"
RIG_TOPOLOGY = "examples/topologies/pool-3attn.yaml"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "HAMLET:", "KING LEAR:", "OTHELLO:"]


def worker_class() -> Any:
    """One attention replica as a Ray actor (defined here so Ray ships it by value)."""
    import ray

    class AttentionReplica:
        def __init__(self, mode: str, checkpoint: str, private: dict[str, Any]) -> None:
            import torch

            from expertmesh.cluster.pool_attachment import attach_pool

            torch.set_num_threads(1)  # one attention worker thread (the rig: its node's quota)
            self.checkpoint = checkpoint
            self.mode = mode
            if mode == "shared":
                self.ep = attach_pool(POOL, checkpoint)
            else:
                self.ep = self._private(checkpoint, **private)

        @staticmethod
        def _private(
            checkpoint: str,
            topology: str | None = None,
            routes: Any = None,
            placement: Any = None,
            dtype: str = "auto",
        ) -> Any:
            """Today's `ExpertParallelModel.launch` per replica: its own shards and standbys.
            Embedded (`topology`): planned here and emulated; on the rig: the shared pool's
            placement (`routes`, `placement`), nothing emulated."""
            from expertmesh.cluster.detect import DispatchDetectors
            from expertmesh.cluster.dispatch import RoutingTable
            from expertmesh.cluster.local import emulation_for
            from expertmesh.cluster.planning import embedded_reference_tflops, plan_for_topology
            from expertmesh.cluster.pool import RayShardPool
            from expertmesh.cluster.runtime import ExpertParallelModel, routes_from_placement
            from expertmesh.cluster.topology import load_topology
            from expertmesh.models.checkpoint import read_config

            emulation = None
            if topology is not None:
                layout = load_topology(topology)
                placement = plan_for_topology(
                    layout,
                    read_config(checkpoint),
                    None,
                    reference_tflops=embedded_reference_tflops(layout),
                )
                routes = routes_from_placement(placement)
                emulation = emulation_for(layout)
            held = RoutingTable(routes).node_experts()
            nodes = [n.name for n in layout.nodes] if topology is not None else sorted(held)
            pool = RayShardPool(checkpoint, {n: held.get(n, {}) for n in nodes}, dtype, emulation)
            ep = ExpertParallelModel.from_routes(checkpoint, routes, pool, dtype, placement)
            # The detectors a serving replica's supervisor puts on its dispatcher, as a shared
            # pool's replica runs its own (so both sides pay for them).
            ep.dispatcher.observers.append(DispatchDetectors(None))
            return ep

        def set_overlap(self, mode: str) -> None:
            self.ep.model.overlap_policy.mode = mode

        def run(self, batch: int, max_tokens: int, repeats: int) -> dict[str, Any]:
            from expertmesh.models.generate import Generator, SamplingParams
            from expertmesh.models.tokenizer import Tokenizer

            gen = Generator(self.ep.model, Tokenizer.from_dir(self.checkpoint))
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            t0 = time.perf_counter()
            texts: list[Any] = []
            for _ in range(repeats):
                texts = [c.text for c in gen.generate(prompts, params)]
            return {
                "tokens": batch * max_tokens * repeats,
                "seconds": time.perf_counter() - t0,
                "texts": texts,
            }

        def expert_bytes(self) -> int:
            from expertmesh.cluster.expert_pool import shard_expert_bytes

            return sum(shard_expert_bytes(self.ep.config, self.ep.pool.handles).values())

        def dispatch_stats(self) -> dict[str, Any]:
            st = self.ep.dispatcher.stats
            out = {
                "layer_calls": st.steps,
                "failovers": st.failovers,
                "recoveries": st.recoveries,
                "wait_s": round(st.wait_s, 3),
                "dispatch_wall_s": round(st.wall_s, 3),
                "shard_compute_s": round(st.compute_s, 3),
                "reconnects": getattr(self.ep.dispatcher.transport, "reconnects", None),
                "overlap_mode": self.ep.model.overlap_policy.mode,
                "overlap_passes_on": self.ep.model.overlap_policy.passes_on,
                "overlap_passes_off": self.ep.model.overlap_policy.passes_off,
            }
            attachment = getattr(self.ep, "attachment", None)
            if attachment is not None:
                out["table_swaps"] = attachment.stats.swaps
                out["mixed_steps"] = attachment.stats.mixed_steps
            return out

        def shard_processes(self) -> int:
            return len(self.ep.pool.handles) + len(getattr(self.ep.pool, "standbys", {}))

        def shutdown(self) -> None:
            if self.mode == "private":
                import ray as ray_

                for handle in [*self.ep.pool.handles.values(), *self.ep.pool.standbys.values()]:
                    ray_.kill(handle, no_restart=True)
            self.ep.shutdown()

    remote: Any = ray.remote
    return remote(num_cpus=0)(AttentionReplica)


def measure(
    workers: list[Any],
    batch: int,
    max_tokens: int,
    repeats: int,
    rounds: int,
    sample: Callable[[], dict[str, Any]] | None = None,
) -> tuple[float, list[Any], list[float], list[dict[str, Any]]]:
    """Every replica at once, `rounds` times: (median tok/s over all replicas, texts, the
    rounds' wall seconds, `sample()` before and after each round)."""
    import ray

    ray.get([w.run.remote(batch, 1, 1) for w in workers])  # warm-up (channels, overlap policy)
    walls, tok_s, texts, samples = [], [], [], []
    for _ in range(rounds):
        before = sample() if sample else {}
        t0 = time.perf_counter()
        runs = ray.get([w.run.remote(batch, max_tokens, repeats) for w in workers])
        walls.append(time.perf_counter() - t0)
        samples.append({"before": before, "after": sample() if sample else {}})
        tok_s.append(sum(r["tokens"] for r in runs) / walls[-1])
        texts += [r["texts"] for r in runs]
    return statistics.median(tok_s), texts, walls, samples


def cgroup_sample(nodes: list[str]) -> dict[str, Any]:
    """Per rig node: CPU time used (ns, cpuacct) and CFS periods / throttled periods."""
    from expertmesh.cluster.rig import cgroups

    out = {}
    for node in nodes:
        stat = dict(
            line.split()
            for line in (cgroups.group_dir("cpu", node) / "cpu.stat").read_text().splitlines()
        )
        out[node] = {
            "cpu_ns": cgroups.read_limits(node)["cpu_usage_ns"],
            "periods": int(stat["nr_periods"]),
            "throttled": int(stat["nr_throttled"]),
        }
    return out


def node_use(samples: list[dict[str, Any]], walls: list[float], quotas: dict[str, float]):  # type: ignore[no-untyped-def]
    """Per node over the timed rounds: cores used, that as a share of its quota, and the
    share of its CFS periods that were throttled (the quota bound it)."""
    out = {}
    wall = sum(walls)
    for node, cores in quotas.items():
        used = sum(s["after"][node]["cpu_ns"] - s["before"][node]["cpu_ns"] for s in samples)
        periods = sum(s["after"][node]["periods"] - s["before"][node]["periods"] for s in samples)
        throttled = sum(
            s["after"][node]["throttled"] - s["before"][node]["throttled"] for s in samples
        )
        out[node] = {
            "quota_cores": round(cores, 3),
            "cores_used": round(used / 1e9 / wall, 3),
            "of_quota": round(used / 1e9 / wall / cores, 3),
            "throttled_share": round(throttled / periods, 3) if periods else 0.0,
        }
    return out


def expected_texts(checkpoint: str, batch: int, max_tokens: int, dtype: str) -> list[Any]:
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.tokenizer import Tokenizer

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    single = Generator(load_model(checkpoint, dtype), Tokenizer.from_dir(checkpoint))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [c.text for c in single.generate(prompts, params)]


def run_setup(
    setup: str,
    workers: list[Any],
    controller: Any,
    args: argparse.Namespace,
    expected: list[Any],
    sample: Callable[[], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    import ray

    ray.get([w.set_overlap.remote(args.overlap) for w in workers])
    tok_s, texts, walls, samples = measure(
        workers, args.batch, args.max_tokens, args.repeats, args.rounds, sample
    )
    if setup == "shared":
        expert_bytes = sum(ray.get(controller.expert_bytes.remote()).values())
        processes = ray.get(controller.status.remote())["shard_processes"]
    else:
        expert_bytes = sum(ray.get([w.expert_bytes.remote() for w in workers]))
        processes = sum(ray.get([w.shard_processes.remote() for w in workers]))
    row = {
        "setup": setup,
        "replicas": len(workers),
        "expert_bytes_total": expert_bytes,
        "shard_processes": processes,
        "tok_s": round(tok_s, 2),
        "round_wall_s": [round(w, 3) for w in walls],
        "outputs_identical": all(t == expected for t in texts),
        "dispatch": ray.get([w.dispatch_stats.remote() for w in workers]),
    }
    ray.get([w.shutdown.remote() for w in workers], timeout=120)
    for w in workers:
        ray.kill(w)
    return row, samples, walls


def run_embedded(args: argparse.Namespace, checkpoint: str, console: Any) -> tuple[list, Any]:  # type: ignore[type-arg]
    import ray

    from expertmesh.cluster.expert_pool import PoolSpec, controller_actor, pool_down
    from expertmesh.cluster.local import LocalCluster
    from expertmesh.cluster.topology import load_topology

    expected = expected_texts(checkpoint, args.batch, args.max_tokens, "float32")
    topology = load_topology(TOPOLOGY)
    cluster = LocalCluster(topology)
    cluster.start()
    rows: list[dict[str, Any]] = []
    try:
        controller = controller_actor(POOL, create=PoolSpec(checkpoint, topology, emulate=True))
        ray.get(controller.ready.remote(), timeout=600)
        Worker = worker_class()
        for n in args.replicas:
            for setup in ("shared", "private"):
                console.print(f"[bold]{setup}[/]: {n} replica(s)")
                private = {"topology": str(TOPOLOGY)}
                workers = [Worker.remote(setup, checkpoint, private) for _ in range(n)]
                ray.get([w.shard_processes.remote() for w in workers], timeout=900)
                rows.append(run_setup(setup, workers, controller, args, expected)[0])
        status = ray.get(controller.status.remote())
        pool_down(POOL)
    finally:
        cluster.stop()
    return rows, status


def run_rig(args: argparse.Namespace, checkpoint: str, console: Any) -> tuple[list, Any, Any]:  # type: ignore[type-arg]
    """The rig's attention nodes each run one replica; the pool on the other nodes."""
    import ray

    from expertmesh.cluster.expert_pool import PoolSpec, controller_actor, pool_down
    from expertmesh.cluster.pool import node_resource
    from expertmesh.cluster.rig.rig import driver, measured_topology, rig_plan, startup_window
    from expertmesh.cluster.rig.state import RigState
    from expertmesh.cluster.supervisor import SupervisorConfig

    state = RigState.load()
    if state is None or state.phase != "up":
        raise SystemExit("no rig is up: `expertmesh rig up --topology " + RIG_TOPOLOGY + "`")
    topology = measured_topology(state)
    plan = rig_plan(state)
    # The rig's head (its first attention node) also runs Ray's GCS and head raylet in its
    # quota: it takes the last replica, so 1 and 2 replicas run on nodes alike.
    attention = sorted(
        (n.name for n in topology.attention_nodes), key=lambda name: name == plan.head.name
    )
    experts = tuple(n.name for n in topology.nodes if not n.attention)
    counts = [n for n in args.replicas if n <= len(attention)]
    if len(attention) < 2 or not experts:
        raise SystemExit(f"--rig: topology {plan.topology!r} needs >= 2 attention nodes + experts")
    quotas = {n.name: n.cores for n in plan.nodes}
    sample = lambda: cgroup_sample(list(quotas))  # noqa: E731
    expected = expected_texts(checkpoint, args.batch, args.max_tokens, "float32")
    rows: list[dict[str, Any]] = []
    spec = PoolSpec(
        checkpoint,
        topology,
        dtype="float32",
        expert_nodes=experts,
        controller_node=experts[-1],
        supervisor=SupervisorConfig(rebalance_every_s=0, ping_timeout_s=3.0),
    )
    with driver(state, join_cgroups=False):
        with startup_window(state):
            controller = controller_actor(POOL, create=spec)
            ray.get(controller.ready.remote(), timeout=600)
        snapshot = ray.get(controller.attach.remote("bench-driver"))
        ray.get(controller.detach.remote("bench-driver"))
        private = {
            "routes": dict(snapshot.routes),
            "placement": snapshot.placement,
            "dtype": "float32",
        }
        Worker = worker_class()
        idle = [{"before": sample()}]
        time.sleep(args.idle_s)  # what each node uses with the pool up and no replica
        idle[0]["after"] = sample()
        extra_idle = node_use(idle, [args.idle_s], quotas)
        console.print(
            "idle (pool up, no replica), CPU of quota: "
            + ", ".join(f"{k} {v['of_quota']:.2f}" for k, v in extra_idle.items())
        )
        for n in counts:
            for setup in ("shared", "private"):
                console.print(f"[bold]{setup}[/]: {n} replica(s) on {', '.join(attention[:n])}")
                with startup_window(state):  # importing torch is not what the rig models
                    workers = [
                        Worker.options(resources={node_resource(node): 0.001}).remote(
                            setup, checkpoint, private
                        )
                        for node in attention[:n]
                    ]
                    ray.get([w.shard_processes.remote() for w in workers], timeout=900)
                row, samples, walls = run_setup(setup, workers, controller, args, expected, sample)
                row["nodes"] = node_use(samples, walls, quotas)
                rows.append(row)
                console.print(
                    f"  {row['tok_s']} tok/s; CPU of quota: "
                    + ", ".join(f"{k} {v['of_quota']:.2f}" for k, v in row["nodes"].items())
                )
        status = ray.get(controller.status.remote())
        pool_down(POOL)
    return (
        rows,
        status,
        {
            "idle_nodes": extra_idle,
            "replica_nodes_in_order": attention,
            "placement_nodes": sorted(
                {node for replicas in snapshot.routes.values() for node, _ in replicas}
            ),
            "quotas_cores": quotas,
            "calibration": state.calibration,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=None, help="default 4 (rig: 8)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 16 (rig: 32)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median taken)")
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, 4 tokens")
    parser.add_argument("--rig", action="store_true", help="on the rig that is up")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--idle-s", type=float, default=5.0, help="rig: idle CPU sample")
    parser.add_argument(
        "--overlap",
        choices=("auto", "on", "off"),
        default=None,
        help="micro-batch overlap of every replica (default: off on the rig, where auto's "
        "per-run choice made setups differ, else auto)",
    )
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.rig else 4)
    args.max_tokens = args.max_tokens or (32 if args.rig else 16)
    args.overlap = args.overlap or ("off" if args.rig else "auto")
    if args.quick:
        args.replicas, args.max_tokens, args.repeats, args.rounds = [1, 2], 4, 1, 1

    from expertmesh.models.paths import DEMO_MODEL_DIR

    console = make_console(120)
    checkpoint = str(Path(DEMO_MODEL_DIR).resolve())
    extra: dict[str, Any] = {}
    if args.rig:
        rows, status, extra = run_rig(args, checkpoint, console)
        where = f"the rig ({RIG_TOPOLOGY}: one replica per attention node, experts apart)"
    else:
        rows, status = run_embedded(args, checkpoint, console)
        where = "examples/topologies/mixed.yaml (embedded, emulated)"

    by = {(r["setup"], r["replicas"]): r for r in rows}
    for r in rows:
        base = by[("private", r["replicas"])]
        one = by[(r["setup"], min(x["replicas"] for x in rows))]
        r["bytes_vs_private"] = round(r["expert_bytes_total"] / base["expert_bytes_total"], 3)
        r["tok_s_vs_private"] = round(r["tok_s"] / base["tok_s"], 3)
        r["tok_s_vs_one_replica"] = round(r["tok_s"] / one["tok_s"], 3)
    print_table(
        f"one shared expert pool vs private pools ({where}, demo model)",
        [
            "setup",
            "replicas",
            "expert MB",
            "shard procs",
            "tok/s",
            "vs 1 replica",
            "vs private",
            "same text",
        ],
        [
            [
                r["setup"],
                r["replicas"],
                r["expert_bytes_total"] / 1e6,
                r["shard_processes"],
                r["tok_s"],
                r["tok_s_vs_one_replica"],
                r["tok_s_vs_private"],
                r["outputs_identical"],
            ]
            for r in rows
        ],
        console,
    )
    if args.rig:
        print_table(
            "CPU used over the timed rounds, as a share of each node's quota (throttled periods)",
            ["setup", "replicas", *extra["quotas_cores"]],
            [
                [
                    r["setup"],
                    r["replicas"],
                    *[
                        f"{u['of_quota']:.2f} ({u['throttled_share']:.2f})"
                        for u in r["nodes"].values()
                    ],
                ]
                for r in rows
            ],
            console,
        )
    name = args.name or (
        "bench_pool" if args.rig else ("bench_pool_quick" if args.quick else "bench_pool_embedded")
    )
    path = write_result(
        name,
        {
            "topology": where,
            "model": "demo",
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "overlap": args.overlap,
            "results": rows,
            "pool_status_at_end": status,
            **extra,
        },
        baseline=(
            "private: every replica starts its own shards and standbys (today's "
            "ExpertParallelModel.launch per API replica; on the rig with the shared pool's "
            "placement), measured in the same run on the same cluster, replica counts "
            "interleaved with the shared pool's"
        ),
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
