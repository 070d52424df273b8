"""What the placement planner (`cluster/placement.py`) reads and returns, and the cost model
it minimises.

Inputs: `NodeCapacity` (speed, expert slots, link), `ExpertShape`, `PlacementOptions`. Result:
`Placement` (replicas per layer and expert, with token shares; JSON round trip) and the `Move`s
between two placements.

Cost model (seconds per decode step of `tokens_per_step` tokens; each token visits `top_k`
experts per layer, so a layer carries `tokens_per_step * top_k` token-assignments, split over
experts in proportion to `load`):

- a token-assignment on node n costs `c_n = compute + link`, where compute =
  `2 * expert_params / (speed_n * reference_tflops)` (a token through an expert's GEMMs) and
  link = `2 * hidden_size * dtype_bytes * 8 / link_gbps` (the hidden state goes to the node and
  the result comes back over the node's link to the attention node);
- every layer in which node n serves tokens adds `2 * link_latency_us` to the node (one
  dispatch message there and one back per layer per node per step) and `call_overhead_us` to
  the layer (the fixed cost of one dispatch call, which the attention side pays call by call:
  pack, send, collect): a node that serves a layer costs something however few tokens it
  takes, so leaving a node empty can be the faster plan;
- node time = the sum over its replicas, all layers; the slowest node gates the step, so the
  objective is the max node time. `balancedness` = max / mean node time over the nodes that
  serve tokens (an empty node is not "idle capacity" but a choice). Since layers run one
  after another, a layer is really gated by its own slowest node: the planner balances every
  layer on its own (which balances the sums too), and `step_balancedness` reports
  sum_layers(max node time) / sum_layers(mean node time).

A node whose `link_gbps` is `math.inf` shares the attention node's process: its tokens cross
no link (they count for no `cross_node_bytes_per_token`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

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
    measured_token_us: float | None = None
    """Measured cost of one token-assignment on this node, compute and link (a profile of
    real layer calls, `cluster/profile.py`); None: from speed and link as above."""
    measured_call_us: float | None = None
    """Measured fixed cost of one layer call on this node, whatever its rows (the round trip
    and the shard's handling; for the colocated node its per-call compute overhead)."""

    def __post_init__(self) -> None:
        for name in ("measured_token_us", "measured_call_us"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"node {self.name!r}: {name} must be finite and >= 0, got {value}")
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
    call_overhead_us: float = 0.0
    """Fixed cost of one dispatch call, paid by the attention side once per node it calls in
    a layer (measured by the rig's calibration; the topology's `call_overhead_us`)."""
    colocate: bool = False
    """The colocated node's experts run in the attention worker's process
    (`cluster/colocated.py`): it is never called (no call cost), and it computes while the
    remote nodes do, after the attention side has paid the calls to them. False: it is a
    shard like the others, called at the same fixed cost, whose rows cross no link."""

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
        if not (self.call_overhead_us >= 0 and math.isfinite(self.call_overhead_us)):
            raise ValueError(
                f"call_overhead_us must be finite and >= 0, got {self.call_overhead_us}"
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
    """max / mean of node_time (speeds and links counted) over the nodes that serve tokens."""
    balancedness_equal_speed: float
    """max / mean of node_tokens (as if all nodes were equal), same nodes."""
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
class CostModel:
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
    call_s: float = 0.0
    """Seconds the attention side pays per node called in a layer (serial)."""
    in_process: bool = False
    """The colocated nodes compute in the attention worker's process (`PlacementOptions.colocate`)."""

    @property
    def speed(self) -> np.ndarray:
        """(N,) token-assignments per second."""
        return 1.0 / self.token_s


def cost_model(
    nodes: Sequence[NodeCapacity], shape: ExpertShape, options: PlacementOptions
) -> CostModel:
    speed = np.array([n.speed for n in nodes], dtype=np.float64)
    gbps = np.array([n.link_gbps for n in nodes], dtype=np.float64)
    colocated = np.isinf(gbps)
    link_bytes = 2 * shape.token_bytes
    compute_s = shape.expert_flops_per_token / (speed * options.reference_tflops * 1e12)
    link_s = np.where(colocated, 0.0, link_bytes * 8 / (np.where(colocated, 1.0, gbps) * 1e9))
    latency_s = np.array([2e-6 * n.link_latency_us for n in nodes], dtype=np.float64)
    token_s = compute_s + link_s
    for i, n in enumerate(nodes):  # a profile of real calls replaces the modelled figures
        if n.measured_token_us is not None:
            token_s[i] = max(n.measured_token_us, 1e-3) * 1e-6
        if n.measured_call_us is not None:
            latency_s[i] = n.measured_call_us * 1e-6
    preferred = np.ones(len(nodes), dtype=bool)
    if options.rack_local:
        preferred = gbps * SLOW_LINK_RATIO >= gbps.max()
    return CostModel(
        token_s,
        latency_s,
        colocated,
        preferred,
        link_bytes,
        call_s=options.call_overhead_us * 1e-6,
        in_process=options.colocate and bool(colocated.any()),
    )


def token_load(
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
    tokens = options.tokens_per_step * shape.top_k
    total = w.sum(axis=1)
    out = w * (tokens / np.where(total > 0, total, 1.0))[:, None]
    out[total <= 0] = tokens / E
    return out


def tokens_per_node(
    a: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    num_nodes: int,
) -> np.ndarray:
    """(L, N) token-assignments per step each node serves in each layer."""
    L = a.shape[0]
    tokens = a[layer, expert] * share
    return np.bincount(layer * num_nodes + node, weights=tokens, minlength=L * num_nodes).reshape(
        L, num_nodes
    )


def max_over_mean(x: np.ndarray) -> float:
    mean = float(x.mean())
    return float(x.max()) / mean if mean > 0 else 1.0


def layer_node_times(node_tokens: np.ndarray, cost: CostModel) -> np.ndarray:
    """(L, N) predicted seconds each node works in each layer: its token-assignments times
    their cost, plus its link's message latency where it serves any."""
    return node_tokens * cost.token_s + (node_tokens > 1e-12) * cost.latency_s


def layer_times(node_tokens: np.ndarray, cost: CostModel) -> np.ndarray:
    """(L,) predicted seconds of each layer.

    Nodes called as shards: the slowest node, plus the attention side's fixed cost for every
    node it calls (serial). With the colocated node in the attention worker's process
    (`cost.in_process`): it is not called, and it computes after the calls to the remote
    nodes went out and before their replies are read, so the layer takes
    max(local experts + one call cost per remote node, slowest remote node + one call)."""
    busy = node_tokens > 1e-12
    times = layer_node_times(node_tokens, cost)
    if not cost.in_process:
        return times.max(axis=1) + busy.sum(axis=1) * cost.call_s
    remote = ~cost.colocated
    n_remote = busy[:, remote].sum(axis=1)
    local = times[:, cost.colocated].sum(axis=1) + n_remote * cost.call_s
    far = np.where(n_remote > 0, times[:, remote].max(axis=1, initial=0.0) + cost.call_s, 0.0)
    return np.maximum(local, far)


def placement_metrics(
    node_tokens: np.ndarray, cost: CostModel, options: PlacementOptions
) -> dict[str, Any]:
    """The cost model's numbers for (L, N) node tokens (a node is busy in a layer where it
    serves tokens)."""
    times = layer_node_times(node_tokens, cost)
    node_time, node_total = times.sum(axis=0), node_tokens.sum(axis=0)
    layer_max = layer_times(node_tokens, cost)
    remote = float(node_tokens[:, ~cost.colocated].sum())
    serving = node_total > 1e-9  # balance counts only the nodes that serve tokens
    if not serving.any():
        serving = np.ones_like(serving)
    return {
        "node_time_s": node_time,
        "node_tokens": node_total,
        "layer_node_time_s": times,
        "balancedness": max_over_mean(node_time[serving]),
        "balancedness_equal_speed": max_over_mean(node_total[serving]),
        "step_balancedness": float(layer_max.sum() / max(times.mean(axis=1).sum(), 1e-300)),
        "step_time_s": float(layer_max.sum()),
        "cross_node_bytes_per_token": remote * cost.token_link_bytes / options.tokens_per_step,
    }


def check_nodes(nodes: Sequence[NodeCapacity]) -> None:
    """PlacementError unless there are nodes and their names are unique."""
    if not nodes:
        raise PlacementError("no nodes to place experts on")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PlacementError(f"node names must be unique; repeated: {dup}")


def check_shape(placement: Placement, shape: ExpertShape) -> None:
    """PlacementError unless `placement` has `shape`'s layers and experts."""
    if placement.num_layers != shape.num_layers or placement.num_experts != shape.num_experts:
        raise PlacementError(
            f"placement has {placement.num_layers} layers x {placement.num_experts} experts; "
            f"the shape has {shape.num_layers} x {shape.num_experts}"
        )


def build_placement(
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    cost: CostModel,
    a: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    node_tokens: np.ndarray | None = None,
) -> Placement:
    """The Placement of these replicas (layer, expert, node index, share), scored under the
    cost model; node_tokens: their (L, N) tokens if known."""
    if node_tokens is None:
        node_tokens = tokens_per_node(a, layer, expert, node, share, len(nodes))
    m = placement_metrics(node_tokens, cost, options)
    names = tuple(n.name for n in nodes)
    return Placement(
        nodes=names,
        layer_ids=tuple(range(shape.num_layers)),
        num_experts=shape.num_experts,
        replica_layer=np.asarray(layer, dtype=np.int64),
        replica_expert=np.asarray(expert, dtype=np.int64),
        replica_node=np.asarray(node, dtype=np.int64),
        replica_share=np.asarray(share, dtype=np.float64),
        node_time=dict(zip(names, m["node_time_s"].tolist())),
        node_tokens=dict(zip(names, m["node_tokens"].tolist())),
        balancedness=m["balancedness"],
        balancedness_equal_speed=m["balancedness_equal_speed"],
        step_balancedness=m["step_balancedness"],
        cross_node_bytes_per_token=m["cross_node_bytes_per_token"],
        step_time_s=m["step_time_s"],
    )
