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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from expertmesh.models.device import HostStaging
from expertmesh.models.errors import ExpertNotLoaded

from .shard import ExpertShard, ShardReply
from .wire import Packed, ShardRequest, check_wire, pack, unpack, wire_for


class ShardLost(RuntimeError):
    """A shard did not answer (its actor or node died)."""

    def __init__(self, node: str, reason: str = "") -> None:
        super().__init__(f"expert shard on node '{node}' is lost{': ' + reason if reason else ''}")
        self.node = node


Replica = tuple[str, float]  # (node, share of the expert's tokens)


def routes_from_placement(placement: Any) -> dict[tuple[int, int], list[Replica]]:
    """Placement.replicas ({(layer, expert): [ReplicaAssignment(node, share)]}) -> routes."""
    return {
        (int(layer), int(expert)): [(r.node, float(r.share)) for r in replicas]
        for (layer, expert), replicas in placement.replicas.items()
    }


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
        self._layer_nodes: dict[int, frozenset[str]] = {}
        for (layer, _), replicas in self.routes.items():
            self._layer_nodes[layer] = self._layer_nodes.get(layer, frozenset()) | {
                n for n, _ in replicas
            }

    def layer_nodes(self, layer: int) -> frozenset[str]:
        """The nodes holding any expert of `layer`."""
        return self._layer_nodes.get(layer, frozenset())

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

    def submit_request(
        self, node: str, request: ShardRequest, trace: dict[str, str] | None = None
    ) -> Any:
        """Start one compact-wire call (`cluster/wire.py`); read it with `result`."""
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

    def submit_request(
        self, node: str, request: ShardRequest, trace: dict[str, str] | None = None
    ) -> Any:
        """Start one compact-wire call (`cluster/wire.py`)."""
        return (node, request, trace)

    def result(self, handle: Any) -> ShardReply:
        if len(handle) == 3:
            node, request, trace = handle
            if node in self.dead:
                raise ShardLost(node, "marked dead")
            try:
                return self.shards[node].compute_request(request, trace)
            except ExpertNotLoaded as e:
                raise ShardLost(node, f"it lacks experts it is routed: {e}") from e
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
    """Layer calls (one per MoE layer per forward pass, per micro-batch when overlapping)."""
    exchanges: int = 0
    """Sends (a layer call plus each retry after a lost shard)."""
    wait_s: float = 0.0
    """Time the attention worker was blocked waiting for replies: link and expert time it
    did not hide behind other work."""
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
        """One shard call answered: `round_trip_s` measured here from submit to the reply's
        arrival (`ShardReply.arrived_at`; its reading on a transport without), `busy_s` the
        time the shard spent computing (its own figure, emulated slowdown included); the
        difference is the time on the wire and in the transport."""

    def on_step(self, layer: int, counts: np.ndarray) -> None:
        """One layer call done: token assignments per expert this step."""


class Transport(Protocol):
    """How a layer call's requests reach the shards and the replies come back.

    `PoolTransport` (`cluster/transport.py`): one call per node through the `ShardPool` (a
    Ray actor task each on a Ray pool: the fallback). `ChannelTransport`: persistent TCP
    channels to the shards' actors, no Ray task per layer (the default on a Ray pool)."""

    name: str

    def send(
        self, requests: Mapping[str, ShardRequest], trace: dict[str, str] | None = None
    ) -> Any:
        """Start every node's request; returns a handle for `replies`."""
        ...

    def replies(self, sent: Any) -> Iterator[tuple[str, ShardReply | ShardLost]]:
        """(node, reply or ShardLost) for every node of `sent`, in the order they arrive.
        Handles are read in the order they were sent."""
        ...


@dataclass
class LayerCall:
    """One layer call in flight (`Dispatcher.start` -> `Dispatcher.finish`)."""

    layer: int
    x: torch.Tensor
    """(N, hidden) the token rows."""
    token: np.ndarray
    """(A,) the token row of each assignment (assignments sorted by expert)."""
    experts: np.ndarray
    """(A,) each assignment's expert."""
    counts: list[int]
    trace: dict[str, str] | None
    pending: dict[str, np.ndarray]
    """node -> the assignments sent to it."""
    sent: Any
    sent_at: float
    started_at: float
    wire: str
    in_dispatch_s: float = 0.0
    span: Any = None
    """The call's `expertmesh.dispatch` span (ended by `finish`), when tracing."""


