"""`rig status`: what each node is and does now (limits from its cgroups, Ray node liveness,
and a fresh probe of its link to the attention node)."""

from __future__ import annotations

from typing import Any

from . import cgroups
from .calibrate import probe_link
from .plan import RigPlan
from .state import RigState
from .system import RigError


def rig_status(state: RigState, probe: bool = True, probe_s: float = 0.5) -> dict[str, Any]:
    """Per node: namespace, IP, CPU quota (cores), memory limit and use, Ray node id and
    whether Ray sees it alive, and (probe) the measured bandwidth and round trip of its link
    from the attention node."""
    import ray

    from .nodes import ray_node_ids

    if state.plan is None:
        raise RigError("the rig state has no plan (a crashed `up`?); `expertmesh rig down`")
    plan = RigPlan.from_dict(state.plan)
    alive = ray_node_ids(ray.nodes())
    head = plan.head.name
    rows = []
    for node in plan.nodes:
        limits = cgroups.read_limits(node.name)
        row: dict[str, Any] = {
            "node": node.name,
            "namespace": node.namespace,
            "ip": node.ip,
            "attention": node.attention,
            "cpu_cores": limits["cpu_quota_us"] / limits["cpu_period_us"]
            if limits["cpu_quota_us"] > 0
            else None,
            "memory_limit_bytes": limits["memory_limit_bytes"],
            "memory_usage_bytes": limits["memory_usage_bytes"],
            "cpu_used_s": limits["cpu_usage_ns"] / 1e9 if limits["cpu_usage_ns"] >= 0 else None,
            "processes": len(cgroups.pids(node.name)),
            "ray_node_id": state.ray_node_ids.get(node.name),
            "ray_alive": node.name in alive,
        }
        if probe and node.name != head:
            measured = probe_link(plan, head, node.name, seconds=probe_s)
            row["link_rate_gbps"] = plan.link(head, node.name).rate_gbps
            row["link_measured_gbps"] = measured["gbps"]
            row["link_rtt_us"] = measured["rtt_us"]
        rows.append(row)
    return {"topology": plan.topology, "ray_address": state.ray_address, "nodes": rows}
