"""One shared expert pool vs today's private pools, for 1, 2 and 3 attention (API) replicas.

    .venv/bin/python benchmarks/bench_pool.py [--replicas 1 2 3] [--batch 4] [--max-tokens 16]
        [--repeats 2] [--rounds 3] [--quick]
    # -> benchmarks/results/bench_pool.json (--quick: bench_pool_quick.json)

On the embedded mixed topology (three Ray nodes, speeds and links emulated), each replica is
its own Ray actor running the demo model's attention side with greedy batches:

- `shared`: the replicas attach to one pool (`pool_attachment.attach_pool`, one set of shards
  and one controller for all of them);
- `private` (the baseline, what `num_replicas > 1` does today): each replica plans and starts
  its own shards and standbys (`RayShardPool`), as `ExpertParallelModel.launch` does.

Per setup and replica count: `expert_bytes_total` (the expert weights every serving shard
holds, from the shards' own status), the shard processes, and `tok_s` (generated tokens of
all replicas / wall time, the replicas running at once). Greedy outputs are compared with
the single-process model. On one 2-core machine every replica shares the same CPUs, so tok_s
says what the data path costs, not how attention scales across machines (that needs the rig).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

POOL = "bench-pool"
TOPOLOGY = REPO_ROOT / "examples" / "topologies" / "mixed.yaml"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "HAMLET:", "KING LEAR:", "OTHELLO:"]


def worker_class() -> Any:
    """One attention replica as a Ray actor (defined here so Ray ships it by value)."""
    import ray

    class AttentionReplica:
        def __init__(self, mode: str, checkpoint: str, topology: str, prefix: str) -> None:
            from expertmesh.cluster.pool_attachment import attach_pool

            self.checkpoint = checkpoint
            self.mode = mode
            if mode == "shared":
                self.ep = attach_pool(POOL, checkpoint)
            else:
                self.ep = self._private(checkpoint, topology, prefix)

        @staticmethod
        def _private(checkpoint: str, topology_path: str, prefix: str) -> Any:
            """`ExpertParallelModel.launch(local=False, emulate=True)`, with this replica's
            own shard names (Ray actor names are per namespace, and the replicas share one)."""
            from expertmesh.cluster.dispatch import RoutingTable
            from expertmesh.cluster.local import emulation_for
            from expertmesh.cluster.planning import embedded_reference_tflops, plan_for_topology
            from expertmesh.cluster.pool import RayShardPool
            from expertmesh.cluster.runtime import ExpertParallelModel, routes_from_placement
            from expertmesh.cluster.topology import load_topology
            from expertmesh.models.checkpoint import read_config

            topology = load_topology(topology_path)
            config = read_config(checkpoint)
            placement = plan_for_topology(
                topology, config, None, reference_tflops=embedded_reference_tflops(topology)
            )
            routes = routes_from_placement(placement)
            held = RoutingTable(routes).node_experts()
            pool = RayShardPool(
                checkpoint,
                {n.name: held.get(n.name, {}) for n in topology.nodes},
                "auto",
                emulation_for(topology),
                namespace_prefix=prefix,
            )
            return ExpertParallelModel.from_routes(checkpoint, routes, pool, "auto", placement)

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
                "reconnects": getattr(self.ep.dispatcher.transport, "reconnects", None),
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
    workers: list[Any], batch: int, max_tokens: int, repeats: int, rounds: int
) -> tuple[float, list[Any], list[float]]:
    """Every replica at once, `rounds` times: (median tok/s over all replicas, texts, the
    rounds' wall seconds)."""
    import ray

    ray.get([w.run.remote(batch, 1, 1) for w in workers])  # warm-up (channels, overlap policy)
    walls, tok_s, texts = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        runs = ray.get([w.run.remote(batch, max_tokens, repeats) for w in workers])
        walls.append(time.perf_counter() - t0)
        tok_s.append(sum(r["tokens"] for r in runs) / walls[-1])
        texts += [r["texts"] for r in runs]
    return statistics.median(tok_s), texts, walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median taken)")
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, 4 tokens")
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.max_tokens, args.repeats, args.rounds = [1, 2], 4, 1, 1

    import ray

    from expertmesh.cluster.expert_pool import PoolSpec, controller_actor, pool_down
    from expertmesh.cluster.local import LocalCluster
    from expertmesh.cluster.topology import load_topology
    from expertmesh.models.checkpoint import load_model
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.paths import DEMO_MODEL_DIR
    from expertmesh.models.tokenizer import Tokenizer

    console = make_console(120)
    checkpoint = str(Path(DEMO_MODEL_DIR).resolve())
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    single = Generator(load_model(checkpoint), Tokenizer.from_dir(checkpoint))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    expected = [c.text for c in single.generate(prompts, params)]

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
                workers = [
                    Worker.remote(setup, checkpoint, str(TOPOLOGY), f"private-{n}-{i}")
                    for i in range(n)
                ]
                ray.get([w.shard_processes.remote() for w in workers], timeout=900)
                tok_s, texts, walls = measure(
                    workers, args.batch, args.max_tokens, args.repeats, args.rounds
                )
                if setup == "shared":
                    expert_bytes = sum(ray.get(controller.expert_bytes.remote()).values())
                    processes = ray.get(controller.status.remote())["shard_processes"]
                else:
                    expert_bytes = sum(ray.get([w.expert_bytes.remote() for w in workers]))
                    processes = sum(ray.get([w.shard_processes.remote() for w in workers]))
                rows.append(
                    {
                        "setup": setup,
                        "replicas": n,
                        "expert_bytes_total": expert_bytes,
                        "shard_processes": processes,
                        "tok_s": round(tok_s, 2),
                        "round_wall_s": [round(w, 3) for w in walls],
                        "outputs_identical": all(t == expected for t in texts),
                        "dispatch": ray.get([w.dispatch_stats.remote() for w in workers]),
                    }
                )
                ray.get([w.shutdown.remote() for w in workers], timeout=120)
                for w in workers:
                    ray.kill(w)
        status = ray.get(controller.status.remote())
        pool_down(POOL)
    finally:
        cluster.stop()

    by = {(r["setup"], r["replicas"]): r for r in rows}
    one = by.get(("shared", args.replicas[0]))
    for r in rows:
        base = by[("private", r["replicas"])]
        r["bytes_vs_private"] = round(r["expert_bytes_total"] / base["expert_bytes_total"], 3)
        r["tok_s_vs_private"] = round(r["tok_s"] / base["tok_s"], 3)
        if one is not None:
            r["tok_s_vs_one_shared_replica"] = round(r["tok_s"] / one["tok_s"], 3)
    print_table(
        "one shared expert pool vs private pools (embedded mixed topology, demo model)",
        ["setup", "replicas", "expert MB", "shard procs", "tok/s", "vs private", "same text"],
        [
            [
                r["setup"],
                r["replicas"],
                r["expert_bytes_total"] / 1e6,
                r["shard_processes"],
                r["tok_s"],
                r["tok_s_vs_private"],
                r["outputs_identical"],
            ]
            for r in rows
        ],
        console,
    )
    name = "bench_pool_quick" if args.quick else "bench_pool"
    path = write_result(
        name,
        {
            "topology": "examples/topologies/mixed.yaml (embedded, emulated)",
            "model": "demo",
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "results": rows,
            "pool_status_at_end": status,
        },
        baseline=(
            "private: every replica starts its own shards and standbys from its own placement "
            "(today's ExpertParallelModel.launch per API replica), measured in the same run "
            "on the same cluster, replica counts interleaved with the shared pool's"
        ),
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