@dataclass
class Sent:
    """Requests in flight, for `replies`."""

    handles: dict[str, Any] = field(default_factory=dict)
    request_bytes: dict[str, int] = field(default_factory=dict)
    lost: dict[str, ShardLost] = field(default_factory=dict)
    """Nodes whose request could not even be sent."""
    sent_at: dict[str, float] = field(default_factory=dict)
    """`time.perf_counter()` when each node's request left (a round trip starts there, not
    when the last node's did)."""


class PoolTransport:
    """One call per node through the `ShardPool` (Ray actor tasks on a Ray pool)."""

    name = "actor-call"

    def __init__(self, pool: ShardPool) -> None:
        self.pool = pool

    def send(
        self, requests: Mapping[str, ShardRequest], trace: dict[str, str] | None = None
    ) -> Sent:
        sent = Sent()
        for node, request in requests.items():
            sent.request_bytes[node] = request.nbytes
            try:
                sent.handles[node] = self.pool.submit_request(node, request, trace)
            except ShardLost as e:
                sent.lost[node] = e
            sent.sent_at[node] = time.perf_counter()
        return sent

    def replies(self, sent: Sent) -> Iterator[tuple[str, ShardReply | ShardLost]]:
        yield from sent.lost.items()
        as_completed = getattr(self.pool, "as_completed", None)
        order = as_completed(sent.handles) if as_completed is not None else iter(sent.handles)
        for node in order:
            try:
                yield node, self.pool.result(sent.handles[node])
            except ShardLost as e:
                yield node, e


