"""Scoring any placement under the cost model of `cluster/placement_model.py`, and EPLB's plans
(`cluster/eplb.py`) as Placements, so ours and EPLB's are compared by one yardstick
(`benchmarks/bench_placement.py`, `cluster/rebalance.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .placement_model import (
    ExpertShape,
    NodeCapacity,
    Placement,
    PlacementError,
    PlacementOptions,
    build_placement,
    check_nodes,
    check_shape,
    cost_model,
    placement_metrics,
    token_load,
    tokens_per_node,
)


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


def evaluate(
    placement: Placement,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    load: np.ndarray | None = None,
    options: PlacementOptions | None = None,
) -> dict[str, Any]:
    """Score any placement (ours, or EPLB's via `placement_from_eplb`) under `load` with the
    cost model (`cluster/placement_model.py`). Keys: balancedness, balancedness_equal_speed,
    step_balancedness, step_time_s, max_node_time_s, cross_node_bytes_per_token, node_time_s,
    node_tokens, slots_used, slots_over (nodes holding more replicas than they have slots)."""
    options = options or PlacementOptions()
    check_nodes(nodes)
    check_shape(placement, shape)
    a = token_load(load, shape, options)
    cost = cost_model(nodes, shape, options)
    node = _node_index(placement, nodes)
    tokens = tokens_per_node(
        a,
        placement.replica_layer,
        placement.replica_expert,
        node,
        placement.replica_share,
        len(nodes),
    )
    m = placement_metrics(tokens, cost, options)
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
    check_nodes(nodes)
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
    a = token_load(load, shape, options)
    cost = cost_model(nodes, shape, options)
    return build_placement(nodes, shape, options, cost, a, le // E, le % E, node_u, merged)
