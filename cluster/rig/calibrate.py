"""Calibration: what the rig's nodes and links really do, measured once it is up.

- Node speed: an actor pinned to each node (`expertmesh_node_<name>`, one torch thread, as a
  shard computes) runs an expert-shaped SwiGLU GEMM (rows x hidden -> inter -> hidden) for a
  window of many CFS periods; all nodes at once, as they compute during a step.
- Links: for every pair, a TCP bulk transfer from one namespace to the other (bandwidth, sized
  to last about half a second at the pair's rate) and 200 one-byte round trips (`probe.py`).
  Probes run in the namespaces but outside the nodes' CPU groups (in the rig's probe group:
  no quota, the rig's priority): they measure the link, not a node's CPU or a busy machine.
- Dispatch, through the data plane itself (`cluster/transport.py`'s persistent channel to a
  shard on each node, echo requests of decode size, packed and unpacked as a layer call is):
  the attention side's CPU time per call (what it pays serially, call after call:
  `call_overhead_us`, in wall time on the attention node's quota) and the round trip to each
  node (the rest of it, wire and the shard's handling, becomes that link's latency). The
  round trip of an empty Ray actor call is measured too, for comparison (`call_rtt_us`).

`CalibrationResult.topology` is the declared topology with every one of those replaced by
the measured value (speeds relative to `reference_tflops`, per-pair links, `call_overhead_us`):
what the planner reads on the rig.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.topology import Link, LinkRules, PairLink, Topology

from . import cgroups
from .plan import RigPlan
from .state import RigState
from .system import RigError, in_netns

PROBE = Path(__file__).with_name("probe.py")
PROBE_PORT = 5201
GEMM_WINDOW_S = 1.0
DEFAULT_GEMM_SHAPE = (64, 256, 192)
"""(rows, hidden, intermediate): the demo model's expert, rows enough that the GEMM measures
the node's CPU quota (speed), not per-call costs; a decode call's fixed costs are measured on
the data plane below and by `cluster/profile.py` with the model itself."""
CHANNEL_ROWS = 8
"""Rows of a calibration echo call (a decode layer call's share of one node)."""
CHANNEL_CALLS = 200


@dataclass(frozen=True)
class NodeMeasure:
    name: str
    declared_speed: float
    cpu_cores: float
    gflops: float
    measured_speed: float
    call_rtt_us: float
    """Median round trip of an empty actor call from the driver."""
    channel_rtt_us: float = 0.0
    """Median round trip of a decode-size echo call on the data plane's channel."""
    channel_cpu_us: float = 0.0
    """Median CPU time the attention side spends on one such call (pack, send, read, unpack)."""


@dataclass(frozen=True)
class LinkMeasure:
    a: str
    b: str
    declared_gbps: float
    declared_latency_us: float
    rig_rate_gbps: float
    """What tc enforces: declared x link_scale (the figure measured_gbps is judged against)."""
    measured_gbps: float
    rtt_us: float


@dataclass(frozen=True)
class CalibrationResult:
    nodes: tuple[NodeMeasure, ...]
    links: tuple[LinkMeasure, ...]
    reference_tflops: float
    call_overhead_us: float
    link_scale: float
    gemm_shape: tuple[int, int, int]
    topology: Topology

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "links": [asdict(link) for link in self.links],
            "reference_tflops": self.reference_tflops,
            "call_overhead_us": self.call_overhead_us,
            "link_scale": self.link_scale,
            "gemm_shape": list(self.gemm_shape),
            "latency": "not emulated (no netem in this kernel): measured round trip only",
        }


