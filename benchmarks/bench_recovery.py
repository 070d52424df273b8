"""Recovery times on the embedded cluster under load: shard killed (N times), node drained,
node lost without warning; requests lost and outputs compared with a fault-free run.

    .venv/bin/python benchmarks/bench_recovery.py [--kills 20] [--min-replicas 1]
        [--events benchmarks/results/bench_recovery.events.jsonl]
    # -> benchmarks/results/bench_recovery.json (and the fault events for `expertmesh fmea`)

"Serving again" = the supervisor's recovered event for that shard or node (the shard answers
its heartbeat and holds its experts, or its experts are live elsewhere). The baseline is the
fault-free request latency measured in the same run. Targets (issue): shard killed -> 2 s p95
over 20 kills; drain -> 2 s; node lost -> 8 s; 0 lost requests.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, make_console, print_table, write_result

from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.supervisor import Supervisor, SupervisorConfig
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability.events import EventLog

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


class Load(threading.Thread):
    def __init__(self, gen: Generator, expected: list[Any]) -> None:
        super().__init__(daemon=True)
        self.gen, self.expected = gen, expected
        self.latencies: list[float] = []
        self.lost = 0
        self.wrong = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                out = [c.text for c in self.gen.generate(["ROMEO:"], PARAMS)]
            except Exception:
                self.lost += 1
                continue
            self.latencies.append(time.monotonic() - t0)
            self.wrong += out != self.expected


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument(
        "--events", type=Path, default=Path("benchmarks/results/bench_recovery.events.jsonl")
    )
    args = parser.parse_args()
    console = make_console(120)
    topology = load_topology(REPO_ROOT / "examples" / "topologies" / "mixed.yaml")
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    expected = [
        c.text for c in Generator(load_model(DEMO_MODEL_DIR), tok).generate(["ROMEO:"], PARAMS)
    ]
    ep = ExpertParallelModel.launch(DEMO_MODEL_DIR, topology, min_replicas=args.min_replicas)
    args.events.parent.mkdir(parents=True, exist_ok=True)
    args.events.unlink(missing_ok=True)
    events = EventLog(args.events, scenario="bench_recovery")  # for `expertmesh fmea`
    sup = Supervisor(ep, topology, SupervisorConfig(), events=events).start()
    load = Load(Generator(ep.model, tok), expected)
    load.start()
    try:
        time.sleep(2.0)
        baseline = list(load.latencies)
        kills: list[float] = []
        for i in tqdm(range(args.kills), desc="shard kills"):
            live = [n for n in ("gpu-0", "cpu-fast") if n not in sup.removed]
            node = live[i % len(live)]
            before = len(sup.stats.recovery_s)
            t0 = time.monotonic()
            ep.pool.kill(node)  # type: ignore[attr-defined]
            while len(sup.stats.recovery_s) == before and time.monotonic() - t0 < 30:
                time.sleep(0.005)
            kills.append(time.monotonic() - t0)
            time.sleep(0.5)
        presumed_lost = sup.stats.nodes_replaced  # restarts so slow the node was presumed lost
        drain = sup.drain("cpu-fast")
        time.sleep(1.0)
        t0 = time.monotonic()
        ep.cluster.remove_node("cpu-slow")
        replaced = sup.stats.nodes_replaced
        while sup.stats.nodes_replaced == replaced and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        node_lost = time.monotonic() - t0
        time.sleep(1.0)
        t0 = time.monotonic()
        ep.cluster.add_node("cpu-slow")  # the node comes back (KubeRay recreating the pod)
        node_added = time.monotonic() - t0
        while sup.stats.rejoins == 0 and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        rejoin = time.monotonic() - t0
        experts_back = len(ep.placement.experts_on("cpu-slow"))
        time.sleep(1.0)
        drains = sup.stats.drains
        address = ep.cluster.cluster.address
        t0 = time.monotonic()
        ray_drain = subprocess.Popen(  # what a terminating worker pod's preStop hook runs
            [
                sys.executable,
                "-m",
                "expertmesh.cli",
                "cluster",
                "drain",
                "cpu-slow",
                "--address",
                address,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        drained_at = cli_s = None
        while (drained_at is None or cli_s is None) and time.monotonic() - t0 < 60:
            if drained_at is None and sup.stats.drains > drains:
                drained_at = time.monotonic() - t0
            if cli_s is None and ray_drain.poll() is not None:
                cli_s = time.monotonic() - t0
            time.sleep(0.005)
        if ray_drain.wait() != 0 or drained_at is None or cli_s is None:
            raise SystemExit(f"expertmesh cluster drain failed: {ray_drain.communicate()[1]}")
        ray_drained = drained_at
        time.sleep(1.0)
    finally:
        load.halt.set()
        load.join(60)
        sup.stop()
        events.close()
        ep.shutdown()
    rows = [
        ["shard killed", len(kills), pct(kills, 50), pct(kills, 95), max(kills), 2.0],
        ["node drained", 1, drain, drain, drain, 2.0],
        ["node lost (no warning)", 1, node_lost, node_lost, node_lost, 8.0],
        ["lost node back (rejoin)", 1, rejoin, rejoin, rejoin, float("nan")],
        [
            "node drained by Ray (cluster drain)",
            1,
            ray_drained,
            ray_drained,
            ray_drained,
            float("nan"),
        ],
    ]
    print_table(
        f"Recovery under load, mixed topology, min_replicas {args.min_replicas} (seconds)",
        ["event", "n", "p50", "p95", "max", "target"],
        rows,
        console,
    )
    console.print(
        f"rejoin: {rejoin:.2f} s from adding the Ray node ({node_added:.2f} s of it for the node "
        f"to register); {experts_back} experts moved back onto it"
    )
    console.print(
        f"Ray drain: experts off the node {ray_drained:.2f} s after `expertmesh cluster drain` "
        f"started; the command took {cli_s:.2f} s (most of it a Ray driver connecting)"
    )
    console.print(
        f"requests: {len(load.latencies)} served, {load.lost} lost, {load.wrong} with a "
        f"different output; fault-free latency p50 {pct(baseline, 50) * 1e3:.1f} ms"
    )
    path = write_result(
        "bench_recovery",
        {
            "min_replicas": args.min_replicas,
            "kills": args.kills,
            "events_file": str(args.events),
            "kill_s": kills,
            "kill_p95_s": pct(kills, 95),
            "presumed_lost_during_kills": presumed_lost,
            "drain_s": drain,
            "node_lost_s": node_lost,
            "node_added_s": node_added,
            "rejoin_s": rejoin,
            "experts_back_on_rejoined_node": experts_back,
            "ray_drain_cli_s": cli_s,
            "ray_drain_s": ray_drained,
            "requests": len(load.latencies),
            "lost": load.lost,
            "wrong": load.wrong,
            "baseline_latency_p50_s": pct(baseline, 50),
        },
        baseline={
            "what": "fault-free request latency, same stream, same run",
            "latency_p50_s": pct(baseline, 50),
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
