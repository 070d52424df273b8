"""Dispatch: moving each layer's routed tokens to the expert shards and back.

`RemoteExpertBank` takes the place of a layer's `ExpertBank` inside the attention worker's
model (same call: rows, expert ids, weights -> combined output), so the model core runs
unchanged: attention, norms and routers stay local; expert work goes to shards.

Per layer and step: assignments are sorted by expert once; each expert's rows are split over
its live replicas in proportion to the placement's shares; every node with work gets one call;
the replies are written back in the original order and combined with the router weights.

Failures: a call to a dead shard, or to one that lacks an expert it is routed (a restarted
actor before its experts are reloaded), raises `ShardLost`; its rows go to another live replica of the
same expert. If an expert has no live replica, the shard is recovered (restarted by Ray and
reloaded from the checkpoint) and the rows are retried. No expert is ever skipped: after the
recovery deadline the step fails loudly with `ShardLost`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from expertmesh.models.errors import ExpertNotLoaded

from .shard import ExpertShard, ShardReply


class ShardLost(RuntimeError):
    """A shard did not answer (its actor or node died)."""

    def __init__(self, node: str, reason: str = "") -> None:
        super().__init__(f"expert shard on node '{node}' is lost{': ' + reason if reason else ''}")
        self.node = node


Replica = tuple[str, float]  # (node, share of the expert's tokens)


class RoutingTable:
    """Which nodes hold a replica of each (layer, expert), and the share each should take.

    Swapped atomically as a whole (live rebalancing builds a new table, then swaps)."""

    def __init__(self, routes: Mapping[tuple[int, int], Sequence[Replica]]) -> None:
        self.routes: dict[tuple[int, int], tuple[Replica, ...]] = {}
        for key, replicas in routes.items():
            if not replicas:
                raise ValueError(f"layer {key[0]} expert {key[1]} has no replica")
            total = sum(s for _, s in replicas)
            self.routes[key] = tuple((n, s / total) for n, s in replicas)

    def replicas(self, layer: int, expert: int) -> tuple[Replica, ...]:
        return self.routes[(layer, expert)]

    def node_experts(self) -> dict[str, dict[int, list[int]]]:
        out: dict[str, dict[int, list[int]]] = {}
        for (layer, expert), replicas in sorted(self.routes.items()):
            for node, _ in replicas:
                out.setdefault(node, {}).setdefault(layer, []).append(expert)
        return out

    @property
    def nodes(self) -> list[str]:
        return sorted(self.node_experts())


class ShardPool(Protocol):
    """The shards a dispatcher talks to (Ray actors, or in-process objects in tests)."""

    def submit(
        self,
        node: str,
        layer: int,
        x: np.ndarray,
        expert_ids: np.ndarray,
        trace: dict[str, str] | None = None,
    ) -> Any:
        """Start the call; `trace` is the W3C trace context the shard's span continues."""
        ...

    def result(self, handle: Any) -> ShardReply:
        """The reply, or ShardLost(node) when the shard died."""
        ...

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        """Bring the shard on `node` back holding `experts`, or raise ShardLost."""
        ...


