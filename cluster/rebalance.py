"""Live rebalancing: when routing drifts and the placement's predicted imbalance passes a
threshold, compute an incremental plan that moves as few expert bytes as possible and apply it
without making any request wait on a missing expert:

1. every shard that gains experts loads them (from the checkpoint, on its own node) while the
   old routing table keeps serving;
2. the routing table is swapped in one step between two layers' dispatches (the only pause
   requests see is that swap);
3. only then do shards drop the experts they no longer serve.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from expertmesh.models.config import ModelConfig

from .dispatch import RoutingTable
from .placement import PlacementOptions, evaluate, plan_increment
from .placement_model import NodeCapacity
from .planning import expert_shape, node_capacities
from .runtime import ExpertParallelModel, routes_from_placement
from .topology import Topology


@dataclass
class RebalanceReport:
    triggered: bool
    """Imbalance passed the threshold."""
    balancedness_before: float
    balancedness_after: float
    step_time_before_s: float = 0.0
    """Predicted expert time per step under the observed load, current placement."""
    step_time_after_s: float = 0.0
    applied: bool = False
    """A new placement went live (only when it predicts a faster step)."""
    bytes_moved: int = 0
    moves: int = 0
    plan_s: float = 0.0
    """Time spent planning (in the caller's process; serving continues)."""
    load_s: float = 0.0
    """Time spent loading new replicas (requests keep being served meanwhile)."""
    pause_s: float = 0.0
    """Time the routing-table swap held the dispatcher (what an in-flight request can wait)."""
    drop_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Rebalancer:
    """Watches the dispatcher's per-expert token counts and rebalances the placement."""

    def __init__(
        self,
        ep: ExpertParallelModel,
        topology: Topology,
        threshold: float = 1.2,
        min_tokens: int = 512,
        options: PlacementOptions | None = None,
    ) -> None:
        self.ep = ep
        self.topology = topology
        self.config: ModelConfig = ep.config
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.options = options or ep.plan_options
        self.shape = expert_shape(self.config)
        self.nodes = node_capacities(topology, self.shape)

    def observed_load(self) -> np.ndarray:
        """(MoE layers, experts) token assignments since the last reset."""
        tokens = self.ep.dispatcher.stats.tokens
        return np.stack(
            [
                tokens.get(layer, np.zeros(self.config.moe.num_experts))
                for layer in self.config.moe_layer_ids
            ]
        ).astype(float)

    def check(self, exclude: Collection[str] = ()) -> RebalanceReport:
        """Rebalance if the observed load makes the current placement too imbalanced.
        exclude: nodes out of service (lost or drained): the plan never uses them."""
        nodes = [n for n in self.nodes if n.name not in exclude]
        load = self.observed_load()
        current = self._evaluate(self.ep.placement, load, nodes)
        before = current["balancedness"]
        if load.sum() < self.min_tokens or before <= self.threshold:
            return RebalanceReport(
                False, before, before, current["step_time_s"], current["step_time_s"]
            )
        return self.apply(load, current, nodes)

    def _evaluate(
        self, placement: Any, load: np.ndarray, nodes: Sequence[NodeCapacity]
    ) -> dict[str, Any]:
        return evaluate(
            placement.by_index(self.config.moe_layer_ids), nodes, self.shape, load, self.options
        )

    def apply(
        self,
        load: np.ndarray,
        current: dict[str, Any],
        nodes: Sequence[NodeCapacity] | None = None,
    ) -> RebalanceReport:
        nodes = self.nodes if nodes is None else nodes
        before = current["balancedness"]
        t_plan = time.perf_counter()
        old = self.ep.placement.by_index(self.config.moe_layer_ids)
        new, moves = plan_increment(old, nodes, self.shape, load, self.options)
        new = new.with_layer_ids(self.config.moe_layer_ids)
        predicted = self._evaluate(new, load, nodes)
        if predicted["step_time_s"] >= current["step_time_s"]:  # nothing to gain: keep it
            return RebalanceReport(
                True, before, before, current["step_time_s"], current["step_time_s"]
            )
        layer_of = self.config.moe_layer_ids
        adds: dict[str, dict[int, list[int]]] = {}
        drops: dict[str, dict[int, list[int]]] = {}
        for m in moves:
            layer = layer_of[m.layer]
            if m.dst is not None:
                adds.setdefault(m.dst, {}).setdefault(layer, []).append(m.expert)
            if m.src is not None:
                drops.setdefault(m.src, {}).setdefault(layer, []).append(m.expert)
        pool: Any = self.ep.pool
        t0 = time.perf_counter()
        plan_s = t0 - t_plan
        pool.load_many(adds)  # new replicas are in memory before anyone routes to them
        t1 = time.perf_counter()
        self.ep.dispatcher.swap_table(RoutingTable(routes_from_placement(new)))
        self.ep.placement = new
        t2 = time.perf_counter()
        pool.drop_many(drops)
        t3 = time.perf_counter()
        self.ep.dispatcher.stats.tokens.clear()
        return RebalanceReport(
            triggered=True,
            balancedness_before=before,
            balancedness_after=predicted["balancedness"],
            step_time_before_s=current["step_time_s"],
            step_time_after_s=predicted["step_time_s"],
            applied=True,
            bytes_moved=sum(m.bytes for m in moves if m.dst is not None),
            moves=len(moves),
            plan_s=plan_s,
            load_s=t1 - t0,
            pause_s=t2 - t1,
            drop_s=t3 - t2,
        )
