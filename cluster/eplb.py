"""DeepSeek's Expert Parallelism Load Balancer (EPLB): the baseline our placement planner is
measured against.

Source: DeepSeek-AI, EPLB, 2025, github.com/deepseek-ai/EPLB — reimplemented from its README
description (no code copied from DeepSeek or vLLM). EPLB assumes identical GPUs, each holding
the same number of physical expert slots, and ignores link speeds:

- **Hierarchical policy** (when the number of expert groups is a multiple of the number of
  nodes, to exploit group-limited routing): (a) pack expert groups onto nodes so node loads
  are balanced; (b) inside each node, replicate experts until the node holds
  `num_replicas / num_nodes` physical experts, each time giving one more replica to the
  expert with the largest load per replica; (c) pack the node's physical experts onto its GPUs
  so GPU loads are balanced, the same number of slots per GPU.
- **Global policy** (otherwise): the same with the whole cluster as one node, ignoring groups.

Balanced packing: items sorted by weight, heaviest first, each goes to the lightest pack that
still has room; every pack ends with the same number of items.

The physical slots of a layer are numbered GPU-major: slot `i` lives on GPU
`i // (num_replicas // num_gpus)`. Everything here is vectorised over layers with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class EplbResult:
    """EPLB's mapping for every layer (L layers, E logical experts, R physical slots)."""

    phy2log: np.ndarray
    """(L, R) int: the logical expert held by each physical slot."""
    phy_rank: np.ndarray
    """(L, R) int: which replica of its logical expert each slot is (0 .. count - 1)."""
    log2phy: np.ndarray
    """(L, E, max count) int: the slots of each logical expert, padded with -1."""
    logcnt: np.ndarray
    """(L, E) int: replicas per logical expert (>= 1)."""
    num_gpus: int

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.num_gpus

    @property
    def gpu_of_slot(self) -> np.ndarray:
        """(R,) int: the GPU of each physical slot (the same for every layer)."""
        return np.arange(self.phy2log.shape[1]) // self.slots_per_gpu

    def slots_of(self, layer: int, expert: int) -> list[int]:
        """The physical slots holding a replica of `expert` in `layer`."""
        row = self.log2phy[layer, expert]
        return [int(s) for s in row[row >= 0]]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the items of every row into `num_packs` packs of equal item count, balancing weight.

    weight: (rows, items) with items a multiple of num_packs. Returns (pack, rank), both
    (rows, items): the pack of each item and its position inside the pack.
    """
    rows, items = weight.shape
    if items % num_packs:
        raise ValueError(f"{items} items do not split into {num_packs} equal packs")
    per_pack = items // num_packs
    if per_pack == 1:
        index = np.broadcast_to(np.arange(items), (rows, items)).copy()
        return index, np.zeros((rows, items), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")  # heaviest first
    pack = np.empty((rows, items), dtype=np.int64)
    rank = np.empty((rows, items), dtype=np.int64)
    pack_weight = np.zeros((rows, num_packs))
    pack_count = np.zeros((rows, num_packs), dtype=np.int64)
    r = np.arange(rows)
    for k in range(items):
        item = order[:, k]
        open_weight = np.where(pack_count < per_pack, pack_weight, np.inf)
        p = open_weight.argmin(axis=1)  # lightest pack with room
        pack[r, item] = p
        rank[r, item] = pack_count[r, p]
        pack_weight[r, p] += weight[r, item]
        pack_count[r, p] += 1
    return pack, rank


def replicate_experts(
    weight: np.ndarray, num_physical: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each row's logical experts `num_physical` slots in all, one replica at a time to
    the expert with the largest load per replica.

    weight: (rows, num_logical). Returns phy2log (rows, num_physical), phy_rank (rows,
    num_physical) and logcnt (rows, num_logical).
    """
    rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} experts")
    phy2log = np.empty((rows, num_physical), dtype=np.int64)
    phy2log[:, :num_logical] = np.arange(num_logical)
    phy_rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_logical), dtype=np.int64)
    r = np.arange(rows)
    for i in range(num_logical, num_physical):
        hottest = (weight / logcnt).argmax(axis=1)
        phy2log[:, i] = hottest
        phy_rank[:, i] = logcnt[r, hottest]
        logcnt[r, hottest] += 1
    return phy2log, phy_rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a (rows, n) permutation."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1])[None, :].repeat(len(perm), 0), axis=1)
    return inv


def _hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    logical_per_node = num_logical // num_nodes
    physical_per_node = num_physical // num_nodes
    physical_per_gpu = num_physical // num_gpus

    # (a) groups -> nodes. Renumber logical experts node-major ("meta-logical" ids), so node j
    # holds meta-logical experts [j * E/nodes, (j+1) * E/nodes).
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)  # (L, G)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_meta = group_node * groups_per_node + group_rank  # (L, G)
    log2meta = (group_meta[:, :, None] * group_size + np.arange(group_size)).reshape(layers, -1)
    meta2log = _inverse(log2meta)

    # (b) replicate inside each node; rows are (layer, node) pairs.
    meta_load = np.take_along_axis(weight, meta2log, axis=1).reshape(-1, logical_per_node)
    phy2meta, phy_rank, meta_count = replicate_experts(meta_load, physical_per_node)

    # (c) the node's physical experts -> its GPUs.
    phy_load = np.take_along_axis(meta_load / meta_count, phy2meta, axis=1)
    gpu, gpu_rank = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2slot = gpu * physical_per_gpu + gpu_rank  # position inside the node, GPU-major
    slot2phy = _inverse(phy2slot)
    slot_meta = np.take_along_axis(phy2meta, slot2phy, axis=1)  # node-local meta ids
    slot_meta = slot_meta.reshape(layers, num_nodes, -1) + (
        np.arange(num_nodes)[None, :, None] * logical_per_node
    )
    phy2log = np.take_along_axis(meta2log, slot_meta.reshape(layers, -1), axis=1)
    rank = np.take_along_axis(phy_rank, slot2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(meta_count.reshape(layers, -1), log2meta, axis=1)
    return phy2log, rank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> EplbResult:
    """EPLB for every layer of `weight` ((L, E) expert loads, e.g. token counts).

    num_replicas: physical expert slots per layer (R >= E, a multiple of num_gpus);
    num_groups: expert groups (E a multiple of it); num_nodes: servers; num_gpus: GPUs in all
    (a multiple of num_nodes). The hierarchical policy runs when num_groups % num_nodes == 0,
    the global one otherwise.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be (layers, experts), got shape {weight.shape}")
    layers, num_logical = weight.shape
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas {num_replicas} < {num_logical} experts")
    if num_gpus < 1 or num_replicas % num_gpus:
        raise ValueError(f"num_replicas {num_replicas} is not a multiple of num_gpus {num_gpus}")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(f"num_gpus {num_gpus} is not a multiple of num_nodes {num_nodes}")
    if num_groups < 1 or num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} groups")
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((layers, num_logical, int(logcnt.max())), -1, dtype=np.int64)
    layer_index = np.arange(layers)[:, None].repeat(num_replicas, 1)
    log2phy[layer_index, phy2log, rank] = np.arange(num_replicas)
    return EplbResult(phy2log, rank, log2phy, logcnt, num_gpus)
