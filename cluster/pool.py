"""Expert shards as Ray actors, one per node, pinned by a per-node custom resource."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from expertmesh.models.device import DeviceError
from expertmesh.models.errors import ExpertNotLoaded

from .devices import actor_device, gpu_request, gpus_offered
from .dispatch import ShardLost
from .shard import NodeEmulation, ShardReply, shard_actor_class
from .wire import ShardRequest

TRANSPORTS = ("channel", "actor-call")
"""How the dispatcher reaches this pool's shards (`RayShardPool(transport=...)`)."""


def node_resource(node: str) -> str:
    """The custom resource that only the Ray node standing for topology node `node` offers."""
    return f"expertmesh_node_{node}"


class RayShardPool:
    """Creates and talks to the `ExpertShard` actors, one per node.

    Recovery of a dead shard (`recover`), two ways:
    - `standby=True` (default): each node also runs an idle standby shard (a process with
      torch and the model code loaded, no experts). A dead shard's standby is promoted: it
      loads the dead shard's experts (from the checkpoint, on its node) and takes its place,
      and a new standby starts in the background. Serving resumes in the time it takes to load
      the experts, not to start a Python process and import torch (about 2 s here).
    - `standby=False`: Ray restarts the crashed actor (its constructor reloads its experts);
      `recover` waits for that. One process per node instead of two.

    `devices` (node -> auto|cuda|cpu, the topology's `device`; absent: cpu) settles where each
    node's shards compute before any starts (`cluster/devices.py`): a node on a GPU gets Ray
    `num_gpus` (a share of one GPU) for its shard and standby; `cuda` on a node whose Ray node
    has no GPU is a DeviceError naming the node.
    """

    def __init__(
        self,
        checkpoint: str,
        assignment: Mapping[str, Mapping[int, Sequence[int]]],
        dtype: str = "float32",
        emulation: Mapping[str, NodeEmulation] | None = None,
        namespace_prefix: str = "expertmesh-shard",
        telemetry: Mapping[str, Any] | None = None,
        standby: bool = True,
        transport: str = "channel",
        devices: Mapping[str, str] | None = None,
        actor_options: Mapping[str, Any] | None = None,
        spin_us: float = 0.0,
    ) -> None:
        import ray

        if transport not in TRANSPORTS:
            raise ValueError(
                f"transport: unknown {transport!r}; use one of {', '.join(TRANSPORTS)}"
            )
        self.transport = transport
        self.spin_us = spin_us
        """The channel transport's reply polling (`transport.CHANNEL_SPIN_US`; 0 when the
        shards share this process's cores)."""

        self._ray = ray
        self._cls = shard_actor_class()
        self._args = (checkpoint, dtype)
        self._emulation = dict(emulation or {})
        self._telemetry = dict(telemetry) if telemetry else None
        # Unique to this pool: two replicas' private pools share a Ray namespace (Serve's).
        self._prefix = f"{namespace_prefix}-{secrets.token_hex(3)}"
        self._standby = standby
        self._actor_options = dict(actor_options or {})
        """Extra Ray options for every shard actor (a shared pool's: detached, its namespace)."""
        self._lock = threading.Lock()
        self._spawned = 0
        self.handles: dict[str, Any] = {}
        self.standbys: dict[str, Any] = {}
        self.promotions = 0
        self._devices = dict(devices or {})
        self._gpus = {node: self._gpu_share(node) for node in assignment}  # before any starts
        for node, experts in assignment.items():
            self.handles[node] = self._spawn(node, {int(k): list(v) for k, v in experts.items()})
            if standby:
                self.standbys[node] = self._spawn(node, {})
        # Fail fast: every shard must have loaded its experts before serving starts.
        ray.get([h.ping.remote() for h in [*self.handles.values(), *self.standbys.values()]])

    def _gpu_share(self, node: str) -> float:
        """Ray `num_gpus` for `node`'s shard actors (0: the CPU; no Ray call on the CPU path)."""
        spec = self._devices.get(node, "cpu")
        if spec == "cpu":
            return 0.0
        return gpu_request(spec, node, gpus_offered(node_resource(node), self._ray.nodes()))

    def _spawn(self, node: str, experts: Mapping[int, Sequence[int]]) -> Any:
        self._spawned += 1
        options: dict[str, Any] = {
            "name": f"{self._prefix}-{node}-{self._spawned}",
            "num_cpus": 0,
            "resources": {node_resource(node): 0.001},
        }
        gpus = self._gpus.get(node, 0.0)
        if gpus:
            options["num_gpus"] = gpus
        if self._standby:
            options["max_restarts"] = 0  # the standby takes over instead
        options.update(self._actor_options)
        checkpoint, dtype = self._args
        return self._cls.options(**options).remote(
            node,
            checkpoint,
            {int(k): list(v) for k, v in experts.items()},
            dtype,
            self._emulation.get(node),
            telemetry=self._telemetry,
            device=actor_device(gpus),
        )

    def submit(
        self, node: str, layer: int, x: Any, expert_ids: Any, trace: dict[str, str] | None = None
    ) -> Any:
        return (node, self.handles[node].compute.remote(layer, x, expert_ids, trace))

    def submit_request(
        self, node: str, request: ShardRequest, trace: dict[str, str] | None = None
    ) -> Any:
        """One compact-wire call as a Ray actor task (the fallback transport)."""
        return (node, self.handles[node].compute_request.remote(request, trace))

    def default_transport(self) -> Any:
        """Persistent channels to the shard actors (`cluster/transport.py`), unless this pool
        was made with `transport="actor-call"` (one Ray task per node per layer)."""
        from .dispatch import PoolTransport
        from .transport import ChannelTransport

        if self.transport == "channel":
            return ChannelTransport(self, spin_us=self.spin_us)
        return PoolTransport(self)

    def as_completed(self, handles: Mapping[str, Any]) -> Iterator[str]:
        """The nodes of `handles` (node -> `submit` handle) in the order their calls answer,
        so the dispatcher reads each reply when it arrives and times each round trip alone."""
        node_of = {handle[1]: node for node, handle in handles.items()}
        remaining = list(node_of)
        while remaining:
            ready, remaining = self._ray.wait(remaining, num_returns=1)
            yield node_of[ready[0]]

    def result(self, handle: Any) -> ShardReply:
        node, ref = handle
        try:
            return self._ray.get(ref)
        except (
            self._ray.exceptions.RayActorError,
            self._ray.exceptions.ActorUnavailableError,
        ) as e:
            raise ShardLost(node, type(e).__name__) from e
        except self._ray.exceptions.RayTaskError as e:
            # A shard Ray restarted comes back with its start-up experts, not the ones it was
            # given since: until `recover` reloads them it is as good as lost for those rows.
            if isinstance(e, ExpertNotLoaded) or isinstance(e.cause, ExpertNotLoaded):
                raise ShardLost(node, f"it lacks experts it is routed: {e.cause}") from e
            raise

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        """Make `node`'s shard answer and hold `experts`: promote its standby if the shard is
        dead, else wait for Ray's restart; ShardLost after `timeout_s`."""
        with self._lock:
            if self._standby:
                return self._recover_with_standby(node, experts, timeout_s)
        deadline = time.monotonic() + timeout_s
        handle = self.handles[node]
        while True:
            try:
                self._ray.get(
                    handle.ensure.remote(experts), timeout=max(0.1, deadline - time.monotonic())
                )
                return
            except (
                self._ray.exceptions.RayActorError,
                self._ray.exceptions.ActorUnavailableError,
                self._ray.exceptions.GetTimeoutError,
            ) as e:
                if time.monotonic() >= deadline:
                    raise ShardLost(node, f"not back after {timeout_s:.0f} s") from e
                time.sleep(0.05)

    def _recover_with_standby(
        self, node: str, experts: dict[int, list[int]], timeout_s: float
    ) -> None:
        ray = self._ray
        dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        try:  # still alive (a slow call, or another thread already promoted)
            ray.get(self.handles[node].ensure.remote(experts), timeout=min(timeout_s, 0.2))
            return
        except dead:
            pass
        except ray.exceptions.GetTimeoutError as e:
            raise ShardLost(node, "did not answer") from e
        standby = self.standbys.pop(node, None)
        if standby is None:
            raise ShardLost(node, "dead, and no standby is ready yet")
        try:
            ray.get(standby.ensure.remote(experts), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            self.standbys[node] = standby  # still starting: the next attempt waits on it
            raise ShardLost(node, "its standby is still starting") from e
        except dead as e:
            raise ShardLost(node, "its standby is gone too (node lost?)") from e
        self.handles[node] = standby
        self.promotions += 1
        self.standbys[node] = self._spawn(node, {})  # ready for the next failure

    def add_node(self, node: str, timeout_s: float) -> None:
        """Start a fresh shard (and standby) on `node`, holding no experts yet: a node that was
        lost or drained has a Ray node offering its resource again. ShardLost when they do not
        answer within `timeout_s` (the actors are killed, nothing changes)."""
        try:  # the Ray node now standing for it may have a GPU, or not
            self._gpus[node] = self._gpu_share(node)
        except DeviceError as e:
            raise ShardLost(node, str(e)) from e
        fresh = [self._spawn(node, {})]
        if self._standby:
            fresh.append(self._spawn(node, {}))
        try:
            self._ray.get([h.ping.remote() for h in fresh], timeout=timeout_s)
        except (
            self._ray.exceptions.GetTimeoutError,
            self._ray.exceptions.RayActorError,
            self._ray.exceptions.ActorUnavailableError,
        ) as e:
            for handle in fresh:
                self._ray.kill(handle, no_restart=True)
            raise ShardLost(node, f"a new shard did not start within {timeout_s:g} s") from e
        with self._lock:
            self.handles[node] = fresh[0]
            if self._standby:
                self.standbys[node] = fresh[1]

    def load_many(self, adds: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        """Load experts on several shards in parallel; returns when all are in memory."""
        self._ray.get(
            [
                self.handles[n].load.remote(layer, list(ids))
                for n, per in adds.items()
                for layer, ids in per.items()
            ]
        )

    def drop_many(self, drops: Mapping[str, Mapping[int, Sequence[int]]]) -> None:
        self._ray.get(
            [
                self.handles[n].drop.remote(layer, list(ids))
                for n, per in drops.items()
                for layer, ids in per.items()
            ]
        )

    def kill(self, node: str, no_restart: bool = False) -> None:
        """Kill a shard actor (fault injection). With standbys the next `recover` promotes
        one; without, Ray restarts the actor unless no_restart."""
        self._ray.kill(self.handles[node], no_restart=no_restart or self._standby)

    def statuses(self) -> dict[str, Any]:
        return dict(
            zip(self.handles, self._ray.get([h.status.remote() for h in self.handles.values()]))
        )

    def call_all(self, method: str, *args: Any) -> dict[str, Any]:
        refs = {n: getattr(h, method).remote(*args) for n, h in self.handles.items()}
        return {n: self._ray.get(r) for n, r in refs.items()}
