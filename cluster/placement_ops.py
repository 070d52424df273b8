"""Packing expert replicas ("pieces") onto nodes for the placement planner, vectorised over layers.

`pack` is step 3 of the algorithm in `cluster/placement.py`'s docstring (`split_surplus` is
step 4): LPT in rounds. Every layer's pieces are sorted heaviest first; in each round every
*live* node takes one piece, the heaviest pieces going to the nodes that would finish them
soonest. A round is a few dozen numpy operations on (layers, nodes) arrays, and there are about
as many rounds as a node holds pieces (EPLB's balanced packing likewise runs once per slot of a
GPU).

A node is live when it has a free slot and its *room* (tokens it can still take before the
layer's finish level) is at least the round's lightest piece times max(1, PACE x the pieces it
can still expect to take). The first factor keeps nodes from running past the level; the second
paces slots against time: a node that fills its time faster than its slots (a slow node, or one
holding a hot piece) waits for the lighter pieces that come later, so that fast nodes do not run
out of slots with time to spare. A layer where no node is live, or whose remaining pieces fit
in one round, gives the round to every node with a free slot. With rack_local, other nodes
count only in layers where no preferred node has a free slot.

Pieces of one expert are adjacent in the sorted order, so those placed in one round land on
distinct nodes. A piece that would join another piece of its expert on a node (its expert
straddles two rounds, or the node kept a replica in `preset`) is swapped with a piece of the
same round, or else moved to another node with a free slot; failing both, it merges into the
replica already there when the expert has replicas to spare, and otherwise its layer is
reported `failed` (the caller re-plans it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PACE = 0.5
"""Weight of a node's expected remaining pieces in the live test (see the module doc)."""

SPLIT_MIN = 0.02
"""Surplus splitting leaves nodes within this fraction of the finish level alone and makes no
new replica for fewer tokens than this fraction of what a node serves at the level."""


@dataclass(frozen=True, eq=False)
class Packing:
    """Where the pieces went. Pieces are numbered by (layer, expert): expert e of layer l owns
    `counts[l, e]` consecutive pieces (see `piece_offsets`), preset ones first."""

    node: np.ndarray
    """(P,) node of each piece."""
    merged: np.ndarray
    """(P,) bool: the piece shares its node with another piece of its expert (one replica)."""
    failed: np.ndarray
    """(L,) bool: layers where a piece found no node of its own and its expert cannot spare it."""
    room: np.ndarray
    """(L, N) room left (tokens below the finish level; negative: above it)."""
    cap_left: np.ndarray
    """(L, N) free slots left."""
    largest: np.ndarray
    """(L, N) the expert of a largest piece on each node (-1: none)."""
    largest_tokens: np.ndarray
    """(L, N) that piece's tokens."""
    preset_piece: np.ndarray
    """The piece number of each preset replica (in the order given)."""


@dataclass(eq=False)
class _Board:
    """Packing state shared by `pack` and `_resolve` (arrays updated in place). The pieces to
    place are flat tables p_* (see `_sorted_pieces`)."""

    room: np.ndarray
    cap_left: np.ndarray
    held: np.ndarray
    """(L * K * N) bool: expert with row k (see `row` in `pack`) has a piece on node n."""
    K: int
    p_expert: np.ndarray
    p_row: np.ndarray
    p_size: np.ndarray
    p_number: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    min_replicas: int
    preferred: np.ndarray | None
    merged: np.ndarray
    failed: np.ndarray


def piece_offsets(counts: np.ndarray) -> np.ndarray:
    """Number of each expert's first piece (same shape as counts)."""
    flat = counts.ravel()
    return (np.cumsum(flat) - flat).reshape(counts.shape)


