"""One expert pool per model, shared by every API replica (attention and experts scaled apart).

    ep = attach_pool("demo", "ckpt/", topology)   # in each API replica (pool_attachment.py)
    pool_down("demo")                                            # the operator, explicitly

A pool is a set of detached Ray actors in the namespace `expertmesh-pool-<name>`:

- the **shards** (`ExpertShard`, one per topology node, plus standbys), started once from one
  placement; they hold the only copy of the experts however many replicas attach;
- the **controller** (`PoolController`, the named actor `controller`, restarted by Ray):
  the placement, a *versioned* routing table, and the one `Supervisor` (loss, drain, rejoin,
  rebalancing) of the pool. A fault is handled and reported once, not once per replica.

A replica attaches by name (`cluster/pool_attachment.py`): it fetches the current version,
routes and shard handles, builds its own `Dispatcher` over those shards (its own channels,
with the pool's channel secret) and long-polls the controller for newer versions. It never
starts, loads, drops or kills a shard, so a replica's restart, crash or autoscaling leaves the
pool as it was, and the last replica leaving does not end it.

Table versions: every change the controller publishes (a re-placement, a rebalance, a
promoted standby) is version + 1. A replica swaps its table only between two forward passes,
so a step runs on one version; the exception is a step already waiting on a lost node, which
takes the re-placement at once (it cannot finish otherwise; outputs are unchanged). Before
experts are dropped or a drained shard is stopped, the controller waits until every live
replica reports the new version (`ack_timeout_s`; a replica silent for `replica_timeout_s`
counts as gone).

State that must survive a controller restart (version, routes, placement, the channel
secret, the nodes out of service) is written to Ray's GCS key-value store on every change;
a restarted controller finds its shards by name in the namespace.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from .pool_controller import PoolController, shard_expert_bytes
from .pool_spec import (
    CONTROLLER_NAME,
    NAMESPACE_PREFIX,
    SHARD_PREFIX,
    STATE_KEY,
    PoolError,
    PoolSnapshot,
    PoolSpec,
    pool_namespace,
)

log = logging.getLogger("expertmesh.expert_pool")


def controller_actor(pool: str, *, create: PoolSpec | None = None) -> Any:
    """The pool's controller handle: started (with the pool's shards) when `create` is given
    and no pool of that name runs; PoolError when none runs and `create` is None."""
    import ray

    namespace = pool_namespace(pool)
    if create is None:
        try:
            return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        except ValueError:
            raise PoolError(
                f"no expert pool named {pool!r} runs on this Ray cluster; start it by attaching "
                "with a topology (serving: `expert_pool` with `topology`)"
            ) from None
    pinned = {}
    if create.controller_node is not None:
        from .pool import node_resource

        pinned["resources"] = {node_resource(create.controller_node): 0.001}
    remote: Any = ray.remote
    actor = remote(PoolController).options(
        **pinned,
        name=CONTROLLER_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,  # replicas starting at once: one controller, the others attach
        max_restarts=-1,
        max_concurrency=64,  # one long-poll per replica waits in here
        num_cpus=0,
    )
    return actor.remote(pool, create)


def pool_down(pool: str, timeout_s: float = 60.0) -> int:
    """Stop pool `pool`: its shards, standbys and controller, and forget its state; the shard
    actors stopped. A controller that does not answer within `timeout_s` (or is gone) is
    killed and the pool's actors are then killed by name. PoolError when nothing of the pool
    runs."""
    import ray

    try:
        controller = controller_actor(pool)
    except PoolError:
        controller = None
        if not pool_actors(pool):
            raise PoolError(
                f"no expert pool named {pool!r} runs on this Ray cluster (pools: "
                f"{', '.join(running_pools()) or 'none'})"
            ) from None
    stopped = 0
    if controller is not None:
        try:
            stopped = int(ray.get(controller.down.remote(), timeout=timeout_s))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            log.warning("pool %s: the controller did not stop the pool (%r); by name", pool, e)
        ray.kill(controller, no_restart=True)
    namespace = pool_namespace(pool)
    for name in pool_actors(pool):
        with contextlib.suppress(ValueError):  # gone meanwhile
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            stopped += name.startswith(SHARD_PREFIX)
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(STATE_KEY, namespace=namespace)
    deadline = time.monotonic() + 10.0  # names are released once Ray has the actors dead
    while pool_actors(pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stopped


def pool_actors(pool: str) -> list[str]:
    """Names of the live actors of pool `pool` (its controller, shards and standbys)."""
    import ray

    namespace = pool_namespace(pool)
    return sorted(
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == namespace
    )


def running_pools() -> list[str]:
    """Names of the expert pools with live actors on this Ray cluster: a controller, or
    shards a killed controller left (`pool_down` removes both)."""
    import ray

    return sorted(
        {
            entry["namespace"].removeprefix(NAMESPACE_PREFIX)
            for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"].startswith(NAMESPACE_PREFIX)
        }
    )


def pool_status(pool: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The controller's `status` of pool `pool`, with `actors` (the pool's live actor names);
    `error` instead of the controller's fields when it does not answer (restarting, gone)."""
    import ray

    out: dict[str, Any] = {"pool": pool}
    try:
        out.update(ray.get(controller_actor(pool).status.remote(), timeout=timeout_s))
    except PoolError:
        out["error"] = "no controller"
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        out["error"] = type(e).__name__
    out["actors"] = pool_actors(pool)
    return out


__all__: Sequence[str] = (
    "CONTROLLER_NAME",
    "NAMESPACE_PREFIX",
    "SHARD_PREFIX",
    "PoolController",
    "PoolError",
    "PoolSnapshot",
    "PoolSpec",
    "controller_actor",
    "pool_actors",
    "pool_down",
    "pool_namespace",
    "pool_status",
    "running_pools",
    "shard_expert_bytes",
)
