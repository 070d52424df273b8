"""The attention node's own experts, computed in the attention worker's process.

A plan that keeps experts on the attention node should not pay a round trip for them: the
rows are already in this process. `ColocatedPool` holds that node's shard as a plain
`ExpertShard` here, and every other node's through the remote pool (`RayShardPool`). Its
transport sends the remote nodes' requests first, then computes the local node's rows while
those are in flight (compute here overlaps compute and link time there), then reads the
remote replies: a layer costs max(local experts + the attention side's work per remote call,
the slowest remote node), which is what the planner's cost model says
(`cluster/placement_model.py`, `colocated` nodes).

The local shard shares the attention worker's fate: it cannot be lost alone (when this
process dies, the replica is gone with it), so it has no standby and `kill` refuses it;
rebalancing and failover load and drop its experts like any shard's.

Not for a shared expert pool (`cluster/expert_pool.py`): experts held inside one API replica
would be held again by every other replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmesh.models.errors import ExpertNotLoaded

from .dispatch import PoolTransport, ShardLost, Transport
from .shard import ExpertShard, ShardReply
from .wire import ShardRequest


def local_shard(
    node: str, checkpoint: str, experts: Mapping[int, Sequence[int]], dtype: str, device: str
) -> ExpertShard:
    """An in-process shard that computes with this process's torch threads (an ExpertShard
    sets its own thread count, which here is the attention worker's)."""
    return ExpertShard(
        node,
        checkpoint,
        {int(k): list(v) for k, v in experts.items()},
        dtype,
        torch_threads=torch.get_num_threads(),
        device=device,
    )


@dataclass
class ColocatedSent:
    """Requests in flight: the remote transport's, and the local node's request held back."""

    remote: Any
    local: ShardRequest | None
    trace: dict[str, str] | None
    request_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes per node that crossed a link (none for the local node)."""
    sent_at: dict[str, float] = field(default_factory=dict)
    """When each remote node's request left (the local node's computes in `replies`)."""


class ColocatedTransport:
    """A `Transport`: remote requests through `inner`, the local node's computed here."""

    def __init__(self, inner: Transport, node: str, shard: ExpertShard) -> None:
        self.inner = inner
        self.node = node
        self.shard = shard
        self.name = f"colocated+{getattr(inner, 'name', 'remote')}"
        self.local_s = 0.0
        """Seconds spent computing local rows (all calls)."""
        self.local_nodes = (node,)
        """Nodes whose rows cross no link (the dispatcher counts no link bytes for them)."""

    def local_bank(self, node: str | None, layer: int) -> Any:
        """The in-process bank of `layer` when `node` is the local one and the bank holds
        every expert of the layer (the dispatcher then runs the layer here, whole)."""
        if node != self.node:
            return None
        bank = self.shard.banks.get(layer)
        if bank is None or not bank.complete:
            return None
        return bank

    def send(
        self, requests: Mapping[str, ShardRequest], trace: dict[str, str] | None = None
    ) -> ColocatedSent:
        remote = {n: r for n, r in requests.items() if n != self.node}
        sent = ColocatedSent(self.inner.send(remote, trace), requests.get(self.node), trace)
        sent.request_bytes = dict(getattr(sent.remote, "request_bytes", {}))
        sent.sent_at = getattr(sent.remote, "sent_at", {})
        return sent

    def replies(self, sent: ColocatedSent) -> Iterator[tuple[str, ShardReply | ShardLost]]:
        if sent.local is not None:
            t0 = time.perf_counter()
            try:
                reply: ShardReply | ShardLost = self.shard.compute_request(sent.local, sent.trace)
            except ExpertNotLoaded as e:  # routed an expert a rebalance has not loaded yet
                reply = ShardLost(self.node, f"it lacks experts it is routed: {e}")
            self.local_s += time.perf_counter() - t0
            yield self.node, reply
        yield from self.inner.replies(sent.remote)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class ColocatedPool:
    """A `ShardPool`: node `node`'s shard in this process, the others in `remote`."""

    def __init__(self, remote: Any, node: str, shard: ExpertShard) -> None:
        self.remote = remote
        self.node = node
        self.shard = shard

    # Anything not about the local node (handles, standbys, promotions, ...) is the remote
    # pool's: the channel transport reaches remote shards through `handles`.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.remote, name)

    @property
    def local_nodes(self) -> tuple[str, ...]:
        return (self.node,)

    def default_transport(self) -> ColocatedTransport:
        default = getattr(self.remote, "default_transport", None)
        inner = default() if default is not None else PoolTransport(self.remote)
        return ColocatedTransport(inner, self.node, self.shard)

    def submit(
        self, node: str, layer: int, x: Any, expert_ids: Any, trace: dict[str, str] | None = None
    ) -> Any:
        if node == self.node:
            return ("local", self.shard.compute(layer, x, expert_ids, trace))
        return self.remote.submit(node, layer, x, expert_ids, trace)

    def submit_request(
        self, node: str, request: ShardRequest, trace: dict[str, str] | None = None
    ) -> Any:
        if node == self.node:
            return ("local", request, trace)
        return self.remote.submit_request(node, request, trace)

    def result(self, handle: Any) -> ShardReply:
        if isinstance(handle, tuple) and handle and handle[0] == "local":
            if len(handle) == 2:
                return handle[1]  # type: ignore[no-any-return]
            try:
                return self.shard.compute_request(handle[1], handle[2])
            except ExpertNotLoaded as e:
                raise ShardLost(self.node, f"it lacks experts it is routed: {e}") from e
        return self.remote.result(handle)  # type: ignore[no-any-return]

    def as_completed(self, handles: Mapping[str, Any]) -> Iterator[str]:
        local = [n for n in handles if n == self.node]
        remote = {n: h for n, h in handles.items() if n != self.node}
        yield from local
        order = getattr(self.remote, "as_completed", None)
        yield from (order(remote) if order is not None else iter(remote))

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        if node == self.node:
            self.shard.ensure(experts)
            return
        self.remote.recover(node, experts, timeout_s)

    def add_node(self, node: str, timeout_s: float) -> None:
        if node != self.node:
            self.remote.add_node(node, timeout_s)

    def _split(
        self, per_node: Mapping[str, Mapping[int, Sequence[int]]]
    ) -> tuple[Mapping[int, Sequence[int]], dict[str, Mapping[int, Sequence[int]]]]:
        return per_node.get(self.node, {}), {n: v for n, v in per_node.items() if n != self.node}

    def load_many(self, adds: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        local, remote = self._split(adds)
        if remote:
            self.remote.load_many(remote)
        for layer, ids in local.items():
            self.shard.load(layer, ids)

    def drop_many(self, drops: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        local, remote = self._split(drops)
        if remote:
            self.remote.drop_many(remote)
        for layer, ids in local.items():
            self.shard.drop(layer, ids)

    def kill(self, node: str, no_restart: bool = False) -> None:
        if node == self.node:
            raise ValueError(
                f"node {node!r}: its experts run in the attention worker's process and cannot "
                "be killed alone; kill a remote node's shard, or launch with colocate=False"
            )
        self.remote.kill(node, no_restart=no_restart)

    def statuses(self) -> dict[str, Any]:
        remote = getattr(self.remote, "statuses", None)
        return {**(remote() if remote is not None else {}), self.node: self.shard.status()}

    def call_all(self, method: str, *args: Any) -> dict[str, Any]:
        return {
            **self.remote.call_all(method, *args),
            self.node: getattr(self.shard, method)(*args),
        }
