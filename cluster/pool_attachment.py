"""A replica's side of a shared expert pool (`cluster/expert_pool.py`): attach by name, dispatch
to the pool's shards, follow the controller's table versions between steps.

    ep = attach_pool("demo", "ckpt/", topology)     # an AttachedModel (an ExpertParallelModel)
    Generator(ep.model, tokenizer).generate(["Hello"])
    ep.shutdown()                                   # detaches; the pool keeps serving

`PoolShards` is the replica's `ShardPool`: the pool's shard handles, its channel secret, and
`recover` through the controller (this replica never starts, loads, drops or kills a shard).
`PoolAttachment` long-polls the controller on a thread and applies a new version:

- new shard handles (a promoted standby): at once (the channel transport reopens to them);
- a new table: between two forward passes (a `forward_pre_hook` / `forward_hook` on the
  model), or at once when no pass is running, so no step mixes two versions; then it tells
  the controller, which drops experts or stops a drained shard only after every replica has;
- except when a step waits on a lost node whose experts the controller re-placed: that step
  takes the new table at once (`stats.urgent_mixed_steps`), as the single-replica supervisor's
  failover does; outputs are unchanged since every replica of an expert holds the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expertmesh.models.errors import ExpertNotLoaded

from .detect import DispatchDetectors
from .dispatch import Dispatcher, RoutingTable, ShardLost
from .expert_pool import PoolError, PoolSnapshot, PoolSpec, controller_actor
from .pool_detect import ForwardedEvents
from .runtime import ExpertParallelModel, attach_dispatcher, attention_model
from .shard import ShardReply
from .wire import ShardRequest

log = logging.getLogger("expertmesh.pool_attachment")


def _nodes(routes: Mapping[tuple[int, int], Any]) -> set[str]:
    return {node for replicas in routes.values() for node, _ in replicas}


class PoolShards:
    """The `ShardPool` of one attached replica: the pool's shards, reached directly."""

    def __init__(self, controller: Any, snapshot: PoolSnapshot, receive: Any = None) -> None:
        import ray

        self._ray = ray
        self.controller = controller
        self.handles: dict[str, Any] = dict(snapshot.shards)
        """node -> the serving shard's actor handle (read per call by the transport)."""
        self.generations: dict[str, int] = dict(snapshot.generations)
        self.secret = snapshot.secret
        self.spin_us = snapshot.spin_us
        self.receive = receive
        """Called as receive(snapshot, urgent=True) with what `recover` learnt."""

    def update(self, snapshot: PoolSnapshot) -> list[str]:
        """Take the snapshot's shard handles; the nodes whose shard was replaced."""
        replaced = [n for n, g in snapshot.generations.items() if self.generations.get(n) != g]
        self.handles.update(snapshot.shards)
        self.generations.update(snapshot.generations)
        return replaced

    def default_transport(self) -> Any:
        """Channels to the shards, opened with the pool's secret (one listener per shard
        serves every replica)."""
        from .transport import ChannelTransport

        transport = ChannelTransport(self, spin_us=self.spin_us)
        transport.secret = self.secret
        return transport

    def submit(
        self, node: str, layer: int, x: Any, expert_ids: Any, trace: dict[str, str] | None = None
    ) -> Any:
        return (node, self._handle(node).compute.remote(layer, x, expert_ids, trace))

    def submit_request(
        self, node: str, request: ShardRequest, trace: dict[str, str] | None = None
    ) -> Any:
        return (node, self._handle(node).compute_request.remote(request, trace))

    def _handle(self, node: str) -> Any:
        handle = self.handles.get(node)
        if handle is None:
            raise ShardLost(node, "the pool has no shard for it")
        return handle

    def as_completed(self, handles: Mapping[str, Any]) -> Iterator[str]:
        node_of = {handle[1]: node for node, handle in handles.items()}
        remaining = list(node_of)
        while remaining:
            ready, remaining = self._ray.wait(remaining, num_returns=1)
            yield node_of[ready[0]]

    def result(self, handle: Any) -> ShardReply:
        ray = self._ray
        node, ref = handle
        try:
            return ray.get(ref)  # type: ignore[no-any-return]
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise ShardLost(node, type(e).__name__) from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e, ExpertNotLoaded) or isinstance(e.cause, ExpertNotLoaded):
                raise ShardLost(node, f"it lacks experts it is routed: {e.cause}") from e
            raise

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        """Ask the controller to bring `node`'s shard back (it promotes the standby once, for
        every replica) and take what it returns; ShardLost while the node's rows have nowhere
        to go yet, or when the node was re-placed (the dispatcher then adopts the new table)."""
        ray = self._ray
        generation = self.generations.get(node, 0)
        try:
            snapshot = ray.get(
                self.controller.recover.remote(node, generation, timeout_s), timeout=timeout_s + 30
            )
        except ray.exceptions.RayTaskError as e:
            raise ShardLost(node, f"not back yet ({type(e.cause).__name__})") from e
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError,
        ) as e:
            raise ShardLost(node, f"the pool controller did not answer ({type(e).__name__})") from e
        if self.receive is not None:
            self.receive(snapshot, urgent=True)
        else:
            self.update(snapshot)
        if node not in _nodes(snapshot.routes):
            raise ShardLost(node, "re-placed by the pool controller; adopting its table")


