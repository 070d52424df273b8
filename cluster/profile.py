"""A measured cost model: real layer calls on every node, fitted, and the plan made again.

The planner's modelled costs (speed x reference TFLOP/s, bytes / bandwidth, link latency)
miss what a small decode call really costs: Python and framing on both ends, the thread
wake-up on the shard, small GEMMs far below peak, a CPU quota that throttles a busy node.
`profile_layer_calls` measures them on the running cluster, with the model's own experts and
the data plane the model uses: for each node, layer calls of several sizes through the
dispatcher's transport, back to back (as a node sees them in a busy step), timed from the
send to the reply's arrival (for the attention node's own experts, their compute). A least
squares line per node gives `NodeCost(call_us, token_us)`: the fixed cost of a call and the
cost of each token-assignment in it. The planner reads them in place of its modelled figures
(`NodeCapacity.measured_*`), and `replan` moves the experts to the plan they give
(new replicas loaded before the table swap, old ones dropped after, as a rebalance does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .dispatch import RoutingTable, routes_from_placement
from .wire import ShardRequest, pack, wire_for

PROFILE_EXPERTS = (1, 2, 4)
"""Experts a profiled call goes through (each with the rows one expert gets in a decode step
of the planned batch): a call's cost grows with its experts (a GEMM pair each) and rows."""


@dataclass(frozen=True)
class NodeCost:
    """The fitted cost of one layer call on a node: call_us + rows x token_us."""

    node: str
    call_us: float
    token_us: float
    samples: int
    rows: tuple[int, ...]
    median_us: tuple[float, ...]
    """The median call time at each of `rows`."""

    def predict_us(self, rows: float) -> float:
        return self.call_us + rows * self.token_us

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _request(
    layer: int, experts: Sequence[int], per_expert: int, hidden: int, wire: str
) -> ShardRequest:
    """`per_expert` assignments to each of `experts` (sorted by expert), each its own row."""
    rows = per_expert * len(experts)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
    ids = np.repeat(np.asarray(experts, dtype=np.int32), per_expert)
    return ShardRequest(layer, pack(x, wire), np.arange(rows, dtype=np.int32), ids)


def _time_call(transport: Any, node: str, request: ShardRequest) -> float:
    """Seconds from the send to the reply's arrival (its compute, for a local node)."""
    t0 = time.perf_counter()
    sent = transport.send({node: request})
    for got_node, got in transport.replies(sent):
        if isinstance(got, Exception):
            raise RuntimeError(f"profiling node {got_node!r}: {got}")
        arrived = getattr(got, "arrived_at", None)
        return (arrived or time.perf_counter()) - t0
    raise RuntimeError(f"profiling node {node!r}: no reply")


def fit(node: str, samples: Mapping[int, Sequence[float]]) -> NodeCost:
    """Least squares on the medians per size (robust to a throttled or preempted call)."""
    rows = sorted(samples)
    medians = [statistics.median(samples[r]) * 1e6 for r in rows]
    if len(rows) >= 2:
        slope, intercept = np.polyfit(np.array(rows, float), np.array(medians), 1)
    else:
        slope, intercept = medians[0] / max(rows[0], 1), 0.0
    slope = max(float(slope), 1e-3)
    intercept = max(float(intercept), 0.0)
    return NodeCost(
        node, intercept, slope, sum(len(v) for v in samples.values()), tuple(rows), tuple(medians)
    )


