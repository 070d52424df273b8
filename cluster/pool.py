"""Expert shards as Ray actors, one per node, pinned by a per-node custom resource."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from .dispatch import ShardLost
from .shard import NodeEmulation, ShardReply, shard_actor_class


def node_resource(node: str) -> str:
    """The custom resource that only the Ray node standing for topology node `node` offers."""
    return f"expertmesh_node_{node}"


class RayShardPool:
    """Creates and talks to the `ExpertShard` actors. Ray restarts a crashed actor (its
    constructor reloads the experts from the checkpoint); `recover` waits for that and makes
    the shard hold the current assignment."""

    def __init__(
        self,
        checkpoint: str,
        assignment: Mapping[str, Mapping[int, Sequence[int]]],
        dtype: str = "float32",
        emulation: Mapping[str, NodeEmulation] | None = None,
        namespace_prefix: str = "expertmesh-shard",
        telemetry: Mapping[str, Any] | None = None,
    ) -> None:
        import ray

        self._ray = ray
        cls = shard_actor_class()
        emulation = emulation or {}
        self.handles: dict[str, Any] = {}
        for node, experts in assignment.items():
            self.handles[node] = cls.options(
                name=f"{namespace_prefix}-{node}",
                num_cpus=0,
                resources={node_resource(node): 0.001},
            ).remote(
                node,
                checkpoint,
                {int(k): list(v) for k, v in experts.items()},
                dtype,
                emulation.get(node),
                telemetry=dict(telemetry) if telemetry else None,
            )
        # Fail fast: every shard must have loaded its experts before serving starts.
        ray.get([h.ping.remote() for h in self.handles.values()])

    def submit(
        self, node: str, layer: int, x: Any, expert_ids: Any, trace: dict[str, str] | None = None
    ) -> Any:
        return (node, self.handles[node].compute.remote(layer, x, expert_ids, trace))

    def result(self, handle: Any) -> ShardReply:
        node, ref = handle
        try:
            return self._ray.get(ref)
        except (
            self._ray.exceptions.RayActorError,
            self._ray.exceptions.ActorUnavailableError,
        ) as e:
            raise ShardLost(node, type(e).__name__) from e

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
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
        """Kill a shard actor (fault injection); Ray restarts it unless no_restart."""
        self._ray.kill(self.handles[node], no_restart=no_restart)

    def statuses(self) -> dict[str, Any]:
        return dict(
            zip(self.handles, self._ray.get([h.status.remote() for h in self.handles.values()]))
        )

    def call_all(self, method: str, *args: Any) -> dict[str, Any]:
        refs = {n: getattr(h, method).remote(*args) for n, h in self.handles.items()}
        return {n: self._ray.get(r) for n, r in refs.items()}
