"""`expertmesh cluster plan|up|nodes|drain`: placement on a topology, the embedded
expert-parallel cluster, and the topology nodes' Ray nodes (listing them, draining one)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from expertmesh.models.checkpoint import read_config
from expertmesh.models.paths import resolve_model


def add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="plan and run the expert-parallel cluster")
    csub = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    plan = csub.add_parser("plan", help="print the expert placement for a topology")
    _common(plan)
    plan.add_argument("--json", type=Path, default=None, help="also write the placement as JSON")
    speed = plan.add_mutually_exclusive_group()
    speed.add_argument(
        "--reference-tflops",
        type=float,
        default=None,
        help="effective TFLOP/s of a speed-1.0 node (default: the topology's, else 50)",
    )
    speed.add_argument(
        "--embedded",
        action="store_true",
        help="plan as `cluster up` does on this machine (reference speed measured here)",
    )
    plan.set_defaults(func=run_plan)

    up = csub.add_parser("up", help="start the embedded cluster and place the model on it")
    _common(up)
    up.add_argument("--prompt", default="ROMEO:", help="one request to prove it serves")
    up.add_argument("--max-tokens", type=int, default=16)
    up.add_argument("--exit-after-ready", action="store_true", help="stop after the first request")
    up.add_argument(
        "--rig",
        action="store_true",
        help="run on the rig `expertmesh rig up` brought up (real links and CPU quotas, no "
        "emulation; the planner reads the rig's measured topology)",
    )
    up.add_argument(
        "--colocate",
        action="store_true",
        help="run the attention node's experts in this process (no call for them; see "
        "docs/cluster.md)",
    )
    up.add_argument(
        "--profile",
        action="store_true",
        help="measure real layer calls on every node once the shards are up, plan again on "
        "those costs and move the experts there",
    )
    up.add_argument(
        "--batch", type=int, default=None, help="decode batch to plan for (tokens per step)"
    )
    up.set_defaults(func=run_up)

    nodes = csub.add_parser(
        "nodes", help="the Ray node standing for each topology node, and whether Ray drains it"
    )
    _address(nodes)
    nodes.set_defaults(func=run_nodes)

    drain = csub.add_parser(
        "drain",
        help="ask Ray to drain a topology node's Ray node: every serving replica moves its "
        "experts off first (before maintenance; the worker pods' preStop hook runs it)",
    )
    drain.add_argument("node", help="topology node name (a worker pod's expertmesh.io/node)")
    _address(drain)
    drain.add_argument(
        "--deadline-s",
        type=float,
        default=600.0,
        help="tell Ray the node goes this many seconds from now (default 600)",
    )
    drain.add_argument("--message", default="expertmesh cluster drain", help="the drain reason")
    drain.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="then wait this long (a preStop hook: let the supervisors move the experts)",
    )
    drain.set_defaults(func=run_drain)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster (GCS) address; default $RAY_ADDRESS, else the running `expertmesh up`'s, "
        "else this machine's Ray node ('auto')",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--topology", required=True, type=Path, help="topology YAML (examples/topologies/)"
    )
    p.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (default)")
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="routing trace JSON (expertmesh generate --record-trace)",
    )
    p.add_argument(
        "--min-replicas", type=int, default=1, help="replicas per expert (redundancy for failover)"
    )
    p.add_argument(
        "--rack-local",
        action="store_true",
        help="keep experts off nodes behind slow links when possible",
    )


def _plan(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from expertmesh.cluster.planning import load_trace, plan_for_topology
    from expertmesh.cluster.topology import load_topology

    topology = load_topology(args.topology)
    config = read_config(resolve_model(args.model))
    trace = load_trace(args.trace, config) if args.trace else None
    tflops = _tflops(args, topology)
    placement = plan_for_topology(
        topology, config, trace, args.min_replicas, args.rack_local, reference_tflops=tflops
    )
    return topology, config, placement


def _tflops(args: argparse.Namespace, topology) -> float | None:  # type: ignore[no-untyped-def]
    """Reference TFLOP/s from the flags: --reference-tflops, or measured here with --embedded
    (once per run), else None (the topology's, or the planner's default)."""
    from expertmesh.cluster.placement import PlacementError
    from expertmesh.cluster.planning import embedded_reference_tflops

    cached = getattr(args, "_measured_tflops", None)
    if cached is not None:
        return float(cached)
    tflops = getattr(args, "reference_tflops", None)
    if getattr(args, "embedded", False) and topology.reference_tflops is None:
        tflops = embedded_reference_tflops(topology)
    if tflops is not None and not tflops > 0:
        raise PlacementError(f"--reference-tflops must be > 0, got {tflops}")
    args._measured_tflops = tflops
    return tflops


def print_placement(console: Console, topology, placement) -> None:  # type: ignore[no-untyped-def]
    table = Table(title=f"Placement on {topology.name}")
    for col in ("node", "speed", "experts held", "predicted time per step (s)", "share of tokens"):
        table.add_column(col, justify="left" if col == "node" else "right")
    total_tokens = sum(placement.node_tokens.values()) or 1.0
    for node in topology.nodes:
        held = placement.experts_on(node.name)
        table.add_row(
            node.name,
            f"{node.speed if node.speed is not None else 'measure'}",
            str(len(held)),
            f"{placement.node_time.get(node.name, 0.0):.3g}",
            f"{placement.node_tokens.get(node.name, 0.0) / total_tokens:.1%}",
        )
    console.print(table)
    replicated = sum(1 for r in placement.replicas.values() if len(r) > 1)
    console.print(
        f"balance (max/mean node time, speeds counted): {placement.balancedness:.3f}; "
        f"ignoring speeds: {placement.balancedness_equal_speed:.3f}; "
        f"cross-node bytes per token: {placement.cross_node_bytes_per_token:,.0f}; "
        f"experts with replicas: {replicated}"
    )


def run_plan(args: argparse.Namespace) -> int:
    import json

    from expertmesh.cluster.planning import compare_for_topology, load_trace

    topology, config, placement = _plan(args)
    console = Console()
    print_placement(console, topology, placement)
    trace = load_trace(args.trace, config) if args.trace else None
    compared = compare_for_topology(
        topology, config, placement, trace, reference_tflops=_tflops(args, topology)
    )
    table = Table(title="Predicted expert time per step, one cost model (lower is better)")
    for col in ("placement", "predicted step (ms)", "vs ours", "nodes used", "fits slots"):
        table.add_column(col, justify="left" if col in ("placement", "nodes used") else "right")
    ours_s = compared["ours"]["predicted_step_s"]
    for name, row in compared.items():
        table.add_row(
            name,
            f"{row['predicted_step_s'] * 1e3:.4g}",
            f"{row['predicted_step_s'] / ours_s:.2f}x" if ours_s > 0 else "-",
            ", ".join(row["nodes_used"]),
            "yes" if not row["slots_over"] else f"no: {row['slots_over']}",
        )
    console.print(table)
    console.print(
        "predictions of the planner's cost model; `benchmarks/bench_dataplane.py` measures them"
    )
    if args.json:
        doc = json.loads(placement.to_json())
        doc["predicted_step_s"] = {k: v["predicted_step_s"] for k, v in compared.items()}
        doc["compared"] = compared
        args.json.write_text(json.dumps(doc, indent=1))
        console.print(f"wrote {args.json}")
    return 0


def run_up(args: argparse.Namespace) -> int:
    from expertmesh.cluster.planning import load_trace
    from expertmesh.cluster.runtime import ExpertParallelModel
    from expertmesh.cluster.topology import load_topology

    console = Console()
    path = resolve_model(args.model)
    topology = load_topology(args.topology)
    trace = load_trace(args.trace, read_config(path)) if args.trace else None
    if args.rig:
        from .cmd_rig import rig_model

        with rig_model(args, path, topology, trace, console) as (measured, ep):
            return serve_one(args, console, measured, ep, path)
    console.print(
        f"starting the embedded cluster for '{topology.name}' ({len(topology.nodes)} Ray nodes); "
        "it emulates node speed and links by sleeping (`--rig` for the real thing)..."
    )
    from .cmd_rig import launch_options

    with ExpertParallelModel.launch(
        path, topology, trace, min_replicas=args.min_replicas, **launch_options(args)
    ) as ep:
        return serve_one(args, console, topology, ep, path)


def serve_one(args: argparse.Namespace, console: Console, topology, ep, path) -> int:  # type: ignore[no-untyped-def]
    """Print the placement, answer one request, then wait for Ctrl-C (cluster up's body)."""
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.tokenizer import Tokenizer

    print_placement(console, topology, ep.placement)
    tokenizer = Tokenizer.from_dir(path)
    [out] = Generator(ep.model, tokenizer).generate(
        [args.prompt], SamplingParams(max_tokens=args.max_tokens)
    )
    console.print(f"[bold]{args.prompt}[/bold]{out.text}")
    statuses = ep.pool.statuses()  # type: ignore[attr-defined]
    for node, st in statuses.items():
        console.print(
            f"shard {node}: pid {st.pid}, {sum(len(v) for v in st.experts.values())} experts, {st.tokens} tokens served"
        )
    if args.exit_after_ready:
        return 0
    console.print("cluster is up; Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    return 0


def _connect(args: argparse.Namespace) -> str:
    """Connect a driver to the Ray cluster; returns its GCS address."""
    import logging
    import os

    import ray

    from .cmd_serve import read_state

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        state = read_state()
        address = (state or {}).get("ray_address") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as e:
        raise FileNotFoundError(f"no Ray cluster at {address!r}: {e}; pass --address") from e
    return str(ray.get_runtime_context().gcs_address)


def run_nodes(args: argparse.Namespace) -> int:
    import ray

    from expertmesh.cluster import ray_nodes

    _connect(args)
    try:
        infos = ray.nodes()
        draining = ray_nodes.draining_ray_nodes()
    finally:
        ray.shutdown()
    table = Table(title="topology nodes on this Ray cluster", title_justify="left")
    for column in ("node", "Ray node id", "state"):
        table.add_column(column)
    names = ray_nodes.nodes_offered(infos)
    for name, ids in ray_nodes.offering(names, infos).items():
        for ray_id in sorted(ids):
            state = "alive"
            if ray_id in draining:
                left = ray_nodes.deadline_in_s(draining[ray_id])
                state = "draining" + (f" (deadline in {left:.0f} s)" if left is not None else "")
            table.add_row(name, ray_id, state)
    console = Console()
    if not names:
        console.print("no live Ray node offers an expertmesh_node_* resource")
        return 1
    console.print(table)
    return 0


def run_drain(args: argparse.Namespace) -> int:
    import time

    import ray

    from expertmesh.cluster import ray_nodes

    gcs = _connect(args)
    try:
        infos = ray.nodes()
    finally:
        ray.shutdown()
    ids = ray_nodes.offering([args.node], infos)[args.node]
    if not ids:
        known = ", ".join(ray_nodes.nodes_offered(infos)) or "none"
        raise ray_nodes.DrainRefused(
            f"no live Ray node offers {args.node!r}'s resource (topology nodes here: {known})"
        )
    console = Console()
    for ray_id in sorted(ids):
        ray_nodes.request_drain(ray_id, args.message, args.deadline_s, address=gcs)
        console.print(
            f"Ray is draining node {ray_id} ({args.node}); serving replicas move its experts "
            "off within a supervisor round (`expertmesh cluster nodes`, /health "
            "supervisor.out_of_service)"
        )
    if args.wait_s > 0:
        time.sleep(args.wait_s)
    return 0
