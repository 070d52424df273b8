"""Faults only a real rig can have (`cluster/rig`), for chaos scenarios with `rig: true`.

- `link_cut`: the target node's cable is pulled (its bridge-side veth down) for `duration_s`,
  then plugged back. Calls in flight to it stall in TCP retransmission and complete once the
  link is back; nothing is resent by us and nothing is skipped.
- `bandwidth_drop`: the link between the attention node and the target is cut to
  1/`factor` of its rate (`tc class change`, both directions, live) for `duration_s`, with
  htb's burst cut to match (2 ms at the slow rate; the healthy link's 256 KB floor would let
  a small model's traffic through at full speed).

On the rig the platform is this process as the attention worker inside the head's namespace
(`rig.driver`), the shards on the rig's Ray nodes, and the planner replaced by EPLB's
placement: every node then takes tokens, so the faulted link really carries traffic (our
planner, on this machine's measured costs, keeps the demo model's experts on the attention
node, and a cut elsewhere would test nothing). If no rig is up, the scenario brings one up
for its topology and takes it down after.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from expertmesh.observability.events import (
    CHAOS,
    EXPERT_SHARD_LOST,
    LINK_DEGRADED,
    FaultEvent,
)

RIG_FAULT_MODES = {
    "link_cut": EXPERT_SHARD_LOST,  # the node's shard stops answering its heartbeats
    "bandwidth_drop": LINK_DEGRADED,  # replies from the node spend longer on the wire
}
"""Each rig fault's failure mode (what the platform's detectors must report)."""
RIG_FAULTS = tuple(RIG_FAULT_MODES)


@contextlib.contextmanager
def on_rig(scenario: Any, root: Path) -> Iterator[None]:
    """This process as the rig's attention worker for the block (nothing if not `rig`)."""
    if not getattr(scenario, "rig", False):
        yield
        return
    from expertmesh.cluster.rig.rig import check_topology, driver, rig_down, rig_up
    from expertmesh.cluster.rig.state import RigState
    from expertmesh.cluster.topology import load_topology

    topology = load_topology(root / scenario.topology)
    state = RigState.load()
    ours = state is None
    if ours:
        state = rig_up(topology, str(root / scenario.topology))
    assert state is not None
    try:
        check_topology(state, topology)
        with driver(state):
            yield
    finally:
        if ours:
            rig_down()


def launch(checkpoint: Path, tracer: Any = None) -> tuple[Any, Any]:
    """(measured topology, ExpertParallelModel) on the rig, with EPLB's placement."""
    from expertmesh.cluster.planning import baseline_placement
    from expertmesh.cluster.rig.rig import launch as launch_on_rig
    from expertmesh.cluster.rig.rig import measured_topology
    from expertmesh.models.checkpoint import read_config

    topology = measured_topology()
    placement = baseline_placement("eplb", topology, read_config(checkpoint))
    from expertmesh.cluster.rig.state import RigState

    state = RigState.load()
    assert state is not None
    ep = launch_on_rig(checkpoint, state, placement=placement)
    if tracer is not None:
        ep.dispatcher.tracer = tracer
    return topology, ep


def inject(platform: Any, fault: Any, scenario: str) -> None:
    """Run one rig fault (the runner's hook for kinds in RIG_FAULTS); emits `restored` (source
    chaos) when the link is back, as the injector does for every transient fault."""
    from expertmesh.cluster.rig import links, netns
    from expertmesh.cluster.rig.rig import rig_plan
    from expertmesh.cluster.rig.state import RigState

    state = RigState.load()
    if state is None:
        raise RuntimeError(f"{fault.kind} needs the rig (`rig: true` in the scenario)")
    plan = rig_plan(state)
    node = plan.node(fault.target or "cpu-fast")
    if fault.kind == "link_cut":
        netns.set_link(node, up=False)
        try:
            time.sleep(fault.duration_s)
        finally:
            netns.set_link(node, up=True)
        detail = f"{node.host_veth} up again"
    elif fault.kind == "bandwidth_drop":
        head = plan.head.name
        rate = plan.link(head, node.name).rate_gbps
        # A degraded link has no burst allowance of a healthy one's size: the rig's 256 KB
        # floor would carry a small model's replies (a few KB a layer call) at full speed
        # for most of the fault. Two full-size frames, or 2 ms at the degraded rate.
        slow = rate / fault.factor
        burst = max(2 * 1514, int(slow * 1e9 / 8 * 0.002))
        links.set_pair_rate(plan, head, node.name, slow, burst_bytes=burst)
        try:
            time.sleep(fault.duration_s)
        finally:
            links.set_pair_rate(plan, head, node.name, rate)
        detail = f"{head}-{node.name} back to {rate:g} Gbit/s"
    else:
        raise ValueError(f"not a rig fault: {fault.kind}")
    platform.events.emit(
        FaultEvent(
            "restored",
            RIG_FAULT_MODES[fault.kind],
            target=fault.target or fault.kind,
            scenario=scenario,
            detail=detail,
            source=CHAOS,
        )
    )
