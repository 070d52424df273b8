"""What `cluster/placement.py`'s planner compares its plan with: lower bounds on a step's time
(every usable node finishing a layer together), the node sets worth leaving empty (prefixes of
`drop_order`, bounded all at once by `drop_bounds_s`), EPLB's plan as a candidate, and the
per-layer pick of the best plan (`best_per_layer`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .placement_model import (
    CostModel,
    ExpertShape,
    NodeCapacity,
    Placement,
    PlacementError,
    PlacementOptions,
    build_placement,
    cost_model,
    layer_times,
    token_load,
    tokens_per_node,
)
from .placement_scoring import placement_from_eplb


def usable_speed(caps: np.ndarray, cost: CostModel) -> np.ndarray:
    """(L, N) each node's speed where it may serve the layer (its preferred nodes, or every node
    with a slot when none is preferred), else 0."""
    usable = (caps > 0) & cost.preferred
    usable = np.where(usable.any(axis=1, keepdims=True), usable, caps > 0)
    return np.where(usable, cost.speed, 0.0)


def layer_tau(a: np.ndarray, v: np.ndarray, cost: CostModel) -> np.ndarray:
    """(L,) the time if all usable nodes (speeds v, `usable_speed`) finish the layer together."""
    return (a.sum(axis=1) + v @ cost.latency_s) / v.sum(axis=1)


def layer_bounds(a: np.ndarray, caps: np.ndarray, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: tau (L,), the time if all usable nodes finish together, and (L, N+1) the
    speed sum of the r fastest usable nodes (index r)."""
    v = usable_speed(caps, cost)
    vtop = np.concatenate([np.zeros((len(a), 1)), np.cumsum(-np.sort(-v, axis=1), axis=1)], axis=1)
    return layer_tau(a, v, cost), vtop


def eplb_candidate(
    a: np.ndarray,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    caps: np.ndarray,
) -> Placement | None:
    """EPLB's plan when it keeps within the per-layer caps and the options (one replica per
    expert allowed, no rack preference): layers where it beats ours are taken from it, so ours
    is never worse than EPLB."""
    used = np.flatnonzero(caps.min(axis=0) > 0)
    if options.min_replicas != 1 or options.rack_local or not len(used):
        return None
    per_gpu = int(caps[:, used].min())
    if per_gpu * len(used) < shape.num_experts:
        return None
    p = eplb_placement(a, nodes, shape, options, per_gpu)
    held = np.bincount(p.replica_layer * len(nodes) + p.replica_node, minlength=caps.size)
    return None if (held.reshape(caps.shape) > caps).any() else p


def eplb_placement(
    load: np.ndarray | None,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    slots_per_layer: int,
) -> Placement:
    """DeepSeek's EPLB (`cluster/eplb.py`, global policy) with every node that has expert
    slots as one of its GPUs, `slots_per_layer` slots on each in every layer, tokens split
    evenly over replicas; scored over all `nodes` (it may exceed a small node's slots:
    `evaluate(...)["slots_over"]` says)."""
    from .eplb import rebalance_experts

    a = token_load(load, shape, options)
    used = np.array([i for i, n in enumerate(nodes) if n.expert_slots > 0], dtype=np.int64)
    if not len(used):
        raise PlacementError("eplb: no node has expert slots")
    result = rebalance_experts(a, slots_per_layer * len(used), 1, 1, len(used))
    p = placement_from_eplb(result, [nodes[i] for i in used.tolist()], shape, a, options)
    cost = cost_model(nodes, shape, options)
    return build_placement(
        nodes,
        shape,
        options,
        cost,
        a,
        p.replica_layer,
        p.replica_expert,
        used[p.replica_node],
        p.replica_share,
    )


EPLB_SKIP = 0.05
"""Skip the EPLB candidate when ours is within this fraction of the lower bound (no plan can
then beat ours by more; EPLB's own run would cost more than planning)."""