class InProcessShardPool:
    """Shards as plain objects in this process: single-node runs and unit tests."""

    def __init__(self, shards: Mapping[str, ExpertShard]) -> None:
        self.shards = dict(shards)
        self.dead: set[str] = set()

    def submit(
        self,
        node: str,
        layer: int,
        x: np.ndarray,
        expert_ids: np.ndarray,
        trace: dict[str, str] | None = None,
    ) -> Any:
        return (node, layer, x, expert_ids, trace)

    def result(self, handle: Any) -> ShardReply:
        node, layer, x, ids, trace = handle
        if node in self.dead:
            raise ShardLost(node, "marked dead")
        try:
            return self.shards[node].compute(layer, x, ids, trace)
        except ExpertNotLoaded as e:
            raise ShardLost(node, f"it lacks experts it is routed: {e}") from e

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        self.dead.discard(node)
        self.shards[node].ensure(experts)

    def add_node(self, node: str, timeout_s: float) -> None:
        self.dead.discard(node)

    def load_many(self, adds: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        for node, per_layer in adds.items():
            for layer, ids in per_layer.items():
                self.shards[node].load(layer, ids)

    def drop_many(self, drops: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        for node, per_layer in drops.items():
            for layer, ids in per_layer.items():
                self.shards[node].drop(layer, ids)


@dataclass
class DispatchStats:
    """Accumulated per-layer dispatch figures (reset by the caller when it wants a window)."""

    tokens: dict[int, np.ndarray] = field(default_factory=dict)
    """layer -> token-assignments per expert."""
    wall_s: float = 0.0
    compute_s: float = 0.0
    emulated_compute_s: float = 0.0
    emulated_link_s: float = 0.0
    slowest_compute_s: float = 0.0
    """Per layer call, the slowest shard's compute (real + emulated slowdown), summed: the
    compute part of the time the attention worker waits."""
    slowest_link_s: float = 0.0
    """The emulated link time of that slowest shard, summed likewise."""
    steps: int = 0
    """Layer calls (one per MoE layer per forward pass)."""
    calls: int = 0
    failovers: int = 0
    recoveries: int = 0
    bytes_sent: int = 0
    bytes_by_node: dict[str, int] = field(default_factory=dict)
    """Bytes sent to and received from each node (rows out and back)."""

    def record_tokens(self, layer: int, counts: np.ndarray) -> None:
        if layer in self.tokens:
            self.tokens[layer] += counts
        else:
            self.tokens[layer] = counts.astype(np.int64).copy()


class DispatchObserver(Protocol):
    """What the dispatcher reports as it works (the platform's detectors listen, see
    `cluster/detect.py`). Called on the attention worker's thread; must be cheap."""

    def on_reply(
        self, node: str, layer: int, rows: int, nbytes: int, round_trip_s: float, busy_s: float
    ) -> None:
        """One shard call answered: `round_trip_s` measured here from submit to reply (an
        upper bound when replies are read one after another), `busy_s` the time the shard
        spent computing (its own figure, emulated slowdown included); the difference is the
        time on the wire and in the transport."""

    def on_step(self, layer: int, counts: np.ndarray) -> None:
        """One layer call done: token assignments per expert this step."""


class Dispatcher:
    """Sends one layer's expert work to the shards and gathers the results."""

    def __init__(
        self,
        table: RoutingTable,
        pool: ShardPool,
        num_experts: int,
        recovery_timeout_s: float = 30.0,
        tracer: Any = None,
    ) -> None:
        self.tracer = tracer
        self.table = table
        self.pool = pool
        self.num_experts = num_experts
        self.recovery_timeout_s = recovery_timeout_s
        self.stats = DispatchStats()
        self.dead: set[str] = set()
        self._lock = threading.Lock()  # one layer call at a time; tables swap between calls
        self._pending: RoutingTable | None = None
        self.on_failure: Any = None
        """Called as on_failure(node, reason) when a shard call fails (the supervisor listens)."""
        self.observers: list[DispatchObserver] = []
        """Told of every reply and every step (`DispatchObserver`)."""

    def swap_table(self, table: RoutingTable) -> None:
        """Make `table` current between two layer calls. A call that is waiting for a lost
        shard adopts it at once (the supervisor re-placed that shard's experts), so this
        returns when the new table is in use."""
        self._pending = table
        with self._lock:
            self._adopt()

    def _adopt(self) -> bool:
        table, self._pending = self._pending, None
        if table is None:
            return False
        self.table = table
        self.dead &= set(table.nodes)
        return True

    def run(
        self, layer: int, xs: np.ndarray, experts: np.ndarray, counts: Sequence[int]
    ) -> np.ndarray:
        """Rows `xs` sorted by expert (`experts[i]` is row i's expert) -> unweighted outputs."""
        if self.tracer is None:
            return self._run(layer, xs, experts, counts, None)
        from opentelemetry import propagate

        with self.tracer.start_as_current_span(
            "expertmesh.dispatch",
            attributes={"expertmesh.layer": layer, "expertmesh.rows": len(xs)},
        ):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # each shard's span continues this trace
            return self._run(layer, xs, experts, counts, carrier)

    def _run(
        self,
        layer: int,
        xs: np.ndarray,
        experts: np.ndarray,
        counts: Sequence[int],
        trace: dict[str, str] | None,
    ) -> np.ndarray:
        with self._lock:
            self._adopt()
            t0 = time.perf_counter()
            out = np.empty((xs.shape[0], xs.shape[1]), dtype=np.float32)
            pending = self._split(layer, counts)  # node -> row indices
            attempts = 0
            while pending:
                attempts += 1
                submitted = time.perf_counter()
                handles = {
                    node: self.pool.submit(node, layer, xs[rows], experts[rows], trace)
                    for node, rows in pending.items()
                }
                failed: dict[str, np.ndarray] = {}
                slowest: tuple[float, float, float] = (0.0, 0.0, 0.0)  # total, compute, link
                as_completed = getattr(self.pool, "as_completed", None)
                order = as_completed(handles) if as_completed is not None else iter(handles)
                for node in order:  # replies as they come: each round trip is its own
                    rows, handle = pending[node], handles[node]
                    try:
                        reply = self.pool.result(handle)
                    except ShardLost as e:
                        self.dead.add(node)
                        failed[node] = rows
                        if self.on_failure is not None:
                            self.on_failure(node, str(e))
                        continue
                    answered = time.perf_counter()
                    out[rows] = reply.outputs
                    st = self.stats
                    st.calls += 1
                    st.compute_s += reply.compute_s
                    st.emulated_compute_s += reply.emulated_compute_s
                    st.emulated_link_s += reply.emulated_link_s
                    nbytes = 2 * len(rows) * xs.shape[1] * xs.itemsize  # rows out and back
                    st.bytes_sent += nbytes
                    st.bytes_by_node[node] = st.bytes_by_node.get(node, 0) + nbytes
                    work = reply.compute_s + reply.emulated_compute_s
                    for observer in self.observers:
                        observer.on_reply(
                            node, layer, len(rows), nbytes, answered - submitted, work
                        )
                    if work + reply.emulated_link_s > slowest[0]:
                        slowest = (work + reply.emulated_link_s, work, reply.emulated_link_s)
                self.stats.slowest_compute_s += slowest[1]
                self.stats.slowest_link_s += slowest[2]
                if failed and attempts > 8:
                    raise ShardLost(next(iter(failed)), "shards keep failing on retry")
                pending = self._reassign(layer, failed, experts, attempts)
            self.stats.wall_s += time.perf_counter() - t0
            self.stats.steps += 1
            step_counts = np.asarray(counts)
            self.stats.record_tokens(layer, step_counts)
            for observer in self.observers:
                observer.on_step(layer, step_counts)
            return out

    def _split(self, layer: int, counts: Sequence[int]) -> dict[str, np.ndarray]:
        """Row indices per node: each expert's contiguous rows cut by replica share."""
        per_node: dict[str, list[np.ndarray]] = {}
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            replicas = [
                (node, s) for node, s in self.table.replicas(layer, e) if node not in self.dead
            ]
            if not replicas:  # every replica is down: use the first and let recovery handle it
                replicas = [self.table.replicas(layer, e)[0]]
            total = sum(s for _, s in replicas)
            cut = start
            for i, (node, share) in enumerate(replicas):
                end = start + n if i == len(replicas) - 1 else cut + round(n * share / total)
                if end > cut:
                    per_node.setdefault(node, []).append(np.arange(cut, end))
                cut = end
            start += n
        return {node: np.concatenate(parts) for node, parts in per_node.items()}

    def _reassign(
        self, layer: int, failed: dict[str, np.ndarray], experts: np.ndarray, attempts: int
    ) -> dict[str, np.ndarray]:
        """Rows of failed nodes -> live replicas of the same experts, or recover the node."""
        if not failed:
            return {}
        out: dict[str, list[np.ndarray]] = {}
        for node, rows in failed.items():
            for row in rows:
                e = int(experts[row])
                live = [n for n, _ in self.table.replicas(layer, e) if n not in self.dead]
                if not live:
                    self._recover(node, layer, e)
                    live = [n for n, _ in self.table.replicas(layer, e) if n not in self.dead]
                else:
                    self.stats.failovers += 1
                out.setdefault(live[row % len(live)], []).append(np.array([row]))
        return {node: np.concatenate(parts) for node, parts in out.items()}

    def _recover(self, node: str, layer: int, expert: int) -> None:
        """Wait until (layer, expert) has a live replica: the shard on `node` restarted and
        reloaded, or a new table (the supervisor re-placed the experts of a lost node) gives
        it one. ShardLost after `recovery_timeout_s`: the step fails, nothing is skipped."""
        deadline = time.monotonic() + self.recovery_timeout_s
        while True:
            if self._adopt() and any(
                n not in self.dead for n, _ in self.table.replicas(layer, expert)
            ):
                return
            if node in self.table.nodes:
                experts = self.table.node_experts().get(node, {})
                try:
                    self.pool.recover(node, experts, min(0.5, self.recovery_timeout_s))
                except ShardLost:
                    if time.monotonic() >= deadline:
                        raise ShardLost(
                            node,
                            f"no live replica and not back after {self.recovery_timeout_s:.0f} s",
                        ) from None
                    continue
                self.dead.discard(node)
                self.stats.recoveries += 1
                return
            if time.monotonic() >= deadline:
                raise ShardLost(node, "its experts were not re-placed in time")
            time.sleep(0.02)


class RemoteExpertBank(nn.Module):
    """Drop-in for `ExpertBank` that runs the experts on shards through a `Dispatcher`."""

    def __init__(self, layer: int, num_experts: int, dispatcher: Dispatcher) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        xs = x[token].float().numpy()
        outputs = self.dispatcher.run(self.layer, xs, flat[order].numpy(), counts)
        out = torch.from_numpy(outputs).to(x.dtype)
        result = torch.zeros_like(x)
        result.index_add_(0, token, out * weights.reshape(-1)[order, None])
        return result