@dataclass
class AttachmentStats:
    steps: int = 0
    """Forward passes run."""
    swaps: int = 0
    """Tables adopted between steps."""
    urgent_swaps: int = 0
    """Tables adopted by a step waiting on a lost node."""
    mixed_steps: int = 0
    """Steps whose layers saw two tables without a lost node to explain it (must stay 0)."""
    urgent_mixed_steps: int = 0
    versions: list[int] = field(default_factory=list)
    """Every version this replica took, in order (tables and shard handles alike)."""


class PoolAttachment:
    """Keeps one replica's dispatcher on the pool's current version (module docstring)."""

    def __init__(
        self,
        controller: Any,
        replica: str,
        ep: ExpertParallelModel,
        shards: PoolShards,
        snapshot: PoolSnapshot,
        poll_timeout_s: float = 2.0,
    ) -> None:
        import ray

        self._ray = ray
        self.controller = controller
        self.replica = replica
        self.ep = ep
        self.dispatcher: Dispatcher = ep.dispatcher
        self.shards = shards
        shards.receive = self.receive
        self.version = snapshot.version
        """The version this replica's table and shards are at."""
        self.seen = snapshot.version
        self.stats = AttachmentStats(versions=[snapshot.version])
        self.poll_timeout_s = poll_timeout_s
        self._routes = snapshot.routes
        self._next: PoolSnapshot | None = None
        self._in_step = False
        self._step_table: RoutingTable | None = None
        self._step_mixed = False
        self._step_urgent = False
        self._lock = threading.Lock()
        self._load: dict[int, np.ndarray] = {}
        self._load_lock = threading.Lock()
        self._closed = threading.Event()
        self.dispatcher.observers.append(self)
        self.dispatcher.on_failure = self._on_failure
        self.detectors = DispatchDetectors(ForwardedEvents(controller, replica))
        """Link and node-slowness detectors on this replica's replies; their events go to the
        controller, which makes one incident of what several replicas see (`pool_detect.py`)."""
        self.dispatcher.observers.append(self.detectors)
        self.out_of_service: tuple[str, ...] = snapshot.out_of_service
        """Nodes the controller took out of service, as of the last version seen."""
        self._hooks = [
            ep.model.register_forward_pre_hook(self._before_step),
            ep.model.register_forward_hook(self._after_step),
        ]
        self._thread = threading.Thread(target=self._poll, name="expertmesh-pool-poll", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ steps

    def _before_step(self, module: Any, args: Any) -> None:
        with self._lock:
            if self._next is not None:
                self._apply(self._next)  # no layer call in flight: the step starts on it
            self._in_step = True
            self._step_table = self.dispatcher.table
            self._step_mixed = self._step_urgent = False

    def _after_step(self, module: Any, args: Any, output: Any) -> None:
        with self._lock:
            self._in_step = False
            self.stats.steps += 1
            if self._step_mixed:
                if self._step_urgent:
                    self.stats.urgent_mixed_steps += 1
                else:
                    self.stats.mixed_steps += 1
            if self._next is not None:
                self._apply(self._next)

    def on_reply(
        self, node: str, layer: int, rows: int, nbytes: int, round_trip_s: float, busy_s: float
    ) -> None:
        return None

    def on_step(self, layer: int, counts: np.ndarray) -> None:
        """A layer call finished: note its tokens per expert (for the pool's rebalancer), and
        whether it ran on the table its step started with."""
        if self._in_step and self.dispatcher.table is not self._step_table:
            self._step_mixed = True
        with self._load_lock:
            if layer in self._load:
                self._load[layer] += counts
            else:
                self._load[layer] = np.asarray(counts, dtype=np.int64).copy()

    def _on_failure(self, node: str, reason: str) -> None:
        generation = self.shards.generations.get(node, 0)
        self.controller.report_failure.remote(node, generation, reason)

    # ------------------------------------------------------------------ versions

    def receive(self, snapshot: PoolSnapshot, urgent: bool = False) -> None:
        """A newer version from the controller: handles at once; the table between steps
        (`urgent`: for a step waiting on a lost node, at once)."""
        with self._lock:
            if snapshot.version <= self.seen:
                return
            self.seen = snapshot.version
            self.out_of_service = snapshot.out_of_service
            for node in self.shards.update(snapshot):
                self.dispatcher.dead.discard(node)  # its replacement serves
            if snapshot.routes == self._routes:  # only shards changed: nothing to swap
                self._next = None
                self._took(snapshot, swapped=False)
                return
            if urgent:
                self._next = None
                self._step_urgent = self._in_step
                threading.Thread(target=self._apply_urgent, args=(snapshot,), daemon=True).start()
            elif self._in_step:
                self._next = snapshot
            else:
                self._apply(snapshot)

    def _apply(self, snapshot: PoolSnapshot) -> None:
        """Swap to `snapshot`'s table; call with `_lock` held and no layer call in flight."""
        self.dispatcher.swap_table(RoutingTable(snapshot.routes))
        self._next = None
        self._routes = snapshot.routes
        self.ep.placement = snapshot.placement
        self.stats.swaps += 1
        self._took(snapshot, swapped=True)

    def _apply_urgent(self, snapshot: PoolSnapshot) -> None:
        # Not under _lock: the waiting call adopts it inside `Dispatcher._recover`, which may
        # call `PoolShards.recover` -> `receive` meanwhile.
        self.dispatcher.swap_table(RoutingTable(snapshot.routes))
        with self._lock:
            if snapshot.version <= self.version:
                return  # a newer planned version got there first
            self._routes = snapshot.routes
            self.ep.placement = snapshot.placement
            self.stats.urgent_swaps += 1
            self._took(snapshot, swapped=True)

    def _took(self, snapshot: PoolSnapshot, swapped: bool) -> None:
        self.version = snapshot.version
        self.stats.versions.append(snapshot.version)
        self.controller.adopted.remote(self.replica, snapshot.version)

    def _take_load(self) -> dict[int, np.ndarray]:
        with self._load_lock:
            load, self._load = self._load, {}
        return load

    def _poll(self) -> None:
        ray = self._ray
        while not self._closed.is_set():
            load = self._take_load()
            try:
                ref = self.controller.wait_for_version.remote(
                    self.replica, self.seen, self.version, load or None
                )
                snapshot = ray.get(ref, timeout=self.poll_timeout_s + 30)
            except Exception as e:  # the controller restarting: keep serving, ask again
                with self._load_lock:
                    for layer, counts in load.items():
                        self._load[layer] = self._load.get(layer, 0) + counts
                if self._closed.is_set():
                    return
                log.warning("pool controller did not answer the long-poll: %r", e)
                self._closed.wait(0.5)
                continue
            if snapshot is not None:
                self.receive(snapshot)

    def close(self) -> None:
        """Detach: stop polling, close this replica's channels. The shards keep serving."""
        self._closed.set()
        for hook in self._hooks:
            hook.remove()
        for observer in (self, self.detectors):
            with contextlib.suppress(ValueError):
                self.dispatcher.observers.remove(observer)
        with contextlib.suppress(Exception):
            self._ray.get(self.controller.detach.remote(self.replica), timeout=5)
        closer = getattr(self.dispatcher.transport, "close", None)
        if closer is not None:
            closer()
        self._thread.join(1.0)


class AttachedModel(ExpertParallelModel):
    """An `ExpertParallelModel` over a shared pool's shards; `shutdown` detaches only."""

    attachment: PoolAttachment
    pool_name: str

    def shutdown(self) -> None:
        attachment = getattr(self, "attachment", None)
        if attachment is not None:
            attachment.close()
            self.attachment = None  # type: ignore[assignment]
        super().shutdown()


def attach_pool(
    pool: str,
    checkpoint: str | Path | None = None,
    topology: Any = None,
    *,
    create: bool = True,
    tracer: Any = None,
    timeout_s: float = 600.0,
    **spec_fields: Any,
) -> AttachedModel:
    """Attach this process to expert pool `pool`, starting it first when `create` and none
    runs (from `checkpoint` and `topology`; `spec_fields`: the other `PoolSpec` fields). Needs
    a running Ray cluster: the pool outlives this process."""
    import ray

    from .devices import attention_device, gpus_offered
    from .pool import node_resource

    if not ray.is_initialized():
        raise PoolError(
            "expert_pool: needs a running Ray cluster (the pool outlives this process); "
            "connect with ray.init(address=...) or start one (`expertmesh up`, `ray start`)"
        )
    spec = None
    if create and topology is not None:
        if checkpoint is None:
            raise PoolError("expert_pool: starting a pool needs the checkpoint; pass it")
        spec = PoolSpec(str(Path(checkpoint).resolve()), topology, **spec_fields)
    controller = controller_actor(pool, create=spec)
    try:
        info = ray.get(controller.ready.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError as e:
        with contextlib.suppress(Exception):
            ray.kill(controller, no_restart=True)  # a pool that could not start: let a retry
        raise PoolError(f"expert pool {pool!r} did not start: {e}") from e
    if checkpoint is not None and str(Path(checkpoint).resolve()) != info["checkpoint"]:
        raise PoolError(
            f"expert_pool: pool {pool!r} serves {info['checkpoint']}, not {checkpoint}; "
            "attach to a pool of this model (another `expert_pool` name)"
        )
    replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    snapshot: PoolSnapshot = ray.get(controller.attach.remote(replica), timeout=timeout_s)
    head = snapshot.topology.attention_nodes[0]
    device = attention_device(
        head.device, head.name, gpus_offered(node_resource(head.name), ray.nodes())
    )
    model = attention_model(snapshot.checkpoint, snapshot.dtype, torch.device(device))
    shards = PoolShards(controller, snapshot)
    dispatcher = Dispatcher(
        RoutingTable(snapshot.routes), shards, model.config.moe.num_experts, tracer=tracer
    )
    attach_dispatcher(model, dispatcher)
    ep = AttachedModel(model, dispatcher, shards, snapshot.placement)
    ep.pool_name = pool
    ep.attachment = PoolAttachment(controller, replica, ep, shards, snapshot)
    return ep