class Dispatcher:
    """Sends one layer's expert work to the shards and gathers the results.

    `run` does one layer call start to finish. `start` / `finish` split it, so the caller
    can work (another micro-batch's attention) while the shards compute and the bytes cross
    the links (`cluster/overlap.py`). Calls finish in the order they started."""

    def __init__(
        self,
        table: RoutingTable,
        pool: ShardPool,
        num_experts: int,
        recovery_timeout_s: float = 30.0,
        tracer: Any = None,
        transport: Transport | None = None,
        wire: str = "auto",
    ) -> None:
        self.tracer = tracer
        self.table = table
        self.num_experts = num_experts
        self.recovery_timeout_s = recovery_timeout_s
        self._given_transport = transport
        self.pool = pool  # sets self.transport
        self.wire = check_wire(wire)
        """Wire format of activations (`cluster/wire.py`); 'auto': bf16 for a bf16 model,
        fp32 otherwise (both exact)."""
        self.stats = DispatchStats()
        self.dead: set[str] = set()
        self._cond = threading.Condition()  # guards in-flight calls and table swaps
        self._inflight = 0
        self._pending: RoutingTable | None = None
        self.on_failure: Any = None
        """Called as on_failure(node, reason) when a shard call fails (the supervisor listens)."""
        self.observers: list[DispatchObserver] = []
        """Told of every reply and every step (`DispatchObserver`)."""

    @property
    def pool(self) -> ShardPool:
        return self._pool

    @pool.setter
    def pool(self, pool: ShardPool) -> None:
        """A new pool brings its own default transport, unless one was given."""
        self._pool = pool
        transport = self._given_transport
        if transport is None:
            default = getattr(pool, "default_transport", None)
            if default is not None:
                transport = default()
            else:
                transport = PoolTransport(pool)
        self.transport: Transport = transport

    def swap_table(self, table: RoutingTable) -> None:
        """Make `table` current between layer calls: once no call is in flight (a shard never
        gets a request for an expert the rebalancer dropped after the swap). A call that is
        waiting for a lost shard adopts it at once (the supervisor re-placed that shard's
        experts), so this returns when the new table is in use."""
        with self._cond:
            self._pending = table
            self._cond.wait_for(lambda: self._pending is not table or self._inflight == 0)
            if self._pending is table:
                self._adopt()

    def _adopt(self) -> bool:
        """Take the pending table, if any (call with `_cond` held)."""
        table, self._pending = self._pending, None
        if table is None:
            return False
        self.table = table
        self.dead &= set(table.nodes)
        self._cond.notify_all()
        return True

    # ----------------------------------------------------------------- one layer call

    def run(
        self, layer: int, xs: np.ndarray, experts: np.ndarray, counts: Sequence[int]
    ) -> np.ndarray:
        """Rows `xs` sorted by expert (`experts[i]` is row i's expert) -> unweighted outputs."""
        x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
        token = np.arange(len(xs))
        return self.finish(self.start(layer, x, token, experts, counts)).numpy()

    def start(
        self,
        layer: int,
        x: torch.Tensor,
        token: np.ndarray,
        experts: np.ndarray,
        counts: Sequence[int],
    ) -> LayerCall:
        """Send one layer's work: assignment i (sorted by expert) is token row `token[i]` of
        `x` (N, hidden) through expert `experts[i]`; `counts[e]` assignments per expert."""
        t0 = time.perf_counter()
        span, trace = self._trace_context(layer, len(token))
        with self._cond:
            if self._inflight == 0:
                self._adopt()
            self._inflight += 1
        try:
            wire = wire_for(self.wire, x.dtype)
            pending = self._split(layer, counts)
            call = LayerCall(
                layer, x, token, experts, list(counts), trace, pending, None, 0.0, t0, wire
            )
            call.span = span
            self._send(call)
        except BaseException:
            self._done()
            if span is not None:
                span.end()
            raise
        call.in_dispatch_s = time.perf_counter() - t0
        return call

    def run_local(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor | None:
        """The whole layer in this process, when the table routes all of it to a node whose
        experts live here (`cluster/colocated.py`) and that bank holds them: the model's own
        expert code on the same weights (the single-process arithmetic), with no request
        built, packed or read back. None: the layer goes through `start` / `finish`."""
        bank_of = getattr(self.transport, "local_bank", None)
        if bank_of is None:
            return None
        with self._cond:
            if self._inflight == 0:
                self._adopt()
            nodes = self.table.layer_nodes(layer)
            node = next(iter(nodes)) if len(nodes) == 1 else None
            bank = bank_of(node, layer) if node is not None and node not in self.dead else None
            if bank is None or node is None or bank.gate_up.device != x.device:
                return None
            self._inflight += 1
        try:
            t0 = time.perf_counter()
            try:
                out: torch.Tensor = bank(x, ids, weights)
            except ExpertNotLoaded:  # not loaded yet after a swap: the general path
                return None
            spent = time.perf_counter() - t0
        finally:
            self._done()
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).cpu().numpy()
        st = self.stats
        st.steps += 1
        st.calls += 1
        st.compute_s += spent
        st.wall_s += spent
        st.record_tokens(layer, counts)
        for observer in self.observers:
            observer.on_reply(node, layer, int(ids.numel()), 0, spent, spent)
            observer.on_step(layer, counts)
        return out

    def finish(self, call: LayerCall) -> torch.Tensor:
        """Wait for `call`'s replies (retrying lost shards' rows elsewhere): the unweighted
        outputs (A, hidden) in assignment order, in `x`'s dtype."""
        try:
            t0 = time.perf_counter()
            out = self._gather(call)
        finally:
            self._done()
            if call.span is not None:
                call.span.end()
        st = self.stats
        st.wall_s += call.in_dispatch_s + time.perf_counter() - t0
        st.steps += 1
        st.record_tokens(call.layer, np.asarray(call.counts))
        step_counts = np.asarray(call.counts)
        for observer in self.observers:
            observer.on_step(call.layer, step_counts)
        return out

    def _done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _trace_context(self, layer: int, rows: int) -> tuple[Any, dict[str, str] | None]:
        """The call's span (open until `finish`) and its W3C context for the shards' spans."""
        if self.tracer is None:
            return None, None
        from opentelemetry import propagate
        from opentelemetry import trace as otel_trace

        span = self.tracer.start_span(
            "expertmesh.dispatch",
            attributes={"expertmesh.layer": layer, "expertmesh.rows": rows},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=otel_trace.set_span_in_context(span))
        return span, carrier

    def _send(self, call: LayerCall) -> None:
        requests = {
            node: self._request(call, idx) for node, idx in call.pending.items() if len(idx)
        }
        call.sent = self.transport.send(requests, call.trace)
        call.sent_at = time.perf_counter()
        self.stats.exchanges += 1

    def _request(self, call: LayerCall, idx: np.ndarray) -> ShardRequest:
        """A node's assignments `idx` -> its request: each distinct token row once."""
        tokens = call.token[idx]
        needed = np.zeros(call.x.shape[0], dtype=bool)  # np.unique, without its sort
        needed[tokens] = True
        rows = np.flatnonzero(needed)
        row_of = (np.cumsum(needed) - 1)[tokens]
        packed = pack(call.x[torch.from_numpy(rows)], call.wire)
        return ShardRequest(
            call.layer,
            packed,
            row_of.astype(np.int32),
            call.experts[idx].astype(np.int32),
        )

    def _gather(self, call: LayerCall) -> torch.Tensor:
        layer, x = call.layer, call.x
        out = torch.empty((len(call.token), x.shape[1]), dtype=x.dtype)
        attempts = 0
        st = self.stats
        while True:
            attempts += 1
            failed: dict[str, np.ndarray] = {}
            slowest = (0.0, 0.0, 0.0)  # total, compute, link
            waited = time.perf_counter()
            local0 = getattr(self.transport, "local_s", 0.0)  # experts computed here
            for node, got in self.transport.replies(call.sent):
                idx = call.pending[node]
                if isinstance(got, ShardLost):
                    self.dead.add(node)
                    failed[node] = idx
                    if self.on_failure is not None:
                        self.on_failure(node, str(got))
                    continue
                answered = got.arrived_at or time.perf_counter()  # arrival, not reading
                outputs = got.outputs
                if isinstance(outputs, Packed):
                    out[torch.from_numpy(idx)] = unpack(outputs, x.dtype)
                    local = node in getattr(self.transport, "local_nodes", ())
                    nbytes = 0 if local else self._sent_bytes(call, node) + outputs.nbytes
                else:
                    out[torch.from_numpy(idx)] = torch.from_numpy(np.asarray(outputs)).to(x.dtype)
                    nbytes = 2 * len(idx) * x.shape[1] * 4
                st.calls += 1
                st.compute_s += got.compute_s
                st.emulated_compute_s += got.emulated_compute_s
                st.emulated_link_s += got.emulated_link_s
                st.bytes_sent += nbytes
                st.bytes_by_node[node] = st.bytes_by_node.get(node, 0) + nbytes
                work = got.compute_s + got.emulated_compute_s
                for observer in self.observers:
                    left = getattr(call.sent, "sent_at", {}).get(node, call.sent_at)
                    observer.on_reply(node, layer, len(idx), nbytes, answered - left, work)
                if work + got.emulated_link_s > slowest[0]:
                    slowest = (work + got.emulated_link_s, work, got.emulated_link_s)
            # Waiting is for remote shards: this process's own experts are compute, not wait.
            st.wait_s += (
                time.perf_counter() - waited - (getattr(self.transport, "local_s", 0.0) - local0)
            )
            st.slowest_compute_s += slowest[1]
            st.slowest_link_s += slowest[2]
            if not failed:
                return out
            if attempts > 8:
                raise ShardLost(next(iter(failed)), "shards keep failing on retry")
            call.pending = self._reassign(layer, failed, call.experts, attempts)
            self._send(call)

    def _sent_bytes(self, call: LayerCall, node: str) -> int:
        sizes = getattr(call.sent, "request_bytes", None)
        return int(sizes.get(node, 0)) if sizes is not None else 0

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
            with self._cond:  # the lock _adopt needs (its waiters are told)
                adopted = self._adopt()
            if adopted and any(n not in self.dead for n, _ in self.table.replicas(layer, expert)):
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

    def __init__(
        self,
        layer: int,
        num_experts: int,
        dispatcher: Dispatcher,
        staging: HostStaging | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.dispatcher = dispatcher
        self.staging = staging or HostStaging()
        """Pinned buffers a GPU attention worker's rows cross to the host in, once per layer
        call each way (CPU rows pass through untouched)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x, ids, weights))

    def start(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> RemoteMoE:
        """Route and send: x (N, hidden), ids/weights (N, k) from the router (or, when the
        whole layer's experts live in this process, compute it here: `Dispatcher.run_local`)."""
        done = self.dispatcher.run_local(self.layer, x, ids, weights)
        if done is not None:
            return RemoteMoE(None, x, None, None, done)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the N*k assignments by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        host = self.staging.to_host(x)  # x itself on the CPU
        call = self.dispatcher.start(
            self.layer, host, token.cpu().numpy(), flat[order].cpu().numpy(), counts
        )
        return RemoteMoE(call, x, token, weights.reshape(-1)[order, None])

    def finish(self, sent: RemoteMoE) -> torch.Tensor:
        """Wait for the outputs and combine them with the router weights, here (the same
        arithmetic, in the same order, as `ExpertBank.forward`)."""
        if sent.done is not None:
            return sent.done
        assert sent.call is not None and sent.token is not None and sent.weights is not None
        try:
            out = self.dispatcher.finish(sent.call)
        finally:
            self.staging.release(sent.call.x)
        out = self.staging.to_device(out, sent.x.device)  # out itself on the CPU
        result = torch.zeros_like(sent.x)
        result.index_add_(0, sent.token, out * sent.weights)
        return result


@dataclass
class RemoteMoE:
    """A MoE layer's expert work sent and not yet combined."""

    call: LayerCall | None
    x: torch.Tensor
    token: torch.Tensor | None
    weights: torch.Tensor | None
    done: torch.Tensor | None = None
    """The combined output, when the layer was computed in this process (`run_local`)."""
