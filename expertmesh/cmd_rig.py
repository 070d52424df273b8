"""`expertmesh rig up|status|down`: the multi-host rig on this machine (docs/rig.md).

expertmesh rig up --topology examples/topologies/mixed.yaml
expertmesh rig status            # per node: namespace, IP, quota, memory, Ray node, link
expertmesh cluster up --rig --topology examples/topologies/mixed.yaml
expertmesh rig down              # removes everything; idempotent
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def add_rig(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rig",
        help="a real multi-host Ray cluster on this machine: namespaces, tc links, CPU quotas",
    )
    rsub = p.add_subparsers(dest="rig_command", required=True, metavar="ACTION")
    up = rsub.add_parser("up", help="bring the rig up for a topology and calibrate it")
    up.add_argument("--topology", required=True, type=Path, help="topology YAML")
    up.add_argument("--model", default="demo", help="calibrate GEMMs at this model's expert shape")
    up.add_argument("--cores", type=float, default=None, help="CPU cores the rig may use in all")
    up.add_argument(
        "--max-node-cores", type=float, default=None, help="cores of the fastest node (default 1)"
    )
    up.add_argument("--memory-gb", type=float, default=None, help="memory the rig may use in all")
    up.add_argument(
        "--link-scale",
        type=float,
        default=None,
        help="multiply declared bandwidths by this (default: fastest link -> --max-link-gbps)",
    )
    up.add_argument("--max-link-gbps", type=float, default=None)
    up.add_argument("--no-calibrate", action="store_true", help="skip calibration")
    up.set_defaults(func=run_rig_up)
    status = rsub.add_parser("status", help="per node: limits, Ray node, measured link")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--no-probe", action="store_true", help="do not probe the links")
    status.set_defaults(func=run_rig_status)
    down = rsub.add_parser("down", help="remove every namespace, link, cgroup, process of the rig")
    down.set_defaults(func=run_rig_down)


def expected_errors() -> list[type[BaseException]]:
    from expertmesh.cluster.rig.plan import RigPlanError
    from expertmesh.cluster.rig.system import RigError

    return [RigError, RigPlanError]


def run_rig_up(args: argparse.Namespace) -> int:
    from expertmesh.cluster.rig.rig import default_machine, rig_up
    from expertmesh.cluster.topology import load_topology
    from expertmesh.models.checkpoint import read_config
    from expertmesh.models.paths import resolve_model

    console = Console()
    topology = load_topology(args.topology)
    config = read_config(resolve_model(args.model))
    shape = (64, config.hidden_size, config.moe.expert_intermediate)
    machine = default_machine(
        cores=args.cores,
        max_node_cores=args.max_node_cores,
        memory_budget_bytes=int(args.memory_gb * 2**30) if args.memory_gb else None,
        link_scale=args.link_scale,
        max_link_gbps=args.max_link_gbps,
    )
    console.print(f"bringing up the rig for '{topology.name}' ({len(topology.nodes)} nodes)...")
    state = rig_up(
        topology, str(args.topology), machine, calibrate=not args.no_calibrate, shape=shape
    )
    print_calibration(console, state)
    out = write_measured_topology(state)
    console.print(
        f"rig up in {state.calibration.get('up_s', 0):.1f} s; Ray at {state.ray_address}"  # type: ignore[union-attr]
        + (f"; measured topology: {out}" if out else "")
    )
    return 0


def write_measured_topology(state) -> Path | None:  # type: ignore[no-untyped-def]
    import yaml

    if state.measured_topology is None:
        return None
    out = state.path.with_name("measured-topology.yaml")
    out.write_text(yaml.safe_dump(state.measured_topology, sort_keys=False))
    return Path(out)


def print_calibration(console: Console, state) -> None:  # type: ignore[no-untyped-def]
    from expertmesh.cluster.rig.plan import RigPlan

    plan = RigPlan.from_dict(state.plan)
    cal = state.calibration or {}
    console.print(
        f"scaling: {plan.cpu_scale:.3g} cores per unit of speed, memory x{plan.memory_scale:.3g}, "
        f"links x{plan.link_scale:.3g}; latency not emulated (no netem): measured only"
    )
    nodes = Table(title="nodes: declared vs measured")
    for col in ("node", "CPU cores", "memory", "declared speed", "GFLOP/s", "measured speed"):
        nodes.add_column(col, justify="left" if col == "node" else "right")
    measured = {n["name"]: n for n in cal.get("nodes", [])}
    for n in plan.nodes:
        m = measured.get(n.name, {})
        nodes.add_row(
            n.name,
            f"{n.cores:.3g}",
            f"{n.memory_bytes / 2**30:.2f} GiB",
            f"{n.speed:g}",
            f"{m['gflops']:.1f}" if m else "-",
            f"{m['measured_speed']:.3g}" if m else "-",
        )
    console.print(nodes)
    if cal.get("links"):
        links = Table(title="links: declared, on the rig (x scale), measured")
        for col in (
            "pair",
            "declared Gbit/s",
            "rig Gbit/s",
            "measured Gbit/s",
            "declared latency us",
            "measured RTT us",
        ):
            links.add_column(col, justify="left" if col == "pair" else "right")
        for m in cal["links"]:
            links.add_row(
                f"{m['a']} - {m['b']}",
                f"{m['declared_gbps']:g}",
                f"{m['rig_rate_gbps']:.3g}",
                f"{m['measured_gbps']:.3g}",
                f"{m['declared_latency_us']:g}",
                f"{m['rtt_us']:.0f}",
            )
        console.print(links)
        console.print(
            f"reference (speed 1.0): {cal['reference_tflops'] * 1000:.1f} GFLOP/s; fixed cost "
            f"of one dispatch call: {cal['call_overhead_us']:.0f} us"
        )


def run_rig_status(args: argparse.Namespace) -> int:
    from expertmesh.cluster.rig.rig import driver
    from expertmesh.cluster.rig.state import RigState, state_path
    from expertmesh.cluster.rig.status import rig_status
    from expertmesh.cluster.rig.system import RigError

    state = RigState.load()
    if state is None:
        raise RigError(f"no rig is up (no state in {state_path()}); `expertmesh rig up` first")
    with driver(state, join_cgroups=False):
        status = rig_status(state, probe=not args.no_probe)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    table = Table(title=f"rig for '{status['topology']}' (Ray at {status['ray_address']})")
    cols = (
        "node",
        "namespace",
        "IP",
        "CPU cores",
        "memory limit",
        "memory used",
        "Ray node id",
        "alive",
        "link Gbit/s (tc / measured)",
        "RTT us",
    )
    for col in cols:
        table.add_column(col)
    for row in status["nodes"]:
        link = (
            f"{row['link_rate_gbps']:.3g} / {row['link_measured_gbps']:.3g}"
            if "link_measured_gbps" in row
            else ("attention" if row["attention"] else "-")
        )
        table.add_row(
            row["node"],
            row["namespace"],
            row["ip"],
            f"{row['cpu_cores']:.3g}" if row["cpu_cores"] else "unlimited",
            f"{row['memory_limit_bytes'] / 2**30:.2f} GiB",
            f"{row['memory_usage_bytes'] / 2**20:.0f} MiB",
            (row["ray_node_id"] or "-")[:12],
            "yes" if row["ray_alive"] else "NO",
            link,
            f"{row['link_rtt_us']:.0f}" if "link_rtt_us" in row else "-",
        )
    Console().print(table)
    return 0


def run_rig_down(args: argparse.Namespace) -> int:
    from expertmesh.cluster.rig.rig import leftovers, rig_down

    removed = rig_down()
    left = {k: v for k, v in leftovers().items() if v}
    summary = ", ".join(f"{n} {k}" for k, n in removed.items()) or "nothing was up"
    console = Console()
    console.print(f"rig down: removed {summary}")
    if left:
        console.print(f"[red]left behind[/red]: {left}")
        return 1
    return 0


@contextlib.contextmanager
def rig_model(args: argparse.Namespace, path, topology, trace, console: Console):  # type: ignore[no-untyped-def]
    """`cluster up --rig`: this process becomes the attention worker on the rig's head node;
    yields (measured topology, the model placed on the rig)."""
    from expertmesh.cluster.rig.rig import check_topology, driver, launch, measured_topology

    state = _up_state()
    check_topology(state, topology)
    console.print(
        f"joining the rig at {state.ray_address} (the planner reads the measured topology; "
        "shards run at their node's CPU quota behind tc-limited links, nothing sleeps)..."
    )
    with driver(state):
        model = launch(path, state, trace, min_replicas=args.min_replicas, **launch_options(args))
        yield measured_topology(state), model


def _up_state():  # type: ignore[no-untyped-def]
    from expertmesh.cluster.rig.state import RigState, state_path
    from expertmesh.cluster.rig.system import RigError

    state = RigState.load()
    if state is None or state.phase != "up":
        raise RigError(f"no rig is up (state {state_path()}); `expertmesh rig up` first")
    return state


def measured_topology_file() -> Path:
    """The rig's measured topology as a YAML file (what `up --rig` plans on)."""
    out = write_measured_topology(_up_state())
    if out is None:
        from expertmesh.cluster.rig.system import RigError

        raise RigError("the rig was brought up with --no-calibrate: nothing measured to plan on")
    return out


