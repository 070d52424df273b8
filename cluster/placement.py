"""Expert placement on heterogeneous nodes: which node holds a replica of which expert, and
what share of the expert's tokens each replica takes.

    placement = plan_placement(nodes, shape, load, PlacementOptions(min_replicas=2))
    new, moves = plan_increment(placement, nodes, shape, drifted_load)

Unlike EPLB (`cluster/eplb.py`: identical GPUs, equal slots per GPU, links ignored) the planner
knows each node's compute speed, its expert memory (slots) and its link to the attention node.

The inputs, the `Placement` result and the cost model the planner minimises are in
`cluster/placement_model.py`; `evaluate` (any placement under that model) and
`placement_from_eplb` are in `cluster/placement_scoring.py` and re-exported here; the lower
bounds, the node-set search, EPLB's plan as a candidate (`eplb_placement`, re-exported) and the
per-layer pick of the best plan are in `cluster/placement_search.py`.

Algorithm (per layer, vectorised over layers with numpy; like EPLB it costs a few dozen numpy
operations per slot of a node, with no Python loop over experts outside the rare fix-ups in 3):

1. Slots per layer: each node's `expert_slots` are spread evenly over the layers.
2. Replica counts: every expert starts at `min_replicas`. A layer cannot finish before
   `tau = (tokens + sum_n latency_n * v_n) / sum_n v_n` (all nodes busy, v_n = 1 / c_n), nor
   before its hottest expert's piece `load / (sum of the r fastest v)` plus a node's message
   latency. Extra replicas go, one at a time, to the expert with the largest piece (across all
   layers, within the slot budget), and stop once no piece exceeds tau: past that point another
   replica no longer lowers the predicted max. An expert's replicas ("pieces") start equal, each
   with 1 / count of its tokens.
3. Packing, longest processing time first in rounds (`cluster/placement_ops.py`): each layer's
   pieces are sorted heaviest first, and in every round each live node takes one, the heaviest
   going to the nodes where they would finish soonest (current time + piece * c_n). A node is
   live while it has a free slot and room below tau for the round's lightest piece times
   max(1, PACE x the pieces it can still expect), which paces slots against time: a slow node,
   or one holding a hot piece, waits for the lighter pieces that come later instead of using
   slots a fast node needs. A layer where no node is live, or whose remaining pieces fit in one
   round, gives the round to every node with a free slot. Node slots are never exceeded;
   replicas of one expert are on distinct nodes: a piece that lands on a node holding its
   expert already is swapped within its round or moved to a free slot, or else merged into
   that replica if the expert can spare one; a layer where even that fails is re-planned with
   min_replicas replicas of each expert on the nodes with the most free slots. With
   `rack_local`, nodes whose link is more than 4x slower than the best link get a replica only
   when no faster node has a slot left for it.
4. Surplus splitting (one pass; four in `plan_increment`): nodes more than SPLIT_MIN above tau
   give tokens of their largest replica to nodes below it, lined up by cumulative amounts
   (north-west corner rule, largest surplus and deficit first). A taker takes them into its
   replica of that expert or, for at least SPLIT_MIN of a node's load, a new replica in a free
   slot; a replica left without tokens is dropped unless min_replicas needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .placement_model import (
    CostModel,
    ExpertShape,
    Move,
    NodeCapacity,
    Placement,
    PlacementError,
    PlacementOptions,
    ReplicaAssignment,
    build_placement,
    bytes_moved,
    check_nodes,
    check_shape,
    cost_model,
    token_load,
    tokens_per_node,
)
from .placement_ops import (
    SPLIT_MIN,
    Packing,
    add_replicas,
    find_replicas,
    pack,
    piece_offsets,
    split_surplus,
)
from .placement_scoring import evaluate, placement_from_eplb
from .placement_search import (
    EPLB_SKIP,
    best_per_layer,
    drop_bounds_s,
    drop_order,
    eplb_candidate,
    eplb_placement,
    layer_bounds,
    lower_bound_s,
)

__all__ = [
    "ExpertShape",
    "Move",
    "NodeCapacity",
    "Placement",
    "PlacementError",
    "PlacementOptions",
    "ReplicaAssignment",
    "bytes_moved",
    "eplb_placement",
    "evaluate",
    "placement_from_eplb",
    "plan_increment",
    "plan_placement",
]

# ---------------------------------------------------------------------------------------------
# Feasibility and slots per layer


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


def _spread_over_layers(slots: np.ndarray, num_layers: int) -> np.ndarray:
    """(L, N) caps: each node's slots spread evenly over layers, remainders staggered so layer
    totals differ by at most one (node n's extra slots go to the layers after node n-1's)."""
    extra = slots % num_layers
    offset = (np.cumsum(extra) - extra) % num_layers
    rows = (np.arange(num_layers)[:, None] - offset) % num_layers
    return (slots // num_layers)[None, :] + (rows < extra).astype(np.int64)


def _layer_caps(
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    cost: CostModel,
    used: np.ndarray | None = None,
) -> np.ndarray:
    """(L, N) slots each node may use in each layer: `used` (already held) plus its free slots,
    never more than one per expert. Without `used` the slots are spread evenly over layers;
    with it they are poured into the layers with the most room first (water-filling), so a
    node that already holds most of one layer's experts gives its free slots to the others
    instead of losing them to the one-per-expert cap."""
    L, E = shape.num_layers, shape.num_experts
    slots = np.array([n.expert_slots for n in nodes], dtype=np.int64)
    if used is None:
        return _spread_over_layers(np.minimum(slots, L * E), L)
    room = np.maximum(E - used, 0)
    free = np.maximum(np.minimum(slots, L * E) - used.sum(axis=0), 0)
    return used + _water_fill(room, np.minimum(free, room.sum(axis=0)))


def _water_fill(room: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """(L, N) integer fill of each column's `room` with `amount[n]` units in total (amount <=
    room.sum(axis=0)): the level rises evenly over the layers that still have room; the last
    units go one each to open layers in an order staggered by node, like `_spread_over_layers`."""
    L, N = room.shape
    give = np.zeros_like(room)
    left = amount.copy()
    order = (np.arange(L)[:, None] + np.arange(N)[None, :]) % L  # stagger remainders by node
    while True:  # every round places at least one unit, or stops
        open_ = give < room
        k = open_.sum(axis=0)
        if not ((left > 0) & (k > 0)).any():
            break
        per = np.where(k > 0, left // np.maximum(k, 1), 0)
        add = np.where(open_, np.minimum(per[None, :], room - give), 0)
        if not add.any():  # fewer units than open layers: one each, staggered
            rolled = np.take_along_axis(open_, order, axis=0)
            rank = np.cumsum(rolled, axis=0) - 1
            pick = rolled & (rank < left[None, :])
            add = np.zeros_like(room)
            np.put_along_axis(add, order, pick.astype(room.dtype), axis=0)
        give += add
        left -= add.sum(axis=0)
    return give


# ---------------------------------------------------------------------------------------------
# Planning steps


def _replica_counts(
    a: np.ndarray,
    caps: np.ndarray,
    cost: CostModel,
    budget: int,
    min_replicas: int,
    bounds: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """(L, E) replicas per expert: min_replicas, plus extras to the largest pieces while a piece
    (and its node's message latency) exceeds the layer's tau (see the module docstring), within
    the budget. bounds: `layer_bounds`."""
    L, E = a.shape
    counts = np.full((L, E), min_replicas, dtype=np.int64)
    spare = budget - L * E * min_replicas
    if spare <= 0:
        return counts
    tau, vtop = bounds
    usable = (vtop > 0).sum(axis=1) - 1  # (L,) nodes an expert may spread over
    # Expert e needs the least r with a / vtop[r] + latency <= tau; only experts above vtop[m]
    # need more.
    room = (tau - cost.latency_s.min()) / (1 - 1e-9)
    hl, he = np.nonzero(a > (vtop[np.arange(L), np.minimum(min_replicas, usable)] * room)[:, None])
    if not len(hl):
        return counts
    need = (vtop[hl, 1:] < (a[hl, he] / room[hl])[:, None]).sum(axis=1) + 1
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


def _repair(
    layers: np.ndarray, a: np.ndarray, caps: np.ndarray, cost: CostModel, min_replicas: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Re-plan the layers the packing could not finish (tight slots): min_replicas replicas of
    every expert, hottest first, on the nodes with the most free slots (which always succeeds
    when the layer's slots allow it), tokens split in proportion to node speed. Returns flat
    (layer, expert, node, share)."""
    E, m = a.shape[1], min_replicas
    out = []
    for layer in layers.tolist():
        room = caps[layer].copy()
        nodes = np.empty((E, m), dtype=np.int64)
        for e in np.argsort(-a[layer], kind="stable").tolist():
            pick = np.argsort(-room, kind="stable")[:m]
            if (room[pick] <= 0).any():
                raise PlacementError(
                    f"layer {layer}: the slots given to this layer cannot hold "
                    f"{m} replicas of each of {E} experts on distinct nodes"
                )
            nodes[e] = pick
            room[pick] -= 1
        nodes.sort(axis=1)
        share = cost.speed[nodes] / cost.speed[nodes].sum(axis=1, keepdims=True)
        out.append(
            (np.full(E * m, layer), np.repeat(np.arange(E), m), nodes.ravel(), share.ravel())
        )
    return tuple(np.concatenate(x) for x in zip(*out))  # type: ignore[return-value]


def _with_kept(counts: np.ndarray, n_held: np.ndarray, caps: np.ndarray, m: int) -> np.ndarray:
    """Replica counts when n_held replicas stay: at least n_held, and new replicas only within
    the layer's slots (a layer short of them gets only those min_replicas needs)."""
    out = np.maximum(counts, n_held)
    over = out.sum(axis=1) > caps.sum(axis=1)
    out[over] = np.maximum(n_held[over], m)
    return out


SURPLUS_PASSES = 1
"""Passes of surplus splitting after the packing (step 4 of the module docstring)."""

INCREMENT_SURPLUS_PASSES = 4
"""The same for plan_increment, where kept replicas leave the packing little to do."""


@functools.lru_cache(maxsize=8)
def _expert_ids(num_layers: int, num_experts: int) -> np.ndarray:
    """0 .. E-1 repeated for every layer (read-only; cached: large fresh arrays are slow)."""
    ids = np.tile(np.arange(num_experts), num_layers)
    ids.flags.writeable = False
    return ids


def _runs(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Indices start[i] .. start[i] + length[i] - 1 for every i, concatenated."""
    return np.repeat(start - np.cumsum(length) + length, length) + np.arange(int(length.sum()))


def _sort_runs(
    experts: np.ndarray, offsets: np.ndarray, count: np.ndarray, node: np.ndarray, share: np.ndarray
) -> None:
    """Put these experts' replicas (runs of node / share) in node order, in place."""
    idx = _runs(offsets[experts], count[experts])
    perm = idx[np.lexsort((node[idx], np.repeat(experts, count[experts])))]
    node[idx], share[idx] = node[perm], share[perm]


def _merge_and_repair(
    packed: Packing,
    count: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    a: np.ndarray,
    caps: np.ndarray,
    cost: CostModel,
    m: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rare ends of packing: pieces merged into a replica of their expert on the same node
    become one replica; failed layers are re-planned by `_repair`. Returns (count, node,
    share) by expert."""
    L, E = a.shape
    N = len(cost.token_s)
    le = np.repeat(np.arange(L * E), count)
    keep = ~packed.failed[le // E]
    key, inverse = np.unique((le * N + node)[keep], return_inverse=True)
    share = np.bincount(inverse, weights=share[keep])
    if packed.failed.any():
        rl, re, rn, rs = _repair(np.nonzero(packed.failed)[0], a, caps, cost, m)
        key = np.concatenate([key, (rl * E + re) * N + rn])
        order = np.argsort(key, kind="stable")
        key, share = key[order], np.concatenate([share, rs])[order]
    return np.bincount(key // N, minlength=L * E), key % N, share


def _apply_transfers(
    count: np.ndarray,
    offsets: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    a: np.ndarray,
    N: int,
    src: np.ndarray,
    dst: np.ndarray,
    amount: np.ndarray,
    new: np.ndarray,
    m: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply split_surplus's transfers to the by-expert replicas (a: flat (L * E) loads):
    givers lose shares, takers gain them in the replica they hold or a new one; a replica
    left with nothing is dropped unless its expert needs it for min_replicas."""
    total = a[src // N]
    gone = find_replicas(count, offsets, node, src // N, src % N)
    np.subtract.at(share, gone, amount / total)
    added = np.sort(dst[new])  # distinct: a replica is new once
    j = np.minimum(np.searchsorted(added, dst), max(len(added) - 1, 0))
    into_new = added[j] == dst if len(added) else np.zeros(len(dst), dtype=bool)
    old = ~into_new
    np.add.at(
        share,
        find_replicas(count, offsets, node, dst[old] // N, dst[old] % N),
        amount[old] / total[old],
    )
    gained = np.bincount(
        j[into_new], weights=amount[into_new] / total[into_new], minlength=len(added)
    )
    idle = share[gone] <= 1e-12
    share[gone] = np.maximum(share[gone], 0.0)
    if len(added):
        node, share = add_replicas(count, offsets, node, share, added // N, added % N, gained)
    if idle.any():  # replicas that gave all their tokens away stay only for min_replicas
        le = np.unique(src[idle] // N)
        runs = _runs(piece_offsets(count)[le], count[le])
        owner = np.repeat(np.arange(len(le)), count[le])
        empty = share[runs] <= 1e-12
        left = count[le] - np.bincount(owner[empty], minlength=len(le))
        drop = empty & (left[owner] >= m)
        if drop.any():
            np.subtract.at(count, le[owner[drop]], 1)
            node, share = np.delete(node, runs[drop]), np.delete(share, runs[drop])
    return count, node, share


def _plan(
    a: np.ndarray,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    options: PlacementOptions,
    cost: CostModel,
    budget: int,
    caps: np.ndarray,
    keep: tuple[np.ndarray, np.ndarray] | None = None,
) -> Placement:
    """Replica counts, packing, repair, surplus splitting, output (see the module doc).

    keep: (held, share), both (L, E, N): replicas that exist already (plan_increment) and
    their current shares. They all stay, taking their expert's tokens in proportion to their
    shares (less what new replicas take), and no other replica moves.
    """
    L, E = a.shape
    N = len(nodes)
    m = options.min_replicas
    scored, cost = cost, _fill_cost(cost, caps)
    tau, vtop = layer_bounds(a, caps, cost)
    counts = _replica_counts(a, caps, cost, budget, m, (tau, vtop))
    room = (tau[:, None] - cost.latency_s) / cost.token_s  # tokens each node takes up to tau
    preset = None
    if keep is not None:
        held, held_share = keep
        # A kept replica stays if the new counts want it (the ones taking the most tokens
        # first) or it would still carry what surplus splitting makes a new replica for.
        score = np.where(held, 1.0 + held_share * cost.speed, 0.0)
        rank = np.argsort(np.argsort(-score, axis=2, kind="stable"), axis=2)
        carries = held_share * a[:, :, None] >= SPLIT_MIN * room[:, None, :]
        held = held & ((rank < counts[:, :, None]) | carries)
        n_held = held.sum(axis=2)
        counts = _with_kept(counts, n_held, caps, m)
        pl, pe, pn = np.nonzero(held)
        # They take what the new replicas leave, in proportion to their current shares.
        w = held_share[pl, pe, pn] + 1e-12
        w_sum = np.zeros((L, E))
        np.add.at(w_sum, (pl, pe), w)
        kept = a[pl, pe] * n_held[pl, pe] / counts[pl, pe]
        preset = (pl, pe, pn, kept * w / w_sum[pl, pe])
    preferred = None if cost.preferred.all() else cost.preferred
    size = a / counts
    packed = pack(size, counts, caps, cost.token_s, room, m, preferred, preset)
    # Replicas by expert: expert le = layer * E + e owns node[offsets[le] : + count[le]], in
    # node order; an expert's pieces are equal, so each takes 1 / count of its tokens.
    count = counts.ravel()
    node = packed.node
    share = np.repeat(1.0 / count, count)
    if preset is not None:
        loaded = a[preset[0], preset[1]] > 0
        share[packed.preset_piece[loaded]] = preset[3][loaded] / a[preset[0], preset[1]][loaded]
    multi = np.flatnonzero(count > 1)
    if len(multi):
        _sort_runs(multi, piece_offsets(count), count, node, share)
    node_tokens = room - packed.room
    cap_left = packed.cap_left
    largest, largest_tokens = packed.largest, packed.largest_tokens
    if packed.merged.any() or packed.failed.any():
        count, node, share = _merge_and_repair(packed, count, node, share, a, caps, cost, m)
        node_tokens = tokens_per_node(
            a,
            np.repeat(np.arange(L), count.reshape(L, E).sum(axis=1)),
            np.repeat(_expert_ids(L, E), count),
            node,
            share,
            N,
        )
        cap_left = caps - np.bincount(
            np.repeat(np.arange(L), count.reshape(L, E).sum(axis=1)) * N + node, minlength=L * N
        ).reshape(L, N)
        multi = np.flatnonzero(count > 1)
        largest_tokens[packed.failed] = 0.0  # re-planned layers give nothing away
    offsets = piece_offsets(count)
    held = np.repeat(multi, count[multi]) * N + node[_runs(offsets[multi], count[multi])]
    src, dst, amount, new = split_surplus(
        E,
        node_tokens,
        cap_left,
        largest,
        largest_tokens,
        held,
        tau,
        cost.token_s,
        cost.latency_s,
        SURPLUS_PASSES if keep is None else INCREMENT_SURPLUS_PASSES,
        preferred,
    )
    if len(src):
        count, node, share = _apply_transfers(
            count, offsets, node, share, a.ravel(), N, src, dst, amount, new, m
        )
    layer = np.repeat(np.arange(L), count.reshape(L, E).sum(axis=1))
    expert = np.repeat(_expert_ids(L, E), count)
    return build_placement(
        nodes, shape, options, scored, a, layer, expert, node, share, node_tokens
    )


def _fill_cost(cost: CostModel, caps: np.ndarray) -> CostModel:
    """The cost the water-filling balances with. With the colocated node in the attention
    worker's process, every layer it serves also costs it one call per remote node that may
    serve the layer (the attention side sends and reads those calls on the same CPU), so it
    takes fewer tokens than its speed alone would give it."""
    if not cost.in_process or not cost.call_s:
        return cost
    remote_nodes = int(((caps > 0) & ~cost.colocated).any(axis=0).sum())
    latency = cost.latency_s + np.where(cost.colocated, remote_nodes * cost.call_s, 0.0)
    return replace(cost, latency_s=latency)


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
    check_nodes(nodes)
    budget = _check_feasible(nodes, shape, options)
    a = token_load(load, shape, options)
    cost = cost_model(nodes, shape, options)
    caps = _layer_caps(nodes, shape, cost)
    plans = [_plan(a, nodes, shape, options, cost, budget, caps)]
    best = plans[0].step_time_s
    ideal = lower_bound_s(a, caps, cost)
    near_ideal = best <= ideal * (1 + EPLB_SKIP)  # then a subset must lower the ideal itself
    order = drop_order(a, caps, cost)
    for k, bound in enumerate(drop_bounds_s(a, caps, cost, order, options.min_replicas)):
        if bound >= best or (near_ideal and bound >= ideal):
            continue  # even a perfect plan on these nodes could not win (or not by much)
        sub = caps.copy()
        sub[:, order[: k + 1]] = 0
        try:
            plan = _plan(a, nodes, shape, options, cost, min(budget, int(sub.sum())), sub)
        except PlacementError:
            break
        plans.append(plan)
        best = min(best, plan.step_time_s)
    # EPLB's plan can win layers where slots are tight; it costs more to compute than ours, so
    # only when ours is not already within EPLB_SKIP of what any plan could reach.
    if best > ideal * (1 + EPLB_SKIP):
        eplb = eplb_candidate(a, nodes, shape, options, caps)
        if eplb is not None:
            plans.append(eplb)
    return best_per_layer(plans, a, nodes, shape, options, cost)


# ---------------------------------------------------------------------------------------------
# Incremental plans


def plan_increment(
    current: Placement,
    nodes: Sequence[NodeCapacity],
    shape: ExpertShape,
    new_load: np.ndarray | None,
    options: PlacementOptions | None = None,
) -> tuple[Placement, list[Move]]:
    """A plan for drifted load that moves as few expert bytes as possible.

    Replicas stay where they are if the new replica counts want them (the ones taking the most
    tokens first) or they still carry a worthwhile share (at least SPLIT_MIN of a node's load);
    the others are dropped. Kept replicas start from their current shares; newly hot experts
    get new replicas, packed onto the nodes with room; then surplus splitting re-splits tokens
    among replicas (adding a replica only where a node has a free slot). Replicas on nodes no
    longer given, or beyond a node's slots, are re-placed. Returns the plan and the moves
    (layers keyed as in `current`); `bytes_moved(moves)` is what nodes must load.
    """
    options = options or PlacementOptions()
    check_nodes(nodes)
    check_shape(current, shape)
    budget = _check_feasible(nodes, shape, options)
    L, E, N = shape.num_layers, shape.num_experts, len(nodes)
    a = token_load(new_load, shape, options)
    cost = cost_model(nodes, shape, options)

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
    new = _plan(a, nodes, shape, options, cost, budget, caps, keep=(held_cur, share_cur))
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