def lower_bound_s(a: np.ndarray, caps: np.ndarray, cost: CostModel) -> float:
    """A step time no plan within `caps` beats: per layer, every usable node finishing
    together (tau of `layer_bounds`) plus one dispatch call."""
    tau = layer_tau(a, usable_speed(caps, cost), cost)
    if cost.in_process:  # the colocated node alone is never called
        return float(tau.sum())
    return float(tau.sum() + cost.call_s * len(tau))


def drop_order(a: np.ndarray, caps: np.ndarray, cost: CostModel) -> np.ndarray:
    """Nodes to leave empty, in order (the node sets tried are its prefixes): the nodes with
    slots that cost the most for a fair share of a layer's tokens (message latency + share x
    cost per token) first; the attention node's own process (colocated) is never dropped. Every
    layer a node serves costs its latency and a dispatch call, so with slow links or costly
    calls fewer nodes can be faster."""
    has_slots = caps.sum(axis=0) > 0
    candidates = np.flatnonzero(has_slots & ~cost.colocated)
    share = a.sum(axis=1).mean() / max(int(has_slots.sum()), 1)
    badness = cost.latency_s[candidates] + share * cost.token_s[candidates]
    return candidates[np.argsort(-badness, kind="stable")]


def drop_bounds_s(
    a: np.ndarray, caps: np.ndarray, cost: CostModel, order: np.ndarray, min_replicas: int
) -> np.ndarray:
    """`lower_bound_s` with the first k + 1 nodes of `order` left empty, for each k while
    the nodes left still hold min_replicas of every expert on distinct nodes, all at once: each
    of tau's sums is the full sum less a running sum over the dropped columns."""
    L, E = a.shape

    def left(x: np.ndarray) -> np.ndarray:  # (L, N) -> (L, K): x summed over the nodes kept
        return x.sum(axis=1, keepdims=True) - np.cumsum(x[:, order], axis=1)

    held = caps > 0
    pref = held & cost.preferred
    feasible = ((left(held) >= min_replicas) & (left(caps) >= E * min_replicas)).all(axis=0)
    k = int(np.argmin(feasible)) if not feasible.all() else len(order)  # the first one short
    if k == 0:
        return np.zeros(0)
    order = order[:k]
    # `usable_speed`: a layer's preferred nodes, or all with slots when it has none left.
    has_pref = left(pref) > 0
    v_all, v_pref = np.where(held, cost.speed, 0.0), np.where(pref, cost.speed, 0.0)
    speed = np.where(has_pref, left(v_pref), left(v_all))
    weighted = np.where(has_pref, left(v_pref * cost.latency_s), left(v_all * cost.latency_s))
    tau = (a.sum(axis=1, keepdims=True) + weighted) / speed
    calls = 0.0 if cost.in_process else cost.call_s * L
    return tau.sum(axis=0) + calls


def best_per_layer(
    plans: Sequence[Placement],
    a: np.ndarray,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    cost: CostModel,
) -> Placement:
    """Each layer from the plan whose slowest node finishes it soonest (layers run one after
    another, so the step time is the sum of the layer maxima). Every plan keeps within the same
    per-layer slot caps, so any mix of their layers keeps within every node's slots."""
    if len(plans) == 1:
        return plans[0]
    N = len(nodes)
    layer_max = np.stack(
        [
            layer_times(
                tokens_per_node(
                    a, p.replica_layer, p.replica_expert, p.replica_node, p.replica_share, N
                ),
                cost,
            )
            for p in plans
        ]
    )  # (plans, L)
    pick = layer_max.argmin(axis=0)
    if (pick == pick[0]).all():
        return plans[int(pick[0])]
    rows = [np.flatnonzero(plans[int(k)].replica_layer == layer) for layer, k in enumerate(pick)]
    parts = {
        name: np.concatenate([getattr(plans[int(k)], name)[r] for k, r in zip(pick.tolist(), rows)])
        for name in ("replica_layer", "replica_expert", "replica_node", "replica_share")
    }
    return build_placement(
        nodes,
        shape,
        options,
        cost,
        a,
        parts["replica_layer"],
        parts["replica_expert"],
        parts["replica_node"],
        parts["replica_share"],
    )
