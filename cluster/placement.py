"""Expert placement on heterogeneous nodes: which node holds a replica of which expert, and
what share of the expert's tokens each replica takes.

    placement = plan_placement(nodes, shape, load, PlacementOptions(min_replicas=2))
    new, moves = plan_increment(placement, nodes, shape, drifted_load)

Unlike EPLB (`cluster/eplb.py`: identical GPUs, equal slots per GPU, links ignored) the planner
knows each node's compute speed, its expert memory (slots) and its link to the attention node.

Cost model (seconds per decode step of `tokens_per_step` tokens; each token visits `top_k`
experts per layer, so a layer carries `tokens_per_step * top_k` token-assignments, split over
experts in proportion to `load`):

- a token-assignment on node n costs `c_n = compute + link`, where compute =
  `2 * expert_params / (speed_n * reference_tflops)` (a token through an expert's GEMMs) and
  link = `2 * hidden_size * dtype_bytes * 8 / link_gbps` (the hidden state goes to the node and
  the result comes back over the node's link to the attention node);
- every layer in which node n serves tokens adds `2 * link_latency_us` (one dispatch and one
  combine message per layer per node per step);
- node time = the sum over its replicas, all layers; the slowest node gates the step, so the
  objective is the max node time. `balancedness` = max / mean node time. Since layers run one
  after another, a layer is really gated by its own slowest node: the planner balances every
  layer on its own (which balances the sums too), and `step_balancedness` reports
  sum_layers(max node time) / sum_layers(mean node time).

A node whose `link_gbps` is `math.inf` shares the attention node's process: its tokens cross
no link (they count for no `cross_node_bytes_per_token`).

Algorithm (per layer, vectorised over layers with numpy):

1. Slots per layer: each node's `expert_slots` are spread evenly over the layers.
2. Replica counts: every expert starts at `min_replicas`. A layer cannot finish before
   `tau = (tokens + sum_n latency_n * v_n) / sum_n v_n` (all nodes busy, v_n = 1 / c_n), nor
   before its hottest expert's piece `load / (sum of the r fastest v)`. Extra replicas go, one
   at a time, to the expert with the largest piece (across all layers, within the slot
   budget), and stop once no piece exceeds tau: past that point another replica no longer
   lowers the predicted max.
3. Assignment, longest processing time first (LPT for uniform machines): replicated experts,
   hottest first, each take the r nodes where they would finish soonest, and their tokens are
   split by water-filling: in proportion to node speed on equally loaded nodes (faster nodes
   take more), less to nodes that already carry more. Then single-replica experts, heaviest
   first, each go to the node that minimises its finish time (current time + work / speed +
   link cost). Node slots are never exceeded; replicas of one expert are on distinct nodes.
   With `rack_local`, nodes whose link is more than 4x slower than the best link get a replica
   only when no faster node has a slot left for it.
4. Local improvement: while it lowers the layer's max, move work off the most loaded node:
   shift tokens of a replicated expert to its replica on the least loaded node, move a
   replica there (if it has a free slot), or split one there with a spare slot of the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

__all__ = [
    "ExpertShape",
    "Move",
    "NodeCapacity",
    "Placement",
    "PlacementError",
    "PlacementOptions",
    "ReplicaAssignment",
    "bytes_moved",
    "evaluate",
    "placement_from_eplb",
    "plan_increment",
    "plan_placement",
]

SLOW_LINK_RATIO = 4.0
"""With rack_local, a link this many times slower than the best is a last resort."""


class PlacementError(ValueError):
    """The nodes cannot hold the experts as asked (too few slots, too few nodes, bad input)."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class NodeCapacity:
    """What the planner needs to know about one expert node."""

    name: str
    speed: float
    """Compute speed relative to the reference node (1.0); 0.5 is twice as slow."""
    expert_slots: int
    """How many experts (of any layer) fit in the node's weight memory."""
    link_gbps: float
    """Bandwidth of the node's link to the attention node; `math.inf` = same process."""
    link_latency_us: float
    """One-way latency of that link."""
    rack: str = ""

    def __post_init__(self) -> None:
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"node {self.name!r}: speed must be finite and > 0, got {self.speed}")
        if self.expert_slots < 0:
            raise ValueError(f"node {self.name!r}: expert_slots must be >= 0")
        if not self.link_gbps > 0:
            raise ValueError(f"node {self.name!r}: link_gbps must be > 0, got {self.link_gbps}")
        if not (self.link_latency_us >= 0 and math.isfinite(self.link_latency_us)):
            raise ValueError(f"node {self.name!r}: link_latency_us must be finite and >= 0")

    @property
    def colocated(self) -> bool:
        """True when the node shares the attention node's process (no link to cross)."""
        return math.isinf(self.link_gbps)


@dataclass(frozen=True)
class ExpertShape:
    """The routed-expert part of a MoE model, as far as placement cares."""

    num_layers: int
    """MoE layers (dense layers not counted)."""
    num_experts: int
    """Routed experts per layer."""
    top_k: int
    """Experts each token visits per layer."""
    hidden_size: int
    expert_bytes: int
    """Weight bytes of one expert (all its matrices)."""
    dtype_bytes: int = 2
    """Bytes per activation element sent over links (and per weight element)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExpertShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype_bytes < 1:
            raise ValueError(f"ExpertShape.dtype_bytes must be >= 1, got {self.dtype_bytes}")

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state."""
        return self.hidden_size * self.dtype_bytes

    @property
    def expert_flops_per_token(self) -> float:
        """A token through one expert: 2 FLOPs per weight."""
        return 2.0 * self.expert_bytes / self.dtype_bytes


@dataclass(frozen=True)
class PlacementOptions:
    """How to plan."""

    min_replicas: int = 1
    """Replicas of every expert, on distinct nodes (2+ for failover)."""
    slot_budget: int | None = None
    """Physical expert slots to use in all (nodes and layers); None = all the nodes have, of
    which the planner uses only what still lowers the predicted step time."""
    rack_local: bool = False
    """Keep experts off nodes whose link is > 4x slower than the best while faster nodes have
    a slot for them."""
    tokens_per_step: int = 256
    """Tokens in one decode step (the batch); turns load shares into seconds."""
    reference_tflops: float = 50.0
    """Effective TFLOP/s of a speed-1.0 node on expert GEMMs."""

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}")
        if self.slot_budget is not None and self.slot_budget < 1:
            raise ValueError(f"slot_budget must be >= 1, got {self.slot_budget}")
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if not (self.reference_tflops > 0 and math.isfinite(self.reference_tflops)):
            raise ValueError(
                f"reference_tflops must be finite and > 0, got {self.reference_tflops}"
            )


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class ReplicaAssignment:
    node: str
    share: float
    """Fraction of the expert's tokens this replica takes (an expert's shares sum to 1)."""


@dataclass(frozen=True)
class Move:
    """One change between two placements.

    src and dst set: the replica moves (dst loads it, then src drops it); only dst: a new
    replica; only src: a dropped replica. `bytes` are the weight bytes dst must load.
    """

    layer: int
    expert: int
    src: str | None
    dst: str | None
    bytes: int


def bytes_moved(moves: Sequence[Move]) -> int:
    """Expert weight bytes the moves load onto nodes."""
    return sum(m.bytes for m in moves)


