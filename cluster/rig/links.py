"""Link rates with tc: an htb qdisc on each namespace's eth0, one class per peer node.

Each node shapes what it *sends*: on its eth0 (inside its namespace), a class per other node
at the pair's rate, chosen by a u32 filter on the destination address, and a default class at
its slowest link's rate for anything else (the bridge's address). A pair's two directions are
shaped at their two senders, so every byte between two nodes crosses exactly one limit of that
pair's rate, and pairs that differ (25 vs 10 Gbit/s) differ on the wire.

A bandwidth drop (chaos) changes one pair's two classes with `tc class change`; nothing is
restarted and no connection is reset.
"""

from __future__ import annotations

from .plan import NodePlan, RigPlan
from .state import RigState
from .system import in_netns, run

DEFAULT_CLASS = 1
"""Class 1:1 takes what no filter matches; class 1:(10 + index) is traffic to node index."""


def _rate(gbps: float) -> str:
    return f"{max(1, round(gbps * 1000))}mbit"


def _add_class(ns: str, classid: str, gbps: float) -> None:
    """An htb class `classid` under the root qdisc of `ns`'s eth0, at `gbps`."""
    run(
        in_netns(
            ns,
            [
                "tc",
                "class",
                "add",
                "dev",
                "eth0",
                "parent",
                "1:",
                "classid",
                classid,
                *_class_args(gbps),
            ],
        )
    )


def _class_args(gbps: float, burst_bytes: int | None = None) -> list[str]:
    # Burst: a few ms of data at the rate, and at least a few 64 KB GSO segments, so the limit
    # holds the rate and not less (htb's default burst starves multi-Gbit/s classes).
    burst = burst_bytes or max(256 * 1024, int(gbps * 1e9 / 8 * 0.002))
    rate = _rate(gbps)
    return [
        "htb",
        "rate",
        rate,
        "ceil",
        rate,
        "burst",
        str(burst),
        "cburst",
        str(burst),
        "quantum",
        "60000",
    ]


def shape_node(plan: RigPlan, node: NodePlan, state: RigState) -> None:
    ns = node.namespace
    state.record("qdisc", namespace=ns, dev="eth0")
    run(
        in_netns(
            ns,
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "handle",
                "1:",
                "htb",
                "default",
                str(DEFAULT_CLASS),
            ],
        )
    )
    _add_class(ns, f"1:{DEFAULT_CLASS}", plan.default_rate_gbps(node.name))
    for peer in plan.nodes:
        if peer.name == node.name:
            continue
        classid = f"1:{10 + peer.index}"
        gbps = plan.link(node.name, peer.name).rate_gbps
        _add_class(ns, classid, gbps)
        run(
            in_netns(
                ns,
                [
                    "tc",
                    "filter",
                    "add",
                    "dev",
                    "eth0",
                    "parent",
                    "1:",
                    "protocol",
                    "ip",
                    "prio",
                    "1",
                    "u32",
                    "match",
                    "ip",
                    "dst",
                    f"{peer.ip}/32",
                    "flowid",
                    classid,
                ],
            )
        )


def set_pair_rate(
    plan: RigPlan, a: str, b: str, gbps: float, burst_bytes: int | None = None
) -> None:
    """Change the rate between nodes a and b, both directions, live (`burst_bytes`: htb's
    burst, default a few ms at the rate and at least 256 KB)."""
    for src, dst in ((a, b), (b, a)):
        sender, peer = plan.node(src), plan.node(dst)
        run(
            in_netns(
                sender.namespace,
                [
                    "tc",
                    "class",
                    "change",
                    "dev",
                    "eth0",
                    "parent",
                    "1:",
                    "classid",
                    f"1:{10 + peer.index}",
                    *_class_args(gbps, burst_bytes),
                ],
            )
        )


def pair_rate_gbps(plan: RigPlan, src: str, dst: str) -> float:
    """The rate tc enforces now from src to dst (read back from `tc class show`)."""
    sender, peer = plan.node(src), plan.node(dst)
    out = run(
        in_netns(
            sender.namespace,
            ["tc", "class", "show", "dev", "eth0", "classid", f"1:{10 + peer.index}"],
        )
    ).stdout.split()
    rate = out[out.index("rate") + 1]
    units = {"Kbit": 1e-6, "Mbit": 1e-3, "Gbit": 1.0, "bit": 1e-9}
    for suffix, factor in units.items():
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * factor
    return float(rate) * 1e-9