def profile_layer_calls(
    ep: Any,
    nodes: Sequence[str],
    tokens_per_step: int | None = None,
    sizes: Sequence[int] = PROFILE_EXPERTS,
    repeats: int = 15,
    warmup: int = 5,
) -> dict[str, NodeCost]:
    """Measure and fit each node's layer-call cost on `ep` (an `ExpertParallelModel`) for
    decode steps of `tokens_per_step` sequences (default: what `ep` was planned for): calls
    through 1, 2 and 4 experts, each expert with the rows it gets at that batch (batch x
    top-k / experts), so the fitted cost per token-assignment carries each expert's share of
    fixed GEMM cost as the planned batch spreads it.

    Every node needs experts of the profiled layer (the first MoE layer): one that holds none
    is given all of that layer's experts first (they stay until `replan` moves them)."""
    config = ep.config
    layer = config.moe_layer_ids[0]
    experts = list(range(config.moe.num_experts))
    batch = tokens_per_step or ep.plan_options.tokens_per_step
    per_expert = max(1, round(batch * config.moe.top_k / config.moe.num_experts))
    held = ep.dispatcher.table.node_experts()
    adds = {n: {layer: experts} for n in nodes if not held.get(n, {}).get(layer)}
    if adds:
        ep.pool.load_many(adds)
    wire = wire_for(ep.dispatcher.wire, next(ep.model.parameters()).dtype)
    transport = ep.dispatcher.transport
    out: dict[str, NodeCost] = {}
    for node in nodes:
        mine = held.get(node, {}).get(layer) or experts
        requests = {
            k * per_expert: _request(layer, mine[:k], per_expert, config.hidden_size, wire)
            for k in sorted({min(k, len(mine)) for k in sizes})
        }
        samples: dict[int, list[float]] = {r: [] for r in requests}
        for _ in range(warmup):  # every size: a GEMM shape's first calls are slow
            for request in requests.values():
                _time_call(transport, node, request)
        for _ in range(repeats):
            for r, request in requests.items():
                samples[r].append(_time_call(transport, node, request))
        out[node] = fit(node, samples)
    ep.profiled_extra = adds  # what replan must account for (loaded here, not planned)
    return out


def replan_measured(ep: Any, costs: Mapping[str, NodeCost], trace: Any = None) -> Any:
    """Plan `ep`'s model again on its topology with measured `costs` (the options it was
    planned with otherwise), move the experts there, and return the placement."""
    from .planning import plan_for_topology

    opts = ep.plan_options
    placement = plan_for_topology(
        ep.topology,
        ep.config,
        trace,
        min_replicas=opts.min_replicas,
        reference_tflops=opts.reference_tflops,
        colocate=opts.colocate,
        tokens_per_step=opts.tokens_per_step,
        measured=costs,
    )
    replan(ep, placement)
    ep.node_costs = dict(costs)
    return placement


def replan(ep: Any, placement: Any) -> dict[str, int]:
    """Move `ep`'s experts to `placement` (keyed by model layer ids): load what is new, swap
    the routing table between layer calls, drop what is no longer routed. Returns counts."""
    table = RoutingTable(routes_from_placement(placement))
    have = ep.dispatcher.table.node_experts()
    for node, per in getattr(ep, "profiled_extra", {}).items():
        for layer, ids in per.items():
            have.setdefault(node, {}).setdefault(layer, [])
            have[node][layer] = sorted(set(have[node][layer]) | set(ids))
    want = table.node_experts()
    adds: dict[str, dict[int, list[int]]] = {}
    drops: dict[str, dict[int, list[int]]] = {}
    for node in set(have) | set(want):
        for layer in set(have.get(node, {})) | set(want.get(node, {})):
            h, w = set(have.get(node, {}).get(layer, [])), set(want.get(node, {}).get(layer, []))
            if w - h:
                adds.setdefault(node, {})[layer] = sorted(w - h)
            if h - w:
                drops.setdefault(node, {})[layer] = sorted(h - w)
    if adds:
        ep.pool.load_many(adds)
    ep.dispatcher.swap_table(table)
    ep.placement = placement
    if drops:
        ep.pool.drop_many(drops)
    ep.profiled_extra = {}
    return {
        "loaded": sum(len(v) for per in adds.values() for v in per.values()),
        "dropped": sum(len(v) for per in drops.values() for v in per.values()),
    }