def _sorted_pieces(
    size: np.ndarray, todo: np.ndarray, first: np.ndarray, row: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The pieces to place, per layer heaviest first (an expert's pieces adjacent), as flat
    (L * W) tables: expert, piece number, size and `row` of the expert (if given), valid for
    the first length[l] entries of layer l (entries l * W .. l * W + W - 1).

    size: (L, E) tokens per piece; todo: (L, E) pieces to place; first: (L, E) number of each
    expert's first piece to place. Column e < E of a layer holds expert e's first piece, the
    columns after E the experts' further pieces, and one column stays empty (so reading one
    past a layer's last piece stays in the table); one integer sort orders them all. (The
    tables are int32 / float32 where they can be: fresh large arrays cost page faults.)"""
    L, E = size.shape
    xl, xe = np.nonzero(todo > 1)
    reps = todo[xl, xe] - 1
    per_layer = np.bincount(xl, weights=reps, minlength=L).astype(np.int64)
    W = E + int(per_layer.max(initial=0)) + 1
    key = np.full((L, W), -1.0, dtype=np.float32)
    key[:, :E] = size
    expert = np.full((L, W), -1, dtype=np.int32)
    expert[:, :E] = np.arange(E, dtype=np.int32)
    number = np.zeros((L, W), dtype=np.int32)
    number[:, :E] = first
    if len(xl):
        el, ee = np.repeat(xl, reps), np.repeat(xe, reps)
        rank = np.arange(len(el)) - np.repeat(np.cumsum(reps) - reps, reps)  # 0.. per expert
        col = E + np.arange(len(el)) - np.repeat(np.cumsum(per_layer) - per_layer, per_layer)
        key[el, col] = size[el, ee]
        expert[el, col] = ee
        number[el, col] = first[el, ee] + 1 + rank
    if todo.min(initial=1) < 1:
        key[:, :E][todo < 1] = -1.0
    # Sort by size, heaviest first: sizes are >= 0, so their float32 bits sort as integers;
    # the column rides in the lowest bits (pieces within 2**-14 of each other may swap).
    bits = np.int32((1 << (W - 1).bit_length()) - 1)
    ints = key.view(np.int32)
    ints &= ~bits
    ints |= bits - np.arange(W, dtype=np.int32)
    ints.sort(axis=1)
    ints &= bits
    np.subtract(bits + np.arange(L, dtype=np.int32)[:, None] * W, ints, out=ints)
    at = ints[:, ::-1]  # flat index of each sorted piece's column
    # Gathers reuse the tables they no longer need as output (fresh memory is the cost here).
    p_expert = expert.ravel().take(at).ravel()
    p_number = np.take(number.ravel(), at, out=expert).ravel()
    index = np.maximum(p_expert.reshape(L, W), 0, out=number)
    index += (np.arange(L, dtype=np.int32) * E)[:, None]
    p_size = size.ravel().take(index).ravel()
    p_size[p_expert < 0] = 0.0
    p_row = None if row is None else np.take(row.ravel(), index, out=ints).ravel()
    length = per_layer + (E - (todo < 1).sum(axis=1) if todo.min(initial=1) < 1 else E)
    return p_expert, p_number, p_size, p_row, length


def pack(
    size: np.ndarray,
    counts: np.ndarray,
    caps: np.ndarray,
    token_s: np.ndarray,
    room: np.ndarray,
    min_replicas: int,
    preferred: np.ndarray | None = None,
    preset: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Packing:
    """Place counts[l, e] pieces of size[l, e] tokens for every expert (see the module doc).

    caps: (L, N) slots; token_s: (N,) seconds per token on each node; room: (L, N) tokens each
    node may take before the layer's finish level; preferred: (N,) nodes to fill first
    (rack_local) or None; preset: replicas that stay (one piece each) as flat (layer, expert,
    node, tokens), sorted by layer and expert, at most counts[l, e] of an expert.
    """
    L, E = size.shape
    N = len(token_s)
    room = room.astype(np.float64, copy=True)
    cap_left = caps.astype(np.int64, copy=True)
    offsets = piece_offsets(counts)
    node = np.empty(int(counts.sum()), dtype=np.int64)
    merged = np.zeros(len(node), dtype=bool)
    failed = np.zeros(L, dtype=bool)
    # Experts with several pieces get a row of `held`: (layer, row, node) -> a piece is there.
    ml, me = np.nonzero(counts >= 2)
    K = int(np.bincount(ml, minlength=1).max())
    row = np.full((L, E), -1, dtype=np.int32)
    row[ml, me] = np.arange(len(ml)) - np.searchsorted(ml, ml)
    held = np.zeros(L * K * N, dtype=bool)
    todo, first = counts, offsets
    largest = np.full((L, N), -1, dtype=np.int64)
    largest_tokens = np.zeros((L, N))
    preset_piece = np.zeros(0, dtype=np.int64)
    if preset is not None:
        pl, pe, pn, ptok = preset
        n_held = np.bincount(pl * E + pe, minlength=L * E).reshape(L, E)
        rank = np.arange(len(pl)) - np.repeat(piece_offsets(n_held).ravel(), n_held.ravel())
        preset_piece = offsets[pl, pe] + rank
        node[preset_piece] = pn
        np.subtract.at(room, (pl, pn), ptok)
        np.subtract.at(cap_left, (pl, pn), 1)
        m = row[pl, pe] >= 0
        held[(pl[m] * K + row[pl[m], pe[m]]) * N + pn[m]] = True
        todo, first = counts - n_held, offsets + n_held
        np.maximum.at(largest_tokens, (pl, pn), ptok)
        top = ptok >= largest_tokens[pl, pn]
        largest[pl[top], pn[top]] = pe[top]

    p_expert, p_number, p_size, p_row, length = _sorted_pieces(
        size, todo, first, row if K else None
    )
    W = len(p_expert) // L
    first_piece = np.full(L * N, L * W - 1)  # each node's first (largest) piece of the rounds
    first_missing = True
    board = None
    if p_row is not None:
        board = _Board(
            room, cap_left, held, K, p_expert, p_row, p_size, p_number, offsets, counts,
            min_replicas, preferred, merged, failed,
        )  # fmt: skip
        # Rounds past each layer's last piece of a replicated expert need no check.
        at = np.flatnonzero(p_row >= 0)
        multi_end = np.zeros(L, dtype=np.int64)
        np.maximum.at(multi_end, at // W, at + 1)

    k = np.arange(N)
    base = np.arange(L) * N
    room_flat, cap_flat = room.reshape(-1), cap_left.reshape(-1)
    ptr = np.arange(L) * W
    end = ptr + length
    last = np.full(L, N)  # pieces placed in the previous round
    while True:
        rem = end - ptr
        if rem.max(initial=0) <= 0:
            break
        open_ = cap_left > 0
        if preferred is not None:
            pref = open_ & preferred
            open_ = np.where(pref.any(axis=1, keepdims=True), pref, open_)
        lightest = p_size[ptr + np.maximum(np.minimum(last, rem) - 1, 0)]
        scale = PACE * rem / np.maximum(cap_left.sum(axis=1), 1)
        need = np.maximum(cap_left * (scale * lightest)[:, None], lightest[:, None])
        live = open_ & (room >= need)
        idle = ~live.any(axis=1) | (rem <= open_.sum(axis=1))
        if idle.any():
            live[idle] = open_[idle]
        M = np.minimum(live.sum(axis=1), rem)
        if ((M == 0) & (rem > 0)).any():  # no free slot left (counts beyond caps): give up
            failed |= (M == 0) & (rem > 0)
            ptr = np.where(M == 0, end, ptr)
            continue
        middle = p_size[ptr + M // 2]
        order = np.argsort(np.where(live, (middle[:, None] - room) * token_s, np.inf), axis=1)
        li, ji = np.nonzero(k < M[:, None])
        piece = ptr[li] + ji
        dest = order[li, ji]
        flat = base[li] + dest
        room_flat[flat] -= p_size[piece]
        cap_flat[flat] -= 1
        if board is not None and (ptr < multi_end).any():
            r = board.p_row[piece]
            slot = (li * K + r) * N + dest
            multi_piece = r >= 0
            clash = multi_piece & held[np.where(multi_piece, slot, 0)]
            held[slot[multi_piece & ~clash]] = True
            if clash.any():
                pending = clash.copy()
                for i in np.nonzero(clash)[0].tolist():
                    pending[i] = False
                    _resolve(board, i, pending, li, piece, dest)
                flat = base[li] + dest
        if first_missing:
            np.minimum.at(first_piece, flat, piece)
            first_missing = bool((first_piece == L * W - 1).any())
        node[p_number[piece]] = dest
        ptr += M
        last = M
    bigger = p_size[first_piece] > largest_tokens.ravel()  # (the last entry is empty: size 0)
    largest.reshape(-1)[bigger] = p_expert[first_piece[bigger]]
    largest_tokens.reshape(-1)[bigger] = p_size[first_piece[bigger]]
    return Packing(node, merged, failed, room, cap_left, largest, largest_tokens, preset_piece)


def _resolve(
    b: _Board, i: int, pending: np.ndarray, li: np.ndarray, piece: np.ndarray, dest: np.ndarray
) -> None:
    """Round entry i put a piece on a node that holds its expert already: swap it with another
    entry of the round (not one still `pending` its own fix), or move it to a node with a
    free slot, or merge it (module doc)."""
    room, cap_left, held, K = b.room, b.cap_left, b.held, b.K
    N = room.shape[1]
    layer, p = int(li[i]), int(piece[i])
    e, r, here, w = int(b.p_expert[p]), int(b.p_row[p]), int(dest[i]), float(b.p_size[p])
    own = (layer * K + r) * N  # held[own + n]: expert e has a piece on node n
    lo, hi = np.searchsorted(li, layer), np.searchsorted(li, layer, side="right")
    others = np.arange(lo, hi)
    others = others[(others != i) & ~pending[others] & (b.p_expert[piece[others]] != e)]
    if len(others):  # swap with the piece of similar size whose expert is not on `here`
        there = dest[others]
        r2 = b.p_row[piece[others]]
        ok = ~held[own + there] & ((r2 < 0) | ~held[(layer * K + np.maximum(r2, 0)) * N + here])
        ok &= ~b.merged[b.p_number[piece[others]]]
        if ok.any():
            cand = others[ok]
            j = int(cand[np.abs(b.p_size[piece[cand]] - w).argmin()])
            q, n2, w2 = int(piece[j]), int(dest[j]), float(b.p_size[piece[j]])
            room[layer, here] += w - w2
            room[layer, n2] += w2 - w
            if b.p_row[q] >= 0:
                held[(layer * K + b.p_row[q]) * N + n2] = False
                held[(layer * K + b.p_row[q]) * N + here] = True
            dest[i], dest[j] = n2, here
            held[own + n2] = True
            return
    free = (cap_left[layer] > 0) & ~held[own : own + N]
    if b.preferred is not None and (free & b.preferred).any():
        free &= b.preferred
    if free.any():  # move to the node with a free slot and the most room
        n2 = int(np.where(free, room[layer], -np.inf).argmax())
        room[layer, here] += w
        room[layer, n2] -= w
        cap_left[layer, here] += 1
        cap_left[layer, n2] -= 1
        dest[i] = n2
        held[own + n2] = True
        return
    first, count = int(b.offsets[layer, e]), int(b.counts[layer, e])
    if count - int(b.merged[first : first + count].sum()) > b.min_replicas:
        b.merged[b.p_number[p]] = True
        cap_left[layer, here] += 1  # one replica, one slot
    else:
        b.failed[layer] = True


def split_surplus(
    num_experts: int,
    node_tokens: np.ndarray,
    cap_left: np.ndarray,
    largest: np.ndarray,
    largest_tokens: np.ndarray,
    held: np.ndarray,
    level: np.ndarray,
    token_s: np.ndarray,
    latency_s: np.ndarray,
    passes: int,
    preferred: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surplus splitting: nodes above their layer's finish `level` give tokens of their
    largest replica to nodes below it, which take them into a replica of that expert they hold
    or a new one in a free slot (with rack_local, preferred nodes only).

    Per pass and layer, givers (largest surplus first) and takers (largest deficit first) are
    lined up by their cumulative amounts (the north-west corner rule) and each taker takes
    from the giver its interval starts in (one transfer a taker and pass). A node counts as a
    giver only above the level by SPLIT_MIN of its load there, and a new replica must carry
    at least that much.

    Replicas are keyed (layer * E + expert) * N + node; `held` (sorted) holds the keys of
    the replicas of experts with several; largest: (L, N) the expert of a largest replica on
    each node. node_tokens, cap_left, largest_tokens ((L, N)) are updated in place. Returns
    the transfers: (from key, to key, tokens, whether the taker's replica is new)."""
    L, N = node_tokens.shape
    E = num_experts
    base = np.arange(L)[:, None]
    tol = SPLIT_MIN * (level[:, None] - latency_s) / token_s  # (L, N) tokens
    out: list[tuple[np.ndarray, ...]] = []
    for _ in range(passes):
        times = node_tokens * token_s + (node_tokens > 0) * latency_s
        over = (times - level[:, None]) / token_s  # tokens above (+) or below (-) the level
        give = np.where(over > tol, np.minimum(over, largest_tokens), 0.0)
        take = (over < 0) & (cap_left > 0)
        if preferred is not None:
            take &= preferred
        take = np.where(take, -over, 0.0)
        if not (give.any() and take.any()):
            break
        go = np.argsort(-give, axis=1)
        to = np.argsort(-take, axis=1)
        G = np.cumsum(np.take_along_axis(give, go, axis=1), axis=1)
        took = np.take_along_axis(take, to, axis=1)
        T = np.cumsum(took, axis=1)
        # Taker j's interval [T[j] - took[j], T[j]) starts inside giver i's [G[i-1], G[i]).
        start = T - took
        span = 2.0 * float(max(G[:, -1].max(), T[:, -1].max())) + 1.0
        gi = np.searchsorted((G + base * span).ravel(), (start + base * span).ravel(), "right")
        gi = np.minimum(gi.reshape(L, N) - base * N, N - 1)
        amount = np.minimum(T, np.take_along_axis(G, gi, axis=1)) - start
        tl, tj = np.nonzero(amount > 1e-9 * (T[:, -1:] + 1.0))
        if not len(tl):
            break
        g, t, amount = go[tl, gi[tl, tj]], to[tl, tj], amount[tl, tj]
        le = tl * E + largest[tl, g]
        src, dst = le * N + g, le * N + t
        pos = np.minimum(np.searchsorted(held, dst), max(len(held) - 1, 0))
        new = held[pos] != dst if len(held) else np.ones(len(dst), dtype=bool)
        worth = ~new | (amount >= tol[tl, t])
        if not worth.all():
            tl, g, t, amount, src, dst, new = (x[worth] for x in (tl, g, t, amount, src, dst, new))
        np.subtract.at(largest_tokens, (tl, g), amount)
        np.subtract.at(node_tokens, (tl, g), amount)
        np.add.at(node_tokens, (tl, t), amount)
        np.subtract.at(cap_left, (tl[new], t[new]), 1)
        # The expert now has replicas on g and t: later passes must see both.
        held = np.sort(np.concatenate([held, src, dst[new]]))
        out.append((src, dst, amount, new))
    if not out:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), np.zeros(0, dtype=bool)
    src, dst, amount, new = (np.concatenate(x) for x in zip(*out))
    return src, dst, amount, new


