"""Bring the rig up, connect a driver to it, take it down.

state = rig_up(load_topology("examples/topologies/mixed.yaml"), "mixed.yaml")
with driver(state):                 # this process: in the head's namespace and groups
    ep = ExpertParallelModel.launch(ckpt, measured_topology(state), local=False, emulate=False)
rig_down()                          # idempotent; also cleans a crashed `up`
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from expertmesh.cluster.topology import Topology, parse_topology

from . import cgroups, links, netns, nodes
from .plan import CGROUP, PREFIX, Machine, RigPlan, plan_rig
from .state import RigState, state_path
from .system import RigError, check_support

log = logging.getLogger("expertmesh.rig")


def default_machine(**overrides: Any) -> Machine:
    """What the rig may use here: three quarters of the cores, the default memory budget (or
    a third of this machine's memory, whichever is smaller)."""
    from .plan import DEFAULT_MEMORY_BUDGET_GB

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = min(int(DEFAULT_MEMORY_BUDGET_GB * 2**30), total // 3)
    # Three quarters of the cores: the rig's groups are given priority (cpu.shares) so their
    # quotas hold on a busy machine; the rest stays for everything else.
    cores = 0.75 * float(os.cpu_count() or 1)
    values: dict[str, Any] = {"cores": cores, "memory_budget_bytes": budget}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Machine(**values)


def rig_up(
    topology: Topology,
    topology_file: str | None = None,
    machine: Machine | None = None,
    timeout_s: float = 120.0,
    calibrate: bool = True,
    shape: tuple[int, int, int] | None = None,
) -> RigState:
    """Create everything for `topology`, start Ray on it, calibrate; returns the saved state.
    RigUnsupported when this machine cannot; RigError (after cleaning up) on any failure."""
    check_support()
    existing = RigState.load()
    if existing is not None:
        raise RigError(
            f"a rig is already recorded in {existing.path} ({existing.phase}, topology "
            f"{(existing.plan or {}).get('topology')}); `expertmesh rig down` first"
        )
    plan = plan_rig(topology, machine or default_machine())
    state = RigState(state_path(), topology_file=topology_file, plan=plan.to_dict())
    state.save()
    t0 = time.monotonic()
    try:
        netns.create_bridge(plan, state)
        for node in plan.nodes:
            netns.create_node_netns(plan, node, state)
            links.shape_node(plan, node, state)
            cgroups.create_node_groups(node, state)
            cgroups.apply_cpu_quota(node, limited=False)
        nodes.ensure_token(state)
        state.temp_dir = nodes.TEMP_DIR
        state.ray_address = f"{plan.head.ip}:{nodes.HEAD_PORT}"
        state.save()
        # One at a time: nodes on one machine share Ray's session directory, and two
        # raylets starting together can pick the same socket file there.
        for node in sorted(plan.nodes, key=lambda n: not n.attention):
            nodes.wait_started({node.name: nodes.start_node(plan, node, state)}, timeout_s)
        with driver(state):
            state.ray_node_ids = _wait_for_nodes(plan, timeout_s - (time.monotonic() - t0))
            state.save()
            if calibrate:
                from .calibrate import DEFAULT_GEMM_SHAPE, calibrate_rig

                result = calibrate_rig(
                    plan,
                    state,
                    topology,
                    shape or DEFAULT_GEMM_SHAPE,
                    on_ready=lambda: apply_quotas(plan),
                )
                state.calibration = result.to_dict()
                state.measured_topology = result.topology.to_dict()
        apply_quotas(plan)  # from here on, a node computes at its speed
        state.phase = "up"
        state.calibration = {**(state.calibration or {}), "up_s": time.monotonic() - t0}
        state.save()
        return state
    except BaseException:
        log.exception("rig up failed; taking down what was made")
        rig_down()
        raise


def apply_quotas(plan: RigPlan, limited: bool = True) -> None:
    for node in plan.nodes:
        cgroups.apply_cpu_quota(node, limited)


@contextlib.contextmanager
def startup_window(state: RigState | None = None) -> Iterator[None]:
    """Lift the CPU quotas for the block (starting shard processes: importing torch under an
    eighth of a core takes half a minute, and start-up is not what the rig models), and put
    them back after."""
    state = state or RigState.load()
    if state is None or state.plan is None:
        raise RigError(f"no rig is up (no state in {state_path()}); `expertmesh rig up` first")
    plan = RigPlan.from_dict(state.plan)
    apply_quotas(plan, limited=False)
    try:
        yield
    finally:
        apply_quotas(plan)


def _wait_for_nodes(plan: RigPlan, timeout_s: float) -> dict[str, str]:
    import ray

    deadline = time.monotonic() + max(timeout_s, 5.0)
    want = {n.name for n in plan.nodes}
    while True:
        ids = nodes.ray_node_ids(ray.nodes())
        if want <= set(ids):
            return {n: ids[n] for n in sorted(want)}
        if time.monotonic() > deadline:
            raise RigError(f"Ray nodes not joined in time: {', '.join(sorted(want - set(ids)))}")
        time.sleep(0.2)


@contextlib.contextmanager
def driver(state: RigState | None = None, join_cgroups: bool = True) -> Iterator[RigState]:
    """Run this process as a driver on the attention (head) node: in its namespace and
    (with join_cgroups) its CPU and memory groups, connected to the rig's Ray. Leaves both
    and disconnects on exit."""
    import ray

    state = state or RigState.load()
    if state is None or state.plan is None or state.ray_address is None:
        raise RigError(f"no rig is up (no state in {state_path()}); `expertmesh rig up` first")
    plan = RigPlan.from_dict(state.plan)
    nodes.use_token(state)
    groups = cgroups.joined(plan.head.name) if join_cgroups else contextlib.nullcontext()
    import torch

    threads = torch.get_num_threads()
    if join_cgroups:  # the attention worker computes with the head's cores, no more
        torch.set_num_threads(max(1, round(plan.head.cores)))
    with netns.entered(plan.head.namespace), groups:
        ray.init(
            address=state.ray_address,
            log_to_driver=False,
            logging_level=logging.ERROR,
            _node_ip_address=plan.head.ip,
        )
        try:
            yield state
        finally:
            ray.shutdown()
            torch.set_num_threads(threads)


def rig_plan(state: RigState) -> RigPlan:
    assert state.plan is not None
    return RigPlan.from_dict(state.plan)


def measured_topology(state: RigState | None = None) -> Topology:
    """The topology the planner should read on the rig: speeds, link bandwidth and latency,
    the reference GEMM rate and the call overhead as calibration measured them."""
    state = state or RigState.load()
    if state is None or state.measured_topology is None:
        raise RigError("the rig has no calibration (is it up? `expertmesh rig up`)")
    return parse_topology(state.measured_topology)


def rig_down() -> dict[str, int]:
    """Remove everything the rig made (recorded or found by its names). Idempotent; returns
    how many of each kind were removed."""
    state = RigState.load()
    removed: dict[str, int] = {}

    def count(kind: str, did: bool) -> None:
        if did:
            removed[kind] = removed.get(kind, 0) + 1

    names: list[str] = []
    if state is not None:
        state.phase = "stopping"
        state.save()
        names = [r["node"] for r in state.resources if r["kind"] == "ray"]
        if state.plan:
            names += [n["name"] for n in state.plan["nodes"]]
    for parent in cgroups.leftover_groups():
        if parent.name != CGROUP:
            names.append(parent.name)
    # Processes first: everything in the rig's groups (raylets, workers, GCS), and whatever
    # still runs in a rig namespace.
    for name in dict.fromkeys(names):
        left = cgroups.kill_all(name)
        if left:
            raise RigError(f"node {name!r}: {left} processes survived SIGKILL")
    for ns in netns.namespaces(PREFIX):
        for pid in set(netns.namespace_pids(ns)) - {os.getpid()}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    for path in cgroups.leftover_groups():
        count("cgroup", cgroups.remove_group(path))
    for ns in netns.namespaces(PREFIX):
        count("netns", netns.delete_netns(ns))  # its eth0 (and qdisc) goes with it
    for link in netns.links(PREFIX):
        count("link", netns.delete_link(link))
    if Path(nodes.TEMP_DIR).exists():
        shutil.rmtree(nodes.TEMP_DIR, ignore_errors=True)
    if state is not None:
        nodes.token_path(state).unlink(missing_ok=True)
        state.remove()
    return removed


def leftovers() -> dict[str, list[str]]:
    """What of a rig exists on this machine now (empty lists: nothing)."""
    return {
        "netns": netns.namespaces(PREFIX),
        "links": netns.links(PREFIX),
        "cgroups": [str(p) for p in cgroups.leftover_groups()],
        "state": [str(state_path())] if state_path().exists() else [],
    }


def check_topology(state: RigState, topology: Topology) -> None:
    """RigError unless the rig was brought up for `topology` (the same nodes)."""
    plan = rig_plan(state)
    if sorted(n.name for n in topology.nodes) != sorted(n.name for n in plan.nodes):
        raise RigError(
            f"--topology {topology.name!r} is not the rig's ({plan.topology!r}, nodes "
            f"{', '.join(n.name for n in plan.nodes)}); pass the file the rig was brought up "
            f"with ({state.topology_file}) or `expertmesh rig down` and up again"
        )


def launch(
    checkpoint: str | Path,
    state: RigState,
    trace: Any = None,
    min_replicas: int = 1,
    dtype: str = "float32",
    placement: Any = None,
    **kwargs: Any,
) -> Any:
    """Place a model on the rig (call inside `driver`): the planner reads the measured
    topology, shards are pinned by `expertmesh_node_<name>` and never sleep (emulate=False).
    Quotas are lifted while the shard processes start. `placement`: use this one instead of
    planning (benchmarks compare placements)."""
    from expertmesh.cluster.runtime import ExpertParallelModel

    topology = measured_topology(state)
    profile = bool(kwargs.pop("profile", False))
    with startup_window(state):
        if placement is not None:
            return launch_placement(checkpoint, topology, placement, dtype)
        ep = ExpertParallelModel.launch(
            checkpoint,
            topology,
            trace,
            dtype=dtype,
            local=False,
            emulate=False,
            min_replicas=min_replicas,
            **kwargs,
        )
    if profile:  # under the quotas: what the nodes really cost
        from expertmesh.cluster.profile import profile_layer_calls, replan_measured

        replan_measured(ep, profile_layer_calls(ep, [n.name for n in topology.nodes]), trace)
    return ep


def launch_placement(checkpoint: str | Path, topology: Topology, placement: Any, dtype: str) -> Any:
    """An ExpertParallelModel on the connected cluster with a given placement (no emulation)."""
    from expertmesh.cluster.dispatch import RoutingTable
    from expertmesh.cluster.pool import RayShardPool
    from expertmesh.cluster.runtime import ExpertParallelModel, routes_from_placement

    routes = routes_from_placement(placement)
    held = RoutingTable(routes).node_experts()
    assignment = {n.name: held.get(n.name, {}) for n in topology.nodes}
    pool = RayShardPool(str(checkpoint), assignment, dtype, None)
    return ExpertParallelModel.from_routes(checkpoint, routes, pool, dtype, placement)