class CallLog:
    """`DispatchObserver`: every layer call's rows and time per node, as served.

    Time: a remote node's round trip from the send to the reply's arrival; for nodes in
    `local` (the attention node's own experts, `cluster/colocated.py`) their compute. `fit`
    turns the log into `NodeCost`s measured under real traffic (the duty cycle, quotas and
    contention of the running model), which a profile of calls in a row can only approach."""

    def __init__(self, local: Sequence[str] = ()) -> None:
        self.local = set(local)
        self.samples: dict[str, list[tuple[int, float]]] = {}
        self.traffic_ratio = 1.0
        """Set by `fit`: logged remote call time / what the priors predicted (median)."""

    def on_reply(
        self, node: str, layer: int, rows: int, nbytes: int, round_trip_s: float, busy_s: float
    ) -> None:
        seconds = busy_s if node in self.local else round_trip_s
        self.samples.setdefault(node, []).append((rows, seconds))

    def on_step(self, layer: int, counts: np.ndarray) -> None:
        pass

    def clear(self) -> None:
        self.samples = {}

    def fit(
        self, prior: Mapping[str, NodeCost] | None = None, min_calls: int = 30
    ) -> dict[str, NodeCost]:
        """node -> NodeCost fitted on the calls logged. The line goes through the mean time
        at each size decile, so a size seen often does not outweigh the slope.

        A remote node with fewer than `min_calls` keeps its `prior` (a profile of calls in a
        row, on an otherwise idle cluster), scaled by how much more the remote nodes that
        were logged cost under traffic than their own priors said (the median ratio,
        `traffic_ratio`): without it, a node nobody called would look cheaper than every
        node that was, only because it was measured alone."""
        out = dict(prior or {})
        ratios: list[float] = []
        for node, calls in self.samples.items():
            if len(calls) < min_calls:
                continue
            rows = np.array([r for r, _ in calls], dtype=float)
            secs = np.array([s for _, s in calls], dtype=float)
            edges = np.unique(np.quantile(rows, np.linspace(0, 1, 11)))
            keys = np.searchsorted(edges, rows, side="right")  # each call's size decile
            deciles = np.unique(keys)
            centres = [float(rows[keys == k].mean()) for k in deciles]
            means = [float(secs[keys == k].mean()) * 1e6 for k in deciles]
            if len(centres) >= 2 and np.ptp(centres) > 0:
                slope, intercept = np.polyfit(np.array(centres), np.array(means), 1)
            else:  # one size only: the mean call, spread per row
                slope, intercept = float(np.mean(secs) * 1e6 / max(rows.mean(), 1.0)), 0.0
            if slope <= 0:  # noise over a narrow range of sizes: the mean per row
                slope, intercept = float(secs.sum() * 1e6 / max(rows.sum(), 1.0)), 0.0
            out[node] = NodeCost(
                node,
                max(float(intercept), 0.0),
                max(float(slope), 1e-3),
                len(calls),
                tuple(round(c) for c in centres),
                tuple(means),
            )
            before = (prior or {}).get(node)
            if before is not None and node not in self.local:
                expected = before.predict_us(float(rows.mean()))
                if expected > 0:
                    ratios.append(float(secs.mean()) * 1e6 / expected)
        self.traffic_ratio = float(np.median(ratios)) if ratios else 1.0
        for node, cost in (prior or {}).items():
            logged = len(self.samples.get(node, ()))
            if node not in self.local and logged < min_calls and ratios:
                r = self.traffic_ratio
                out[node] = NodeCost(
                    node,
                    cost.call_us * r,
                    cost.token_us * r,
                    cost.samples,
                    cost.rows,
                    tuple(m * r for m in cost.median_us),
                )
        return out

    def measured(self) -> dict[str, tuple[int, int, float]]:
        """node -> (calls, rows, seconds) logged."""
        return {
            n: (len(c), sum(r for r, _ in c), sum(s for _, s in c)) for n, c in self.samples.items()
        }