def enter_rig_for_serving(stack, host: str, console: Console) -> str:  # type: ignore[no-untyped-def]
    """`up --rig`: connect this process to the rig from the head's namespace (a Ray driver
    needs a raylet at its own address); the API listens on the head's address (reachable from
    this machine through the bridge) unless --host names another. Returns the host."""
    from expertmesh.cluster.rig.rig import driver, rig_plan

    state = _up_state()
    stack.enter_context(driver(state, join_cgroups=False))
    head = rig_plan(state).head
    console.print(f"serving on the rig at {state.ray_address} (head {head.name})...")
    return head.ip if host in ("127.0.0.1", "localhost") else host


def pin_to_attention_node(app):  # type: ignore[no-untyped-def]
    """The API deployment's replicas on the attention node: they are the attention worker."""
    from ray.serve import Application

    from expertmesh.cluster.pool import node_resource
    from expertmesh.cluster.rig.rig import rig_plan

    head = rig_plan(_up_state()).head.name
    bound = app._bound_deployment  # Serve keeps the bound deployment here; options keep its args
    actor = dict(bound.ray_actor_options or {})
    actor["resources"] = {**actor.get("resources", {}), node_resource(head): 0.001}
    return Application(bound.options(ray_actor_options=actor))


def launch_options(args: argparse.Namespace) -> dict[str, object]:
    """`cluster up`'s data-plane options for `ExpertParallelModel.launch`."""
    return {
        "colocate": bool(getattr(args, "colocate", False)),
        "profile": bool(getattr(args, "profile", False)),
        "tokens_per_step": getattr(args, "batch", None),
    }