@dataclass(frozen=True, eq=False)
class Placement:
    """Where every expert of every layer lives and the share of its tokens each replica takes.

    Stored as flat arrays (one entry per replica, sorted by layer, expert, node); `replicas`
    is the dict view. Metrics are the cost model's prediction for the load it was planned for.
    """

    nodes: tuple[str, ...]
    layer_ids: tuple[int, ...]
    """The layer key of each layer index (0..L-1 unless relabelled with `with_layer_ids`)."""
    num_experts: int
    replica_layer: np.ndarray = field(repr=False)
    """(P,) layer index of each replica."""
    replica_expert: np.ndarray = field(repr=False)
    replica_node: np.ndarray = field(repr=False)
    """(P,) index into `nodes`."""
    replica_share: np.ndarray = field(repr=False)
    node_time: dict[str, float]
    """Predicted seconds per step each node works (all layers)."""
    node_tokens: dict[str, float]
    """Token-assignments per step each node serves (all layers)."""
    balancedness: float
    """max / mean of node_time (speeds and links counted)."""
    balancedness_equal_speed: float
    """max / mean of node_tokens (as if all nodes were equal)."""
    step_balancedness: float
    """sum over layers of the slowest node's time / sum over layers of the mean node time."""
    cross_node_bytes_per_token: float
    """Bytes one token sends over links in all layers (there and back)."""
    step_time_s: float
    """Predicted expert time of one step: sum over layers of the slowest node's time."""

    @cached_property
    def replicas(self) -> dict[tuple[int, int], tuple[ReplicaAssignment, ...]]:
        """{(layer, expert): (ReplicaAssignment, ...)}, layers keyed by `layer_ids`."""
        out: dict[tuple[int, int], list[ReplicaAssignment]] = {}
        for layer, expert, node, share in zip(
            self.replica_layer.tolist(),
            self.replica_expert.tolist(),
            self.replica_node.tolist(),
            self.replica_share.tolist(),
        ):
            key = (self.layer_ids[layer], expert)
            out.setdefault(key, []).append(ReplicaAssignment(self.nodes[node], share))
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def _by_node(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {n: [] for n in self.nodes}
        for layer, expert, node in zip(
            self.replica_layer.tolist(), self.replica_expert.tolist(), self.replica_node.tolist()
        ):
            out[self.nodes[node]].append((self.layer_ids[layer], expert))
        return out

    def experts_on(self, node: str) -> list[tuple[int, int]]:
        """(layer, expert) pairs with a replica on `node` (empty for an unknown node)."""
        return list(self._by_node.get(node, []))

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def slots_used(self) -> dict[str, int]:
        counts = np.bincount(self.replica_node, minlength=len(self.nodes))
        return {n: int(c) for n, c in zip(self.nodes, counts)}

    def with_layer_ids(self, layer_ids: Sequence[int]) -> Placement:
        """The same placement with layer index i keyed as `layer_ids[i]` (e.g. model layers)."""
        ids = tuple(int(i) for i in layer_ids)
        if len(ids) != self.num_layers or len(set(ids)) != len(ids):
            raise PlacementError(
                f"with_layer_ids: need {self.num_layers} distinct layer ids, got {list(ids)}"
            )
        return replace(self, layer_ids=ids)

    def by_index(self, layer_ids: Sequence[int]) -> Placement:
        """Undo `with_layer_ids(layer_ids)`: layers keyed 0..L-1 again."""
        if tuple(int(i) for i in layer_ids) != self.layer_ids:
            raise PlacementError(
                f"by_index: placement layers are {list(self.layer_ids)}, not {list(layer_ids)}"
            )
        return replace(self, layer_ids=tuple(range(self.num_layers)))

    def to_json(self) -> str:
        doc = {
            "format": "expertmesh.placement/1",
            "nodes": list(self.nodes),
            "layer_ids": list(self.layer_ids),
            "num_experts": self.num_experts,
            "replicas": [
                [layer, expert, node, share]
                for layer, expert, node, share in zip(
                    self.replica_layer.tolist(),
                    self.replica_expert.tolist(),
                    self.replica_node.tolist(),
                    self.replica_share.tolist(),
                )
            ],
            "node_time": self.node_time,
            "node_tokens": self.node_tokens,
            "balancedness": self.balancedness,
            "balancedness_equal_speed": self.balancedness_equal_speed,
            "step_balancedness": self.step_balancedness,
            "cross_node_bytes_per_token": self.cross_node_bytes_per_token,
            "step_time_s": self.step_time_s,
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        try:
            doc = json.loads(text)
            if doc.get("format") != "expertmesh.placement/1":
                raise PlacementError(f"not a placement document (format {doc.get('format')!r})")
            rows = np.asarray(doc["replicas"], dtype=np.float64).reshape(-1, 4)
            return cls(
                nodes=tuple(doc["nodes"]),
                layer_ids=tuple(int(i) for i in doc["layer_ids"]),
                num_experts=int(doc["num_experts"]),
                replica_layer=rows[:, 0].astype(np.int64),
                replica_expert=rows[:, 1].astype(np.int64),
                replica_node=rows[:, 2].astype(np.int64),
                replica_share=rows[:, 3].copy(),
                node_time={k: float(v) for k, v in doc["node_time"].items()},
                node_tokens={k: float(v) for k, v in doc["node_tokens"].items()},
                balancedness=float(doc["balancedness"]),
                balancedness_equal_speed=float(doc["balancedness_equal_speed"]),
                step_balancedness=float(doc["step_balancedness"]),
                cross_node_bytes_per_token=float(doc["cross_node_bytes_per_token"]),
                step_time_s=float(doc["step_time_s"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PlacementError):
                raise
            raise PlacementError(f"placement JSON is malformed: {e}") from e


# ---------------------------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True, eq=False)
class _Cost:
    """Per-node cost coefficients (N nodes)."""

    token_s: np.ndarray
    """(N,) seconds per token-assignment: compute + link there and back."""
    latency_s: np.ndarray
    """(N,) seconds per layer in which the node serves tokens (dispatch + combine message)."""
    colocated: np.ndarray
    """(N,) bool: no link to cross."""
    preferred: np.ndarray
    """(N,) bool: usable freely (False: a slow link under rack_local)."""
    token_link_bytes: int
    """Bytes one token-assignment sends over a link, there and back."""

    @property
    def speed(self) -> np.ndarray:
        """(N,) token-assignments per second."""
        return 1.0 / self.token_s


def _cost(nodes: Sequence[NodeCapacity], shape: ExpertShape, options: PlacementOptions) -> _Cost:
    speed = np.array([n.speed for n in nodes], dtype=np.float64)
    gbps = np.array([n.link_gbps for n in nodes], dtype=np.float64)
    colocated = np.isinf(gbps)
    link_bytes = 2 * shape.token_bytes
    compute_s = shape.expert_flops_per_token / (speed * options.reference_tflops * 1e12)
    link_s = np.where(colocated, 0.0, link_bytes * 8 / (np.where(colocated, 1.0, gbps) * 1e9))
    latency_s = np.array([2e-6 * n.link_latency_us for n in nodes], dtype=np.float64)
    preferred = np.ones(len(nodes), dtype=bool)
    if options.rack_local:
        preferred = gbps * SLOW_LINK_RATIO >= gbps.max()
    return _Cost(compute_s + link_s, latency_s, colocated, preferred, link_bytes)


def _token_load(
    load: np.ndarray | None, shape: ExpertShape, options: PlacementOptions
) -> np.ndarray:
    """(L, E) token-assignments per step: each layer's load scaled to tokens_per_step * top_k."""
    L, E = shape.num_layers, shape.num_experts
    if load is None:
        w = np.ones((L, E))
    else:
        w = np.asarray(load, dtype=np.float64)
        if w.shape != (L, E):
            raise PlacementError(f"load has shape {w.shape}; the model has ({L}, {E}) experts")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise PlacementError("load must be finite and >= 0 (token counts or shares)")
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / E)
    return w * (options.tokens_per_step * shape.top_k)


def _layer_times(
    tokens: np.ndarray, layer: np.ndarray, node: np.ndarray, num_layers: int, cost: _Cost
) -> tuple[np.ndarray, np.ndarray]:
    """Per-replica tokens -> (L, N) node times and (L, N) node tokens."""
    N = len(cost.token_s)
    key = layer * N + node
    node_tokens = np.bincount(key, weights=tokens, minlength=num_layers * N).reshape(-1, N)
    busy = np.bincount(key, weights=(tokens > 0), minlength=num_layers * N).reshape(-1, N) > 0
    times = node_tokens * cost.token_s + busy * cost.latency_s
    return times, node_tokens


def _max_over_mean(x: np.ndarray) -> float:
    mean = float(x.mean())
    return float(x.max()) / mean if mean > 0 else 1.0


def _metrics(
    a: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    cost: _Cost,
    shape: ExpertShape,
    options: PlacementOptions,
) -> dict[str, Any]:
    L = a.shape[0]
    tokens = a[layer, expert] * share
    times, node_tokens = _layer_times(tokens, layer, node, L, cost)
    node_time, node_total = times.sum(axis=0), node_tokens.sum(axis=0)
    layer_mean = times.mean(axis=1)
    remote = float(tokens[~cost.colocated[node]].sum())
    return {
        "node_time_s": node_time,
        "node_tokens": node_total,
        "layer_node_time_s": times,
        "balancedness": _max_over_mean(node_time),
        "balancedness_equal_speed": _max_over_mean(node_total),
        "step_balancedness": float(times.max(axis=1).sum() / max(layer_mean.sum(), 1e-300)),
        "step_time_s": float(times.max(axis=1).sum()),
        "cross_node_bytes_per_token": remote * cost.token_link_bytes / options.tokens_per_step,
    }


# ---------------------------------------------------------------------------------------------
# Feasibility and slots per layer


def _check_nodes(nodes: Sequence[NodeCapacity]) -> None:
    if not nodes:
        raise PlacementError("no nodes to place experts on")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PlacementError(f"node names must be unique; repeated: {dup}")


def _check_feasible(
    nodes: Sequence[NodeCapacity], shape: ExpertShape, options: PlacementOptions
) -> int:
    """Raise PlacementError if the minimum cannot fit; the slot budget to plan with."""
    L, E, m = shape.num_layers, shape.num_experts, options.min_replicas
    with_slots = sum(1 for n in nodes if n.expert_slots > 0)
    if m > with_slots:
        raise PlacementError(
            f"min_replicas={m} needs {m} distinct nodes with expert slots; only {with_slots} "
            f"of {len(nodes)} nodes have any"
        )
    need = L * E * m
    total = sum(n.expert_slots for n in nodes)
    usable = sum(min(n.expert_slots, L * E) for n in nodes)
    if usable < need:
        extra = (
            f" ({usable} usable: a node holds at most one replica of each of the {L * E} experts)"
            if usable < total
            else ""
        )
        raise PlacementError(
            f"not enough expert slots: need {need} ({L} layers x {E} experts x {m} replicas), "
            f"have {total}{extra}"
        )
    budget = usable if options.slot_budget is None else min(options.slot_budget, usable)
    if budget < need:
        raise PlacementError(
            f"slot_budget={options.slot_budget} is below the {need} slots needed "
            f"({L} layers x {E} experts x {m} replicas)"
        )
    return budget


def _spread_over_layers(slots: np.ndarray, num_layers: int, offset: int = 0) -> np.ndarray:
    """(L, N) caps: each node's slots spread evenly over layers, remainders staggered so layer
    totals differ by at most one."""
    caps = np.repeat((slots // num_layers)[None, :], num_layers, axis=0)
    for n, extra in enumerate((slots % num_layers).tolist()):
        rows = (offset + np.arange(extra)) % num_layers
        caps[rows, n] += 1
        offset = (offset + extra) % num_layers
    return caps


def _layer_caps(
    nodes: Sequence[NodeCapacity], shape: ExpertShape, cost: _Cost, used: np.ndarray | None = None
) -> np.ndarray:
    """(L, N) slots each node may use in each layer: `used` (already held) plus its free slots
    spread over layers, never more than one per expert."""
    L, E = shape.num_layers, shape.num_experts
    slots = np.array([n.expert_slots for n in nodes], dtype=np.int64)
    if used is None:
        used = np.zeros((L, len(nodes)), dtype=np.int64)
    free = np.maximum(np.minimum(slots, L * E) - used.sum(axis=0), 0)
    return np.minimum(used + _spread_over_layers(free, L), E)


# ---------------------------------------------------------------------------------------------
# Planning steps


def _layer_bounds(a: np.ndarray, caps: np.ndarray, cost: _Cost) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: tau (L,), the time if all usable nodes finish together, and (L, N+1) the
    speed sum of the r fastest usable nodes (index r)."""
    usable = (caps > 0) & cost.preferred
    usable = np.where(usable.any(axis=1, keepdims=True), usable, caps > 0)
    v = np.where(usable, cost.speed, 0.0)
    tau = (a.sum(axis=1) + (v * cost.latency_s).sum(axis=1)) / v.sum(axis=1)
    vtop = np.concatenate([np.zeros((len(a), 1)), np.cumsum(-np.sort(-v, axis=1), axis=1)], axis=1)
    return tau, vtop


def _replica_counts(
    a: np.ndarray, caps: np.ndarray, cost: _Cost, budget: int, min_replicas: int
) -> np.ndarray:
    """(L, E) replicas per expert: min_replicas, plus extras to the largest pieces while a piece
    exceeds the layer's tau (see the module docstring), within the budget."""
    L, E = a.shape
    counts = np.full((L, E), min_replicas, dtype=np.int64)
    spare = budget - L * E * min_replicas
    if spare <= 0:
        return counts
    tau, vtop = _layer_bounds(a, caps, cost)
    usable = (vtop > 0).sum(axis=1) - 1  # (L,) nodes an expert may spread over
    # Expert e needs the least r with a / vtop[r] <= tau; only experts above vtop[m] need more.
    x = a / tau[:, None] * (1 - 1e-9)
    hot = x > vtop[np.arange(L), np.minimum(min_replicas, usable)][:, None]
    hl, he = np.nonzero(hot)
    if not len(hl):
        return counts
    need = (vtop[hl, 1:] < x[hl, he][:, None]).sum(axis=1) + 1
    need = np.minimum(need, np.maximum(usable[hl], min_replicas))
    reps = need - min_replicas
    keep = reps > 0
    hl, he, reps = hl[keep], he[keep], reps[keep]
    # Candidate extras (layer, expert, k replicas before it) ranked by the piece they split.
    cl, ce = np.repeat(hl, reps), np.repeat(he, reps)
    k = np.arange(len(cl)) - np.repeat(np.cumsum(reps) - reps, reps) + min_replicas
    prio = a[cl, ce] / vtop[cl, np.minimum(k, usable[cl])]
    order = np.lexsort((-prio, cl))  # by layer, then priority
    cl, ce, prio = cl[order], ce[order], prio[order]
    rank = np.arange(len(cl)) - np.searchsorted(cl, cl)
    keep = rank < (caps.sum(axis=1) - E * min_replicas)[cl]  # a layer's slots
    cl, ce, prio = cl[keep], ce[keep], prio[keep]
    if len(cl) > spare:
        top = np.argpartition(-prio, spare - 1)[:spare]
        cl, ce = cl[top], ce[top]
    np.add.at(counts, (cl, ce), 1)
    return counts


def _waterfill(
    amount: np.ndarray, base: np.ndarray, token_s: np.ndarray, chosen: np.ndarray
) -> np.ndarray:
    """Split `amount` (R,) tokens over the chosen (R, N) nodes so they finish together; nodes
    already past that level get none. base: (R, N) current times. Returns (R, N) tokens."""
    big = np.where(chosen, base, np.inf)
    order = np.argsort(big, axis=1)
    b = np.take_along_axis(big, order, axis=1)
    ok = np.isfinite(b)
    b0 = np.where(ok, b, 0.0)
    inv = np.where(ok, 1.0 / token_s[order], 0.0)
    level = (amount[:, None] + np.cumsum(b0 * inv, axis=1)) / np.maximum(
        np.cumsum(inv, axis=1), 1e-300
    )
    filled = (ok & (level >= b)).sum(axis=1)  # a prefix of the sorted nodes
    tau = level[np.arange(len(b)), np.maximum(filled - 1, 0)]
    x = np.where(np.arange(b.shape[1]) < filled[:, None], (tau[:, None] - b0) * inv, 0.0)
    out = np.empty_like(x)
    np.put_along_axis(out, order, np.maximum(x, 0.0), axis=1)
    return out


@dataclass
class _State:
    """Planning state of all layers at once. Most experts have one replica: `single` holds
    their node; replicated experts have a row each in the (L, K, N) `multi_*` tables."""

    single: np.ndarray
    """(L, E) node of a single-replica expert; -1 for a replicated one."""
    multi_expert: np.ndarray
    """(L, K) expert of each replicated row; -1 for an unused row."""
    multi_tokens: np.ndarray
    """(L, K, N) token-assignments per step of each replica (0 where none)."""
    multi_held: np.ndarray
    """(L, K, N) bool: the replica exists (it may take 0 tokens: a failover copy)."""
    times: np.ndarray
    """(L, N) node times."""
    cap_left: np.ndarray
    """(L, N) free slots."""

    @property
    def rows_used(self) -> np.ndarray:
        return (self.multi_expert >= 0).sum(axis=1)

    def grow_rows(self, extra: int) -> None:
        """Add `extra` unused rows to the multi tables."""
        self.multi_expert = np.pad(self.multi_expert, ((0, 0), (0, extra)), constant_values=-1)
        self.multi_tokens = np.pad(self.multi_tokens, ((0, 0), (0, extra), (0, 0)))
        self.multi_held = np.pad(self.multi_held, ((0, 0), (0, extra), (0, 0)))


def _assign(
    a: np.ndarray,
    counts: np.ndarray,
    caps: np.ndarray,
    cost: _Cost,
    min_replicas: int,
    preset: np.ndarray | None = None,
    spare_rows: int = 0,
) -> _State:
    """Place counts[l, e] replicas of every expert (keeping the `preset` (L, E, N) ones) by LPT:
    replicated experts first, hottest first, water-filled over the nodes where they finish
    soonest; then single-replica experts one by one (`_lpt_singles`)."""
    L, E = a.shape
    N = len(cost.token_s)
    r = np.arange(L)
    penalty = np.where(cost.preferred, 0.0, 1e6)  # rack_local: slow links last
    n_held = np.zeros((L, E), dtype=np.int64) if preset is None else preset.sum(axis=2)
    cap_left = caps - (0 if preset is None else preset.sum(axis=1))
    single = np.full((L, E), -1, dtype=np.int64)
    times = np.zeros((L, N))
    busy = np.zeros((L, N), dtype=bool)
    if preset is not None:  # kept single replicas keep their node and all their tokens
        fl, fe = np.nonzero((counts == 1) & (n_held == 1))
        fn = preset[fl, fe].argmax(axis=1)
        single[fl, fe] = fn
        np.add.at(times, (fl, fn), a[fl, fe] * cost.token_s[fn])
        busy[fl, fn] = a[fl, fe] > 0
        times += busy * cost.latency_s
    multi = (counts >= 2) | ((n_held >= 1) & (single < 0))
    n_multi = multi.sum(axis=1)
    K = int(n_multi.max(initial=0)) + spare_rows
    order = np.argsort(-np.where(multi, a, -1.0), axis=1, kind="stable")[:, :K]
    if order.shape[1] < K:  # fewer experts than rows: pad (those rows stay unused)
        order = np.pad(order, ((0, 0), (0, K - order.shape[1])), constant_values=-1)
    multi_expert = np.where(np.arange(K) < n_multi[:, None], order, -1)
    multi_tokens = np.zeros((L, K, N))
    multi_held = np.zeros((L, K, N), dtype=bool)
    for j in range(int(n_multi.max(initial=0))):
        live = multi_expert[:, j] >= 0
        e = np.maximum(multi_expert[:, j], 0)
        want = np.where(live, counts[r, e], 0)
        have = preset[r, e] if preset is not None else np.zeros((L, N), dtype=bool)
        base = times + ~busy * cost.latency_s
        amount = np.where(live, a[r, e], 0.0)
        finish = base + (amount / np.maximum(want, 1))[:, None] * cost.token_s + penalty
        finish = np.where(have, -np.inf, np.where(cap_left > 0, finish, np.inf))
        rank = np.argsort(np.argsort(finish, axis=1, kind="stable"), axis=1)
        chosen = ((rank < want[:, None]) & np.isfinite(finish)) | (have & live[:, None])
        x = _waterfill(amount, base, cost.token_s, chosen)
        # A chosen node that gets no tokens is dropped unless needed for min_replicas.
        keep = chosen & ((x > 0) | have)
        idle = chosen & ~keep
        short = np.maximum(min_replicas - keep.sum(axis=1), 0)
        keep |= idle & (np.cumsum(idle, axis=1) <= short[:, None])
        multi_held[:, j] = keep
        multi_tokens[:, j] = x
        cap_left -= keep & ~have
        times += x * cost.token_s + ((x > 0) & ~busy) * cost.latency_s
        busy |= x > 0

    todo = (counts == 1) & (n_held == 0)
    base = times + ~busy * cost.latency_s + penalty
    sl, se, sn = _lpt_singles(a, todo, base, cap_left, cost.token_s)
    single[sl, se] = sn
    flat = sl * N + sn
    times += np.bincount(flat, weights=a[sl, se] * cost.token_s[sn], minlength=L * N).reshape(L, N)
    cap_left -= np.bincount(flat, minlength=L * N).reshape(L, N)
    newly = np.zeros((L, N), dtype=bool)
    newly[sl[a[sl, se] > 0], sn[a[sl, se] > 0]] = True
    times += (newly & ~busy) * cost.latency_s
    return _State(single, multi_expert, multi_tokens, multi_held, times, cap_left)


def _lpt_singles(
    a: np.ndarray, todo: np.ndarray, base: np.ndarray, cap_left: np.ndarray, token_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPT for the single-replica experts marked in `todo` (L, E): heaviest first, each to the
    node where it finishes soonest. base: (L, N) finish times so far (plus the latency of a
    first message and any rack_local penalty). Returns (layer, expert, node) arrays.

    The loop runs once per expert rank, all layers at once; layers are sorted by how many
    experts they place so the live ones are a prefix (slices, no masks).
    """
    L, N = base.shape
    n_todo = todo.sum(axis=1)
    by_count = np.argsort(-n_todo, kind="stable")
    key = np.where(todo, a, -1.0)[by_count]
    order = np.argsort(-key, axis=1, kind="stable")  # (L, E) experts, heaviest first
    weight = np.take_along_axis(key, order, axis=1)
    base = np.where(cap_left > 0, base, np.inf)[by_count]
    cap = cap_left[by_count].reshape(-1).copy()
    flat_base = base.reshape(-1)
    counts = n_todo[by_count]
    width = int(counts[0]) if L else 0
    live = (counts[None, :] > np.arange(width)[:, None]).sum(axis=1)  # live layers per rank
    row_start = np.arange(L) * N
    node = np.zeros((L, width), dtype=np.int64)
    buf = np.empty((L, N))
    for j in range(width):
        k = live[j]
        out = buf[:k]
        np.multiply.outer(weight[:k, j], token_s, out=out)
        out += base[:k]
        n = out.argmin(axis=1)
        idx = row_start[:k] + n
        cap[idx] -= 1
        flat_base[idx] = np.where(cap[idx] > 0, out.reshape(-1)[idx], np.inf)
        node[:k, j] = n
    rows, cols = np.nonzero(np.arange(width)[None, :] < counts[:, None])
    return by_count[rows], order[rows, cols], node[rows, cols]


def _improve(
    state: _State,
    a: np.ndarray,
    cost: _Cost,
    rounds: int,
    relocate: bool = True,
    good_enough: float = 1e-3,
) -> None:
    """Local improvement, in place: per layer and round one action on the most loaded node's
    work, while it lowers the layer's max and max/mean > 1 + good_enough:

    0. shift tokens of a replicated expert to its least loaded other replica;
    1. move a single replica to the least loaded node with a free slot;
    2. move one replica of a replicated expert there;
    3. swap a single replica with a lighter one on the least loaded node (when 0-2 cannot help).
    relocate=False allows only the shifts (no weights move).
    """
    c, lat = cost.token_s, cost.latency_s
    allowed = np.where(cost.preferred, 0.0, np.inf)
    rows = np.arange(len(a))
    for _ in range(rounds):
        t_all = state.times[rows]
        rows = rows[t_all.max(axis=1) > (1 + good_enough) * t_all.mean(axis=1)]
        if not len(rows):
            return
        L = len(rows)
        r = np.arange(L)
        t, al, single = state.times[rows], a[rows], state.single[rows]
        held = state.multi_held[rows]
        src = t.argmax(axis=1)
        ts, cs = t[r, src], c[src]
        target_t = t + allowed
        target_t[r, src] = np.inf
        free_t = np.where(state.cap_left[rows] > 0, target_t, np.inf)
        dst, low = free_t.argmin(axis=1), target_t.argmin(axis=1)
        has_room = (np.isfinite(free_t[r, dst]) & relocate)[:, None]

        def after(
            x: np.ndarray,
            node: np.ndarray,
            ok: np.ndarray,
            t: np.ndarray = t,
            ts: np.ndarray = ts,
            cs: np.ndarray = cs,
        ) -> np.ndarray:
            """New max of src and `node` (per layer or per candidate) if x tokens go there."""
            node = np.broadcast_to(node[:, None] if node.ndim == 1 else node, x.shape)
            tn = np.take_along_axis(t, node, axis=1)
            first = np.where(tn > 0, 0.0, lat[node])  # its first message in this layer
            val = np.maximum(ts[:, None] - x * cs[:, None], tn + x * c[node] + first)
            return np.where(ok, val, np.inf)

        ws = np.where(single == src[:, None], al, 0.0)  # (L, E) single replicas on src
        wm = state.multi_tokens[rows, :, src]  # (L, K) replicated experts' tokens on src
        others = np.where(held, target_t[:, None, :], np.inf)  # (L, K, N)
        partner = others.argmin(axis=2)
        tp = np.take_along_axis(others, partner[:, :, None], axis=2)[:, :, 0]
        shift = np.clip((ts[:, None] - tp) / (cs[:, None] + c[partner]), 0.0, wm)
        vals = [
            after(shift, partner, (wm > 0) & np.isfinite(tp)),
            after(ws, dst, (ws > 0) & has_room),
            after(wm, dst, (wm > 0) & ~held[r, :, dst] & has_room),
        ]
        best = [v.argmin(axis=1) for v in vals] + [np.zeros(L, dtype=np.int64)]
        value = np.stack([v[r, b] for v, b in zip(vals, best)] + [np.full(L, np.inf)])
        swap_j = np.zeros(L, dtype=np.int64)
        stuck = value.min(axis=0) >= ts * (1 - 1e-9)
        if relocate and stuck.any():
            value[3, stuck], best[3][stuck], swap_j[stuck] = _best_swap(
                al[stuck], single[stuck], src[stuck], low[stuck], t[stuck], c
            )
        kind = value.argmin(axis=0)
        act = value[kind, r] < ts * (1 - 1e-9)
        rows, kind, sub = rows[act], kind[act], r[act]  # layers that cannot improve are done
        if not len(rows):
            return
        idx = np.stack(best)[kind, sub]
        for k in range(4):
            sel = kind == k
            if not sel.any():
                continue
            rl, i, s = rows[sel], idx[sel], sub[sel]
            sn = src[s]
            dn = (partner[s, i] if k == 0 else low[s] if k == 3 else dst[s]).copy()
            if k == 0:
                x = shift[s, i]
                state.multi_tokens[rl, i, sn] -= x
                state.multi_tokens[rl, i, dn] += x
            elif k == 1:
                state.single[rl, i] = dn
            elif k == 2:
                state.multi_tokens[rl, i, dn] = state.multi_tokens[rl, i, sn]
                state.multi_tokens[rl, i, sn] = 0.0
                state.multi_held[rl, i, sn] = False
                state.multi_held[rl, i, dn] = True
            else:
                state.single[rl, i] = dn
                state.single[rl, swap_j[s]] = sn
            if k in (1, 2):
                state.cap_left[rl, sn] += 1
                state.cap_left[rl, dn] -= 1
            for nodes in (sn, dn):  # the two nodes' times, recomputed exactly
                tok = np.where(state.single[rl] == nodes[:, None], a[rl], 0.0).sum(axis=1)
                tok += state.multi_tokens[rl, :, nodes].sum(axis=1)
                state.times[rl, nodes] = tok * c[nodes] + (tok > 0) * lat[nodes]


def _spread_surplus(state: _State, a: np.ndarray, cost: _Cost, spare: np.ndarray) -> None:
    """Split the surplus of overloaded nodes onto underloaded ones, in place (McNaughton's
    wrap-around rule, generalised to node speeds and slots).

    Per layer: find the level tau where the tokens above it (all nodes) equal the room below
    it (nodes with a free slot); every node above tau gives its surplus out of its largest
    expert, matched in node order against the nodes below tau (north-west corner rule: at most
    2N - 1 transfers a layer). A transfer to a node without a replica of that expert creates
    one, taking a spare slot (spare: (L,) per layer, updated) and one of the node's free slots.
    """
    N = state.times.shape[1]
    c = cost.token_s
    t = state.times
    room = (state.cap_left > 0) & cost.preferred & (t > 0)
    lo, hi = t.min(axis=1), t.max(axis=1)
    for _ in range(40):  # bisection: surplus above mid minus room below mid falls with mid
        mid = (lo + hi)[:, None] / 2
        over = (np.maximum(t - mid, 0) / c).sum(axis=1)
        under = (np.where(room, np.maximum(mid - t, 0), 0) / c).sum(axis=1)
        lo, hi = np.where(over > under, mid[:, 0], lo), np.where(over > under, hi, mid[:, 0])
    surplus = np.maximum(t - hi[:, None], 0) / c  # (L, N) tokens each node should give
    deficit = np.where(room, np.maximum(hi[:, None] - t, 0), 0) / c
    ls, ns = np.nonzero(surplus > 1e-9 * a.sum(axis=1, keepdims=True))  # sorted by layer
    if not len(ls):
        return
    # Each giving node's largest expert: a single replica, or a row of a replicated expert.
    g = np.arange(len(ls))
    w_single = np.where(state.single[ls] == ns[:, None], a[ls], 0.0)  # (G, E)
    w_multi = state.multi_tokens[ls, :, ns]  # (G, K)
    e_single, k_multi = w_single.argmax(axis=1), w_multi.argmax(axis=1)
    from_single = w_single[g, e_single] >= w_multi[g, k_multi]
    surplus[ls, ns] = np.minimum(
        surplus[ls, ns], np.maximum(w_single[g, e_single], w_multi[g, k_multi])
    )
    # North-west corner: overlap of node i's surplus interval with node j's deficit interval.
    s_hi, d_hi = np.cumsum(surplus, axis=1), np.cumsum(deficit, axis=1)
    x = np.minimum(s_hi[:, :, None], d_hi[:, None, :]) - np.maximum(
        (s_hi - surplus)[:, :, None], (d_hi - deficit)[:, None, :]
    )  # (L, N giver, N taker)
    tl, ts, td = np.nonzero(x > 1e-12)
    if not len(tl):
        return
    giver = np.searchsorted(ls * N + ns, tl * N + ts)  # index into (ls, ns)
    new_row = state.rows_used[ls] + _rank_within(ls, from_single)
    row = np.where(from_single, new_row, k_multi)[giver]
    held = (
        ~from_single[giver]
        & state.multi_held[tl, np.minimum(row, state.multi_expert.shape[1] - 1), td]
    )
    # A new replica needs a spare slot of the layer and a free slot on the taker.
    ok = held | (_rank_within(tl, ~held) < spare[tl])
    ok &= held | (_rank_within(tl * N + td, ~held & ok) < state.cap_left[tl, td])
    tl, ts, td, giver, row, held = tl[ok], ts[ok], td[ok], giver[ok], row[ok], held[ok]
    amount = x[tl, ts, td]
    sent = np.bincount(giver, weights=amount, minlength=len(ls))
    conv = from_single & (sent > 0)  # single replicas that now split become rows
    extra = int(new_row[conv].max(initial=-1)) + 1 - state.multi_expert.shape[1]
    if extra > 0:
        state.grow_rows(extra)
    cl, cn, ce, cr = ls[conv], ns[conv], e_single[conv], new_row[conv]
    state.multi_expert[cl, cr] = ce
    state.multi_tokens[cl, cr, cn] = a[cl, ce]
    state.multi_held[cl, cr, cn] = True
    state.single[cl, ce] = -1
    gave = sent > 0
    give_row = np.where(from_single, new_row, k_multi)[gave]
    state.multi_tokens[ls[gave], give_row, ns[gave]] -= sent[gave]
    state.multi_tokens[tl, row, td] += amount
    state.multi_held[tl, row, td] = True
    np.subtract.at(state.cap_left, (tl[~held], td[~held]), 1)
    np.subtract.at(spare, tl[~held], 1)
    state.times = _state_times(state, a, cost)


def _rank_within(group: np.ndarray, flag: np.ndarray) -> np.ndarray:
    """For each element, how many flagged elements of the same group come before it."""
    order = np.argsort(group, kind="stable")
    g, f = group[order], flag[order].astype(np.int64)
    before = np.cumsum(f) - f
    start = np.r_[True, g[1:] != g[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(len(g)), 0))
    out = np.empty_like(before)
    out[order] = before - before[first]
    return out


def _state_times(state: _State, a: np.ndarray, cost: _Cost) -> np.ndarray:
    """(L, N) node times of the state, from scratch."""
    L, N = state.times.shape
    sl, se = np.nonzero(state.single >= 0)
    tok = np.bincount(sl * N + state.single[sl, se], weights=a[sl, se], minlength=L * N)
    tok = tok.reshape(L, N) + state.multi_tokens.sum(axis=1)
    return tok * cost.token_s + (tok > 0) * cost.latency_s


def _best_swap(
    a: np.ndarray,
    single: np.ndarray,
    src: np.ndarray,
    low: np.ndarray,
    t: np.ndarray,
    c: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer, the best swap of a single replica on src (i) with one on low (j, lighter):
    (new max of the two nodes or inf, i, j). For each i the j whose weight is nearest to
    w_i - ideal is found by one searchsorted over all layers (layer offsets keep them apart)."""
    L = len(a)
    r = np.arange(L)
    ts, tl, cs, cl = t[r, src], t[r, low], c[src], c[low]
    ideal = (ts - tl) / (cs + cl)
    li, ei = np.nonzero(single == src[:, None])
    lj, ej = np.nonzero(single == low[:, None])
    value = np.full(L, np.inf)
    best_i, best_j = np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
    if not len(li) or not len(lj):
        return value, best_i, best_j
    span = 4.0 * float(a.sum(axis=1).max()) + 1.0
    key_j = lj * span + a[lj, ej]
    order = np.argsort(key_j)
    key_j, lj, ej = key_j[order], lj[order], ej[order]
    want = li * span + a[li, ei] - ideal[li]
    pos = np.searchsorted(key_j, want)
    for p in (np.clip(pos - 1, 0, len(key_j) - 1), np.clip(pos, 0, len(key_j) - 1)):
        d = a[li, ei] - a[lj[p], ej[p]]
        ok = (lj[p] == li) & (d > 0)
        val = np.where(ok, np.maximum(ts[li] - d * cs[li], tl[li] + d * cl[li]), np.inf)
        # Best per layer: sort by (layer, value) and take each layer's first.
        o = np.lexsort((val, li))
        first = o[np.r_[True, li[o][1:] != li[o][:-1]]]
        layer = li[first]
        better = val[first] < value[layer]
        value[layer[better]] = val[first][better]
        best_i[layer[better]] = ei[first][better]
        best_j[layer[better]] = ej[p[first]][better]
    return value, best_i, best_j


def _replicas(
    state: _State, a: np.ndarray, min_replicas: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (layer, expert, node, share) of every replica, sorted by layer, expert, node.

    A replica left with no tokens is dropped unless the expert needs it for min_replicas."""
    L, E = a.shape
    sl, se = np.nonzero(state.single >= 0)
    sn = state.single[sl, se]
    held, tok = state.multi_held, state.multi_tokens
    idle = held & (tok <= 0)
    short = np.maximum(min_replicas - (held & (tok > 0)).sum(axis=2), 0)
    keep = (held & (tok > 0)) | (idle & (np.cumsum(idle, axis=2) <= short[:, :, None]))
    ml, mk, mn = np.nonzero(keep)
    me = state.multi_expert[ml, mk]
    total = a[ml, me]
    n_kept = keep.sum(axis=2)[ml, mk]
    mshare = np.where(total > 0, tok[ml, mk, mn] / np.where(total > 0, total, 1.0), 1.0 / n_kept)
    mshare /= np.bincount(ml * E + me, weights=mshare, minlength=L * E)[ml * E + me]
    layer = np.concatenate([sl, ml])
    expert = np.concatenate([se, me])
    node = np.concatenate([sn, mn])
    share = np.concatenate([np.ones(len(sl)), mshare])
    order = np.argsort((layer * E + expert) * (node.max(initial=0) + 1) + node, kind="stable")
    return layer[order], expert[order], node[order], share[order]


def _repair(
    state: _State,
    a: np.ndarray,
    counts: np.ndarray,
    caps: np.ndarray,
    cost: _Cost,
    min_replicas: int,
) -> None:
    """Re-plan, in place, every layer where LPT left an expert short of min_replicas (tight
    slots): min_replicas each, placed by demand on the nodes with the most room (which always
    succeeds when the layer's slots allow it), tokens water-filled hottest first."""
    L, E = a.shape
    N = len(cost.token_s)
    placed = (state.single >= 0).astype(np.int64)
    placed[np.arange(L)[:, None], np.maximum(state.multi_expert, 0)] += np.where(
        state.multi_expert >= 0, state.multi_held.sum(axis=2), 0
    )
    for layer in np.nonzero((placed < min_replicas).any(axis=1))[0].tolist():
        room = caps[layer].copy()
        held = np.zeros((E, N), dtype=bool)
        for e in np.argsort(-a[layer], kind="stable").tolist():
            nodes = np.argsort(-room, kind="stable")[:min_replicas]
            if (room[nodes] <= 0).any():
                raise PlacementError(
                    f"layer {layer}: the slots given to this layer cannot hold "
                    f"{min_replicas} replicas of each of {E} experts on distinct nodes"
                )
            held[e, nodes] = True
            room[nodes] -= 1
        counts[layer] = min_replicas
        times, busy = np.zeros(N), np.zeros(N, dtype=bool)
        tokens = np.zeros((E, N))
        for e in np.argsort(-a[layer], kind="stable").tolist():
            base = times + ~busy * cost.latency_s
            x = _waterfill(a[layer, e : e + 1], base[None], cost.token_s, held[e][None])[0]
            tokens[e] = x
            times += x * cost.token_s + ((x > 0) & ~busy) * cost.latency_s
            busy |= x > 0
        if state.multi_expert.shape[1] < E:
            state.grow_rows(E - state.multi_expert.shape[1])
        state.single[layer] = -1
        state.multi_expert[layer] = -1
        state.multi_expert[layer, :E] = np.arange(E)
        state.multi_tokens[layer] = 0.0
        state.multi_held[layer] = False
        state.multi_tokens[layer, :E] = tokens
        state.multi_held[layer, :E] = held
        tok = tokens.sum(axis=0)
        state.times[layer] = tok * cost.token_s + (tok > 0) * cost.latency_s
        state.cap_left[layer] = room


def _placement(
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    cost: _Cost,
    a: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
) -> Placement:
    m = _metrics(a, layer, expert, node, share, cost, shape, options)
    names = tuple(n.name for n in nodes)
    return Placement(
        nodes=names,
        layer_ids=tuple(range(shape.num_layers)),
        num_experts=shape.num_experts,
        replica_layer=layer.astype(np.int64),
        replica_expert=expert.astype(np.int64),
        replica_node=node.astype(np.int64),
        replica_share=share.astype(np.float64),
        node_time=dict(zip(names, m["node_time_s"].tolist())),
        node_tokens=dict(zip(names, m["node_tokens"].tolist())),
        balancedness=m["balancedness"],
        balancedness_equal_speed=m["balancedness_equal_speed"],
        step_balancedness=m["step_balancedness"],
        cross_node_bytes_per_token=m["cross_node_bytes_per_token"],
        step_time_s=m["step_time_s"],
    )


IMPROVE_ROUNDS = 48
"""At most this many improvement rounds (one action per layer each)."""


def _plan(
    a: np.ndarray,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    cost: _Cost,
    budget: int,
    caps: np.ndarray,
    keep_score: np.ndarray | None = None,
) -> Placement:
    """Replica counts, LPT assignment, repair, improvement, output (see the module doc).

    keep_score: (L, E, N), > 0 where a replica exists already (plan_increment): up to
    counts[l, e] of them stay, the highest scores first, and no other replica moves.
    """
    m = options.min_replicas
    counts = _replica_counts(a, caps, cost, budget, m)
    preset = None
    if keep_score is not None:
        rank = np.argsort(np.argsort(-keep_score, axis=2, kind="stable"), axis=2)
        preset = (keep_score > 0) & (rank < counts[:, :, None])
    relocate = preset is None
    state = _assign(a, counts, caps, cost, m, preset, spare_rows=4)
    _repair(state, a, counts, caps, cost, m)
    used = counts.sum(axis=1)
    spare = np.clip(caps.sum(axis=1) - used, 0, max(budget - int(used.sum()), 0) // len(used))
    # Splitting surplus only adds replicas (nothing held moves), so increments use it too.
    _spread_surplus(state, a, cost, spare)
    _improve(state, a, cost, IMPROVE_ROUNDS, relocate=relocate)
    return _placement(nodes, shape, options, cost, a, *_replicas(state, a, m))


def plan_placement(
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    load: np.ndarray | None = None,
    options: PlacementOptions | None = None,
) -> Placement:
    """Plan replicas and token shares for every expert of every layer (see the module doc).

    load: (num_layers, num_experts) non-negative expert loads (token counts or shares); None
    means uniform. Raises PlacementError when the nodes cannot hold min_replicas of every
    expert on distinct nodes.
    """
    options = options or PlacementOptions()
    _check_nodes(nodes)
    budget = _check_feasible(nodes, shape, options)
    a = _token_load(load, shape, options)
    cost = _cost(nodes, shape, options)
    return _plan(a, nodes, shape, options, cost, budget, _layer_caps(nodes, shape, cost))


# ---------------------------------------------------------------------------------------------
# Scoring, EPLB conversion, incremental plans


def _node_index(placement: Placement, nodes: Sequence[NodeCapacity]) -> np.ndarray:
    """(P,) index into `nodes` of each replica's node; PlacementError for an unknown node."""
    index = {n.name: i for i, n in enumerate(nodes)}
    missing = sorted(set(placement.nodes) - set(index))
    used = set(np.unique(placement.replica_node).tolist())
    missing = [m for m in missing if placement.nodes.index(m) in used]
    if missing:
        raise PlacementError(f"placement uses nodes that are not given: {missing}")
    lookup = np.array([index.get(n, -1) for n in placement.nodes], dtype=np.int64)
    return lookup[placement.replica_node]


def _check_shape(placement: Placement, shape: ExpertShape) -> None:
    if placement.num_layers != shape.num_layers or placement.num_experts != shape.num_experts:
        raise PlacementError(
            f"placement has {placement.num_layers} layers x {placement.num_experts} experts; "
            f"the shape has {shape.num_layers} x {shape.num_experts}"
        )


def evaluate(
    placement: Placement,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    load: np.ndarray | None = None,
    options: PlacementOptions | None = None,
) -> dict[str, Any]:
    """Score any placement (ours, or EPLB's via `placement_from_eplb`) under `load` with the
    cost model of the module docstring. Keys: balancedness, balancedness_equal_speed,
    step_balancedness, step_time_s, max_node_time_s, cross_node_bytes_per_token, node_time_s,
    node_tokens, slots_used, slots_over (nodes holding more replicas than they have slots)."""
    options = options or PlacementOptions()
    _check_nodes(nodes)
    _check_shape(placement, shape)
    a = _token_load(load, shape, options)
    cost = _cost(nodes, shape, options)
    node = _node_index(placement, nodes)
    m = _metrics(
        a,
        placement.replica_layer,
        placement.replica_expert,
        node,
        placement.replica_share,
        cost,
        shape,
        options,
    )
    names = [n.name for n in nodes]
    used = np.bincount(node, minlength=len(nodes))
    return {
        "balancedness": m["balancedness"],
        "balancedness_equal_speed": m["balancedness_equal_speed"],
        "step_balancedness": m["step_balancedness"],
        "step_time_s": m["step_time_s"],
        "max_node_time_s": float(m["node_time_s"].max()),
        "cross_node_bytes_per_token": m["cross_node_bytes_per_token"],
        "node_time_s": dict(zip(names, m["node_time_s"].tolist())),
        "node_tokens": dict(zip(names, m["node_tokens"].tolist())),
        "slots_used": dict(zip(names, used.tolist())),
        "slots_over": {
            n.name: int(u) - n.expert_slots
            for n, u in zip(nodes, used.tolist())
            if u > n.expert_slots
        },
    }


def placement_from_eplb(
    result: Any,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    load: np.ndarray | None = None,
    options: PlacementOptions | None = None,
) -> Placement:
    """EPLB's mapping (`cluster.eplb.EplbResult`) as a Placement: GPU g is `nodes[g]` (one GPU
    per node) and an expert's tokens are split evenly over its replicas, as EPLB and vLLM do.
    Two replicas of one expert on one GPU (EPLB allows it) become one with both shares.
    Metrics are scored under `load` (uniform if None)."""
    options = options or PlacementOptions()
    _check_nodes(nodes)
    phy2log = np.asarray(result.phy2log)
    L, R = phy2log.shape
    if shape.num_layers != L:
        raise PlacementError(f"EPLB result has {L} layers; the shape has {shape.num_layers}")
    if result.num_gpus != len(nodes):
        raise PlacementError(f"EPLB planned {result.num_gpus} GPUs for {len(nodes)} nodes")
    E = shape.num_experts
    gpu = np.asarray(result.gpu_of_slot)
    layer = np.repeat(np.arange(L), R)
    expert = phy2log.reshape(-1)
    node = np.tile(gpu, L)
    share = 1.0 / np.asarray(result.logcnt)[layer, expert]
    # Merge duplicates (same layer, expert, node), keep (layer, expert, node) order.
    key = (layer * E + expert) * len(nodes) + node
    uniq, inverse = np.unique(key, return_inverse=True)
    merged = np.bincount(inverse, weights=share)
    node_u = uniq % len(nodes)
    le = uniq // len(nodes)
    a = _token_load(load, shape, options)
    cost = _cost(nodes, shape, options)
    return _placement(nodes, shape, options, cost, a, le // E, le % E, node_u, merged)


def plan_increment(
    current: Placement,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    new_load: np.ndarray | None,
    options: PlacementOptions | None = None,
) -> tuple[Placement, list[Move]]:
    """A plan for drifted load that moves as few expert bytes as possible.

    Replicas the new plan still wants stay where they are (the ones taking the most tokens);
    newly hot experts get replicas on the nodes where they finish soonest; replicas no longer
    needed are dropped; tokens are re-split among the replicas. Replicas on nodes no longer
    given, or beyond a node's slots, are re-placed. Returns the plan and the moves (layers
    keyed as in `current`); `bytes_moved(moves)` is what nodes must load.
    """
    options = options or PlacementOptions()
    _check_nodes(nodes)
    _check_shape(current, shape)
    budget = _check_feasible(nodes, shape, options)
    L, E, N = shape.num_layers, shape.num_experts, len(nodes)
    a = _token_load(new_load, shape, options)
    cost = _cost(nodes, shape, options)

    index = {n.name: i for i, n in enumerate(nodes)}
    lookup = np.array([index.get(n, -1) for n in current.nodes], dtype=np.int64)
    cur_node = lookup[current.replica_node]
    present = cur_node >= 0
    held_cur = np.zeros((L, E, N), dtype=bool)
    share_cur = np.zeros((L, E, N))
    cl, ce, cn = current.replica_layer[present], current.replica_expert[present], cur_node[present]
    held_cur[cl, ce, cn] = True
    share_cur[cl, ce, cn] = current.replica_share[present]
    # A node whose slots shrank keeps its replicas with the most tokens.
    slots = np.array([n.expert_slots for n in nodes])
    for n in np.nonzero(held_cur.sum(axis=(0, 1)) > slots)[0].tolist():
        value = np.where(held_cur[:, :, n], share_cur[:, :, n] * a, -np.inf).reshape(-1)
        drop = np.argsort(-value, kind="stable")[slots[n] : int(held_cur[:, :, n].sum())]
        dl, de = np.unravel_index(drop, (L, E))
        held_cur[dl, de, n] = False
        share_cur[dl, de, n] = 0.0
    caps = _layer_caps(nodes, shape, cost, used=held_cur.sum(axis=1))
    score = np.where(held_cur, 1.0 + share_cur * cost.speed, 0.0)
    new = _plan(a, nodes, shape, options, cost, budget, caps, keep_score=score)
    new = replace(new, layer_ids=current.layer_ids)
    return new, _moves(current, new, nodes, shape)


def _moves(
    old: Placement, new: Placement, nodes: Sequence[NodeCapacity], shape: ExpertShape
) -> list[Move]:
    """Replica differences old -> new; a drop and an add of one expert pair up as a move."""
    E = shape.num_experts
    names = sorted(set(old.nodes) | set(new.nodes))
    idx = {n: i for i, n in enumerate(names)}
    K = len(names)

    def keys(p: Placement) -> np.ndarray:
        node = np.array([idx[n] for n in p.nodes], dtype=np.int64)[p.replica_node]
        return (p.replica_layer * E + p.replica_expert) * K + node

    before, after = keys(old), keys(new)
    dropped = np.setdiff1d(before, after)
    added = np.setdiff1d(after, before)
    by_expert: dict[int, tuple[list[int], list[int]]] = {}
    for k in dropped.tolist():
        by_expert.setdefault(k // K, ([], []))[0].append(k % K)
    for k in added.tolist():
        by_expert.setdefault(k // K, ([], []))[1].append(k % K)
    moves = []
    for le, (srcs, dsts) in sorted(by_expert.items()):
        layer = old.layer_ids[le // E]
        expert = le % E
        for i in range(max(len(srcs), len(dsts))):
            src = names[srcs[i]] if i < len(srcs) else None
            dst = names[dsts[i]] if i < len(dsts) else None
            moves.append(Move(layer, expert, src, dst, shape.expert_bytes if dst else 0))
    return moves