def find_replicas(
    counts: np.ndarray, offsets: np.ndarray, node: np.ndarray, le: np.ndarray, at: np.ndarray
) -> np.ndarray:
    """Index of the replica of expert `le` (layer * E + expert) on node `at`, for replicas
    stored by expert: expert le's replicas are node[offsets[le] : offsets[le] + counts[le]]."""
    pos = offsets[le]
    n = counts[le]
    for k in range(1, int(n.max(initial=1))):
        pos = np.where((node[pos] != at) & (k < n), offsets[le] + k, pos)
    return pos


def add_replicas(
    counts: np.ndarray,
    offsets: np.ndarray,
    node: np.ndarray,
    share: np.ndarray,
    le: np.ndarray,
    at: np.ndarray,
    new_share: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Insert replicas (expert le, node at, share) into the by-expert arrays (node, share),
    keeping each expert's replicas in node order; counts (flat, per expert) is updated in place.
    Returns the new (node, share)."""
    N = int(max(node.max(initial=0), at.max(initial=0))) + 1
    order = np.argsort(le * N + at)
    le, at, new_share = le[order], at[order], new_share[order]
    where = offsets[le] + counts[le]
    node = np.insert(node, where, at)
    share = np.insert(share, where, new_share)
    np.add.at(counts, le, 1)
    # Sort the touched experts' runs by node.
    touched = le[np.r_[True, le[1:] != le[:-1]]]
    start = offsets[touched] + np.searchsorted(le, touched)
    length = counts[touched]
    idx = np.repeat(start - np.cumsum(length) + length, length) + np.arange(int(length.sum()))
    run = np.repeat(np.arange(len(touched)), length)
    perm = idx[np.argsort(run * N + node[idx])]
    node[idx], share[idx] = node[perm], share[perm]
    return node, share