class _Probe:
    """The calibration actor (one per node)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)

    def gemm_gflops(self, rows: int, hidden: int, inter: int, window_s: float) -> float:
        import torch

        x = torch.randn(rows, hidden)
        w1, w3 = torch.randn(hidden, inter), torch.randn(hidden, inter)
        w2 = torch.randn(inter, hidden)

        def expert() -> None:
            h = torch.nn.functional.silu(x @ w1) * (x @ w3)
            h @ w2

        for _ in range(3):
            expert()
        iters, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < window_s:
            expert()
            iters += 1
        return 6 * rows * hidden * inter * iters / elapsed / 1e9

    def echo(self, payload: bytes) -> bytes:
        return payload

    def prepare(self) -> None:
        """Start an expert shard holding nothing in this actor (the data plane's echo end)."""
        import ray

        from expertmesh.cluster.shard import ExpertShard

        self.shard = ExpertShard(f"probe-{ray.get_runtime_context().get_node_id()[:8]}", "", {})

    def open_channel(self, secret: bytes) -> tuple[str, int]:
        """A data-plane channel to that shard (echo calls only)."""
        return self.shard.open_channel(secret)


def measure_channels(
    actors: dict[str, Any], hidden: int, rows: int = CHANNEL_ROWS, calls: int = CHANNEL_CALLS
) -> dict[str, tuple[float, float]]:
    """Node -> (median round trip us, median attention-side CPU us) of an echo layer call on
    the channel transport, one node at a time, each call packed and unpacked as dispatch does."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from expertmesh.cluster.transport import CHANNEL_SPIN_US, ChannelTransport
    from expertmesh.cluster.wire import ShardRequest, pack, unpack

    transport = ChannelTransport(SimpleNamespace(handles=actors), spin_us=CHANNEL_SPIN_US)
    x = torch.randn(rows, hidden)
    row_of, experts = np.arange(rows, dtype=np.int32), np.zeros(rows, dtype=np.int32)

    def call(node: str) -> None:
        request = ShardRequest(0, pack(x, "fp32"), row_of, experts, echo=True)
        for _, got in transport.replies(transport.send({node: request})):
            if isinstance(got, Exception):
                raise RigError(f"calibration channel to {node} failed: {got}")
            unpack(got.outputs, torch.float32)  # type: ignore[arg-type]

    out: dict[str, tuple[float, float]] = {}
    try:
        for node in actors:
            for _ in range(20):
                call(node)
            # Round trips as the data plane makes them (polling for the reply); the CPU of a
            # call without the polling, which is waiting, not work (`CHANNEL_SPIN_US`).
            walls, cpus = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                call(node)
                walls.append(time.perf_counter() - t0)
            transport.spin_s, spin_s = 0.0, transport.spin_s
            for _ in range(calls):
                c0 = time.thread_time()
                call(node)
                cpus.append(time.thread_time() - c0)
            transport.spin_s = spin_s
            out[node] = (statistics.median(walls) * 1e6, statistics.median(cpus) * 1e6)
    finally:
        transport.close()
    return out


def measure_nodes(
    plan: RigPlan,
    shape: tuple[int, int, int],
    window_s: float = GEMM_WINDOW_S,
    on_ready: Callable[[], None] | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, tuple[float, float]]]:
    """Node -> GEMM GFLOP/s, node -> median empty actor-call round trip (us), and node ->
    (round trip, attention-side CPU) of a data-plane echo call (us, `measure_channels`).
    `on_ready` runs once every probe actor answers (the rig applies the CPU quotas then)."""
    import ray

    cls: Any = ray.remote(num_cpus=0)(_Probe)
    actors: dict[str, Any] = {
        n.name: cls.options(resources={node_resource(n.name): 0.001}).remote() for n in plan.nodes
    }
    try:
        # The echo shards start before the quotas apply (a shard imports the model code).
        ray.get([a.prepare.remote() for a in actors.values()])
        if on_ready is not None:
            on_ready()
        gflops_refs = {n: a.gemm_gflops.remote(*shape, window_s) for n, a in actors.items()}
        gflops = {n: float(ray.get(r)) for n, r in gflops_refs.items()}
        calls: dict[str, float] = {}
        payload = b"\0" * 64
        for name, actor in actors.items():
            for _ in range(10):
                ray.get(actor.echo.remote(payload))
            times = []
            for _ in range(100):
                t = time.perf_counter()
                ray.get(actor.echo.remote(payload))
                times.append(time.perf_counter() - t)
            calls[name] = statistics.median(times) * 1e6
        channels = measure_channels(actors, shape[1])
        return gflops, calls, channels
    finally:
        for actor in actors.values():
            ray.kill(actor)


def probe_link(plan: RigPlan, src: str, dst: str, seconds: float = 0.5) -> dict[str, float]:
    """One TCP transfer and ping-pong from node src to node dst (through their namespaces)."""
    a, b = plan.node(src), plan.node(dst)
    rate = plan.link(src, dst).rate_gbps
    nbytes = max(1 << 20, int(rate * 1e9 / 8 * seconds))
    py = sys.executable
    enter = cgroups.ensure_probe_group()

    def command(namespace: str, *args: str) -> list[str]:
        argv = " ".join(shlex.quote(a) for a in in_netns(namespace, [py, str(PROBE), *args]))
        return ["sh", "-c", f"{enter}; exec {argv}"]

    server = subprocess.Popen(
        command(b.namespace, "serve", b.ip, str(PROBE_PORT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RigError(
                f"link probe server in {b.namespace} did not start: {server.stderr.read() if server.stderr else ''}"
            )
        done = subprocess.run(
            command(a.namespace, "send", b.ip, str(PROBE_PORT), str(nbytes)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RigError(f"link probe {src} -> {dst} failed: {done.stderr.strip()}")
        return dict(json.loads(done.stdout))
    finally:
        server.wait(timeout=30) if server.poll() is None else None


def measure_links(plan: RigPlan) -> list[LinkMeasure]:
    out = []
    for link in plan.links:
        probe = probe_link(plan, link.a, link.b)
        out.append(
            LinkMeasure(
                a=link.a,
                b=link.b,
                declared_gbps=link.declared_gbps,
                declared_latency_us=link.declared_latency_us,
                rig_rate_gbps=link.rate_gbps,
                measured_gbps=probe["gbps"],
                rtt_us=probe["rtt_us"],
            )
        )
    return out


def measured_topology(
    declared: Topology,
    gflops: dict[str, float],
    links: list[LinkMeasure],
    call_overhead_us: float,
) -> tuple[Topology, float]:
    """The declared topology with measured speeds, links and call overhead (and the
    reference TFLOP/s of a speed-1.0 node that makes the speeds comparable to the declared)."""
    declared_sum = sum(float(n.speed or 1.0) for n in declared.nodes)
    reference_gflops = sum(gflops.values()) / declared_sum
    nodes = tuple(
        replace(n, speed=round(gflops[n.name] / reference_gflops, 4)) for n in declared.nodes
    )
    pairs = tuple(
        PairLink((m.a, m.b), Link(bandwidth_gbps=m.measured_gbps, latency_us=m.rtt_us / 2))
        for m in links
    )
    slowest = min(links, key=lambda m: m.measured_gbps) if links else None
    default = (
        Link(bandwidth_gbps=slowest.measured_gbps, latency_us=slowest.rtt_us / 2)
        if slowest
        else declared.links.default
    )
    topology = replace(
        declared,
        name=f"{declared.name}-measured",
        nodes=nodes,
        links=LinkRules(default=default, pairs=pairs),
        reference_tflops=reference_gflops / 1000,
        call_overhead_us=call_overhead_us,
    )
    return topology, reference_gflops / 1000


def calibrate_rig(
    plan: RigPlan,
    state: RigState,
    declared: Topology,
    shape: tuple[int, int, int] = DEFAULT_GEMM_SHAPE,
    on_ready: Callable[[], None] | None = None,
) -> CalibrationResult:
    """Measure nodes, links and the dispatch call (needs a driver connected: `rig.driver`)."""
    gflops, calls, channels = measure_nodes(plan, shape, on_ready=on_ready)
    links = measure_links(plan)
    head = plan.head.name
    # The attention side's CPU per call, in wall time on its quota (serial, call after call),
    # and for each node the rest of the call's round trip: its link's latency both ways.
    others = [n for n in channels if n != head] or [head]
    cpu_us = statistics.median(channels[n][1] for n in others)
    overhead = cpu_us / min(1.0, plan.head.cores)
    call_links = [
        replace(
            m,
            rtt_us=max(m.rtt_us, channels[m.b if m.a == head else m.a][0] - overhead),
        )
        if head in (m.a, m.b)
        else m
        for m in links
    ]
    topology, tflops = measured_topology(declared, gflops, call_links, overhead)
    nodes = tuple(
        NodeMeasure(
            name=n.name,
            declared_speed=n.speed,
            cpu_cores=n.cores,
            gflops=gflops[n.name],
            measured_speed=topology.node(n.name).speed or 0.0,
            call_rtt_us=calls[n.name],
            channel_rtt_us=channels[n.name][0],
            channel_cpu_us=channels[n.name][1],
        )
        for n in plan.nodes
    )
    return CalibrationResult(
        nodes, tuple(links), tflops, overhead, plan.link_scale, shape, topology
    )
