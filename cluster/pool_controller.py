"""The shared expert pool's one controller (`PoolController`, a named, detached Ray actor): the
placement, the versioned routing table, the one `Supervisor` of the pool, and what replicas
and operators call. `cluster/expert_pool.py` describes the pool; this file is its control
plane (the data path never goes through it)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from expertmesh.models.checkpoint import read_config
from expertmesh.observability.events import EventLog, FaultEvent

from .dispatch import DispatchStats, RoutingTable
from .placement import PlacementOptions
from .pool_detect import PoolConditions
from .pool_spec import SHARD_PREFIX, STATE_KEY, PoolSnapshot, PoolSpec, pool_namespace
from .supervisor import Supervisor
from .transport import CHANNEL_SPIN_US

log = logging.getLogger("expertmesh.expert_pool")


@dataclass
class _ReplicaState:
    version: int
    last_seen: float


class _Events:
    """The controller's fault events: to a JSONL file when configured, and kept for `events`."""

    def __init__(self, path: str | None) -> None:
        self.log = EventLog(Path(path)) if path else None
        self.kept: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.kept.append(event)
        if self.log is not None:
            self.log.emit(event)
        return event


class _TableKeeper:
    """What the supervisor and rebalancer know as `ep.dispatcher`: the pool's current table.
    `swap_table` publishes a new version and returns once every live replica uses it."""

    def __init__(self, controller: PoolController, table: RoutingTable) -> None:
        self._controller = controller
        self.table = table
        self.dead: set[str] = set()
        self.on_failure: Any = None
        """Set by the supervisor: called as on_failure(node, reason) for a replica's report."""
        self.stats = DispatchStats()
        """Token assignments per expert, summed over every replica's reports."""
        self.observers: list[Any] = []
        """Dispatch observers the supervisor adds; replies happen in the replicas, not here."""

    def swap_table(self, table: RoutingTable) -> None:
        self.table = table
        self.dead &= set(table.nodes)
        version = self._controller.publish()
        self._controller.wait_adopted(version)


class _SyncingPool:
    """The controller's `RayShardPool` as the supervisor sees it: a shard it replaces
    (standby promoted, node rejoined) is published before the supervisor goes on, so a late
    failure report about the old shard is recognised as such."""

    def __init__(self, controller: PoolController, pool: Any) -> None:
        self._controller = controller
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def recover(self, node: str, experts: dict[int, list[int]], timeout_s: float) -> None:
        try:
            self._pool.recover(node, experts, timeout_s)
        finally:
            self._controller.sync_shards()

    def add_node(self, node: str, timeout_s: float) -> None:
        self._pool.add_node(node, timeout_s)
        self._controller.sync_shards()


class _PoolView:
    """The `ExpertParallelModel`-shaped view the supervisor and rebalancer act on: the same
    fields, with the controller's shard pool and table keeper behind them."""

    def __init__(
        self,
        controller: PoolController,
        config: Any,
        pool: Any,
        table: RoutingTable,
        placement: Any,
        options: PlacementOptions,
    ) -> None:
        self._controller = controller
        self.config = config
        self.pool = _SyncingPool(controller, pool)
        self.dispatcher = _TableKeeper(controller, table)
        self._placement = placement
        self.plan_options = options

    @property
    def placement(self) -> Any:
        return self._placement

    @placement.setter
    def placement(self, placement: Any) -> None:
        self._placement = placement
        self._controller.save_state()


class _PoolSupervisor(Supervisor):
    """The supervisor, run by the controller: after each round the controller publishes any
    shard that round replaced (a promoted standby, a rejoined node)."""

    def __init__(self, controller: PoolController, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._controller = controller

    def check(self) -> None:
        super().check()
        self._controller.sync_shards()
        self._controller.save_state_if_changed()

    def rebalance_now(self, load: np.ndarray | None, threshold: float | None) -> Any:
        """One rebalance under the supervisor's repair lock (never beside a re-placement)."""
        from .rebalance import Rebalancer

        with self._lock:
            rebalancer = self.rebalancer
            if threshold is not None or rebalancer is None:
                rebalancer = Rebalancer(
                    cast(Any, self.ep),
                    self.topology,
                    threshold if threshold is not None else 1.2,
                    min_tokens=1,
                )
            if load is None:
                report = rebalancer.check(exclude=self.removed)
            else:
                nodes = [n for n in rebalancer.nodes if n.name not in self.removed]
                current = rebalancer._evaluate(self.ep.placement, load, nodes)
                report = rebalancer.apply(load, current, nodes)
            if report.applied:
                self.stats.rebalances += 1
                self._emit("action", "router_imbalance", "placement", f"moved {report.moves}")
        self._controller.sync_shards()
        return report


class PoolController:
    """The pool's one controller (a named, detached Ray actor; see the module docstring).
    Its methods are what replicas and operators call; all are thread-safe (threaded actor)."""

    def __init__(self, pool: str, spec: PoolSpec) -> None:
        import ray

        self.pool_name = pool
        self.spec = spec
        self.namespace = pool_namespace(pool)
        self._ray = ray
        self._cond = threading.Condition()
        self._replicas: dict[str, _ReplicaState] = {}
        self._events = _Events(spec.events_path)
        self.conditions = PoolConditions(self._events)
        """The replicas' dispatch detectors, one condition per fault (`pool_detect.py`)."""
        self.config = read_config(spec.checkpoint)
        self.topology = spec.placement_topology
        self.restarted = False
        state = self._read_state()
        try:
            if state is None:
                self._start(spec)
            else:
                self._resume(spec, state)
            self._known = dict(self.shards.handles)
            self._published = self.view.dispatcher.table
            self.save_state()
        except BaseException:
            self._stop_shards()  # detached: nothing else would ever stop them
            raise
        rebalancer = None
        if spec.supervisor.rebalance_every_s > 0:
            from .rebalance import Rebalancer

            rebalancer = Rebalancer(
                cast(Any, self.view),
                self.topology,
                spec.rebalance_threshold,
                spec.rebalance_min_tokens,
                self.view.plan_options,
            )
        self.supervisor = _PoolSupervisor(
            self,
            cast(Any, self.view),
            self.topology,
            spec.supervisor,
            events=self._events,
            rebalancer=rebalancer,
        )
        self.supervisor.removed |= self._restored_removed
        self.supervisor.lost.update(self._restored_lost)
        self.supervisor.start()

    # ------------------------------------------------------------------ start / resume

    def _shard_nodes(self) -> list[str]:
        """The nodes that get a shard: `expert_nodes`, else every topology node (the ones the
        plan leaves empty too: failover and rebalancing move experts onto them)."""
        names = [n.name for n in self.topology.nodes]
        wanted = self.spec.expert_nodes
        return names if wanted is None else [n for n in names if n in wanted]

    def _shard_pool(self, spec: PoolSpec, assignment: Mapping[str, Any], generation: int) -> Any:
        from .local import emulation_for
        from .pool import RayShardPool

        return RayShardPool(
            spec.checkpoint,
            assignment,
            spec.dtype,
            emulation_for(self.topology) if spec.emulate else None,
            namespace_prefix=f"{SHARD_PREFIX}-g{generation}",
            telemetry=spec.telemetry,
            standby=spec.standby,
            devices={n.name: n.device for n in self.topology.nodes},
            actor_options={"lifetime": "detached", "namespace": self.namespace},
        )

    def _start(self, spec: PoolSpec) -> None:
        """Plan the placement (as `ExpertParallelModel.launch` does) and start the shards."""
        from .planning import embedded_reference_tflops, plan_for_topology
        from .runtime import DEFAULT_TFLOPS, measure_node_speeds, routes_from_placement

        topology = self.topology
        if topology.nodes_to_measure:
            topology = self.topology = topology.with_speeds(
                measure_node_speeds(topology.nodes_to_measure)
            )
        tflops = None
        if spec.emulate and topology.reference_tflops is None:
            tflops = embedded_reference_tflops(topology)
        placement = plan_for_topology(
            topology, self.config, None, min_replicas=spec.min_replicas, reference_tflops=tflops
        )
        options = PlacementOptions(
            min_replicas=spec.min_replicas,
            reference_tflops=tflops or topology.reference_tflops or DEFAULT_TFLOPS,
        )
        table = RoutingTable(routes_from_placement(placement))
        held = table.node_experts()
        assignment = {n: held.get(n, {}) for n in self._shard_nodes()}
        self.incarnation = 0
        self.shards = self._shard_pool(spec, assignment, self.incarnation)
        self.version = 1
        self.generations = dict.fromkeys(self.shards.handles, 0)
        self.secret = secrets.token_bytes(32)
        self.view = _PoolView(self, self.config, self.shards, table, placement, options)
        self._restored_removed: set[str] = set()
        self._restored_lost: dict[str, frozenset[str]] = {}

    def _resume(self, spec: PoolSpec, state: dict[str, Any]) -> None:
        """A restarted controller: the table and placement from the GCS, the shards found by
        name in the namespace (a node whose shard is gone gets a fresh one holding its part)."""
        ray = self._ray
        self.restarted = True
        self.incarnation = int(state["incarnation"]) + 1
        self.topology = state["topology"]
        self.version = int(state["version"]) + 1  # replicas see one change: the new handles
        self.secret = state["secret"]
        self.generations = {n: g + 1 for n, g in state["generations"].items()}
        table = RoutingTable(state["routes"])
        self.shards = self._shard_pool(spec, {}, self.incarnation)
        self.view = _PoolView(
            self, self.config, self.shards, table, state["placement"], state["options"]
        )
        self._restored_removed = set(state["removed"])
        self._restored_lost = dict(state["lost"])
        found: dict[str, list[tuple[Any, dict[int, list[int]]]]] = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != self.namespace or not entry["name"].startswith(SHARD_PREFIX):
                continue
            try:
                handle = ray.get_actor(entry["name"], namespace=self.namespace)
                status = ray.get(handle.status.remote(), timeout=10)
            except Exception:  # a dead or dying actor: not part of the pool any more
                continue
            found.setdefault(status.node, []).append((handle, status.experts))
        held = table.node_experts()
        for node in set(self._shard_nodes()) - self._restored_removed:
            want = held.get(node, {})
            candidates = sorted(found.get(node, []), key=lambda c: not c[1])  # holding first
            if not candidates:
                self.shards.add_node(node, spec.supervisor.rejoin_timeout_s)
            else:
                self.shards.handles[node] = candidates[0][0]
                if len(candidates) > 1 and spec.standby:
                    self.shards.standbys[node] = candidates[1][0]
                for handle, _ in candidates[2 if spec.standby else 1 :]:
                    ray.kill(handle, no_restart=True)
            ray.get(self.shards.handles[node].ensure.remote(want))
            self.generations.setdefault(node, 0)
        log.info("expert pool %s resumed at version %d", self.pool_name, self.version)

    def _read_state(self) -> dict[str, Any] | None:
        from ray import cloudpickle
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(STATE_KEY, namespace=self.namespace)
        return None if raw is None else cast(dict[str, Any], cloudpickle.loads(raw))

    def _service_state(self) -> tuple[Any, ...]:
        sup = getattr(self, "supervisor", None)
        if sup is None:
            return (sorted(self._restored_removed), sorted(self._restored_lost))
        return (sorted(sup.removed), sorted(sup.lost))

    def save_state_if_changed(self) -> None:
        """When the nodes out of service changed (a supervisor round drained, lost or took
        back a node; the supervisor marks them after its table swap): publish a version that
        says so (replicas' health) and save."""
        if self._service_state() != self._saved_service:
            self.publish()

    def save_state(self) -> None:
        """Write what a restarted controller needs to the GCS key-value store."""
        from ray import cloudpickle
        from ray.experimental import internal_kv

        sup = getattr(self, "supervisor", None)
        with self._cond:
            state = {
                "incarnation": self.incarnation,
                "version": self.version,
                "routes": dict(self.view.dispatcher.table.routes),
                "placement": self.view.placement,
                "options": self.view.plan_options,
                "generations": dict(self.generations),
                "secret": self.secret,
                "topology": self.topology,
                "removed": sorted(sup.removed) if sup else sorted(self._restored_removed),
                "lost": dict(sup.lost) if sup else dict(self._restored_lost),
            }
        internal_kv._internal_kv_put(
            STATE_KEY, cloudpickle.dumps(state), overwrite=True, namespace=self.namespace
        )
        self._saved_service = self._service_state()

    # ------------------------------------------------------------------ versions

    def _snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            self.version,
            dict(self._published.routes),
            dict(self.shards.handles),
            dict(self.generations),
            self.view.placement,
            self.secret,
            self.spec.dtype,
            self.spec.checkpoint,
            self.topology,
            tuple(sorted(self._service_state()[0])),
            0.0 if self.spec.emulate else CHANNEL_SPIN_US,
        )

    def publish(self) -> int:
        """Make the keeper's table and the pool's shard handles the next version."""
        with self._cond:
            self.version += 1
            self._published = self.view.dispatcher.table
            self._cond.notify_all()
            version = self.version
        self.save_state()
        return version

    def sync_shards(self) -> None:
        """Publish shards replaced since the last version (standby promoted, node rejoined)."""
        with self._cond:
            changed = [n for n, h in self.shards.handles.items() if self._known.get(n) is not h]
            for node in changed:
                self._known[node] = self.shards.handles[node]
                self.generations[node] = self.generations.get(node, 0) + 1
        if changed:
            self.publish()

    def wait_adopted(self, version: int) -> list[str]:
        """Wait until every live replica uses `version` (or `ack_timeout_s`); the replicas
        still behind (empty when all adopted it)."""
        deadline = time.monotonic() + self.spec.ack_timeout_s

        def behind() -> list[str]:
            now = time.monotonic()
            return [
                r
                for r, s in self._replicas.items()
                if s.version < version and now - s.last_seen < self.spec.replica_timeout_s
            ]

        with self._cond:
            while (late := behind()) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
        if late:
            log.warning("replicas %s did not adopt version %d in time", late, version)
        return late

    # ------------------------------------------------------------------ replicas' calls

    def ready(self) -> dict[str, Any]:
        """Returns once the pool serves: its name, checkpoint, dtype, version."""
        return {
            "pool": self.pool_name,
            "checkpoint": self.spec.checkpoint,
            "dtype": self.spec.dtype,
            "version": self.version,
            "restarted": self.restarted,
        }

    def attach(self, replica: str) -> PoolSnapshot:
        with self._cond:
            self._replicas[replica] = _ReplicaState(self.version, time.monotonic())
            return self._snapshot()

    def detach(self, replica: str) -> None:
        with self._cond:
            self._replicas.pop(replica, None)
            self._cond.notify_all()
        self.conditions.forget(replica)

    def report_event(self, replica: str, event: FaultEvent) -> None:
        """An event of a replica's dispatch detectors (link degraded, node slow): one
        `detected` per fault for all replicas, `recovered` once the last one sees it end."""
        self.conditions.report(replica, event)

    def wait_for_version(
        self,
        replica: str,
        known: int,
        adopted: int | None = None,
        load: Mapping[int, np.ndarray] | None = None,
    ) -> PoolSnapshot | None:
        """The long-poll: a snapshot newer than `known`, or None after `poll_timeout_s`.
        Also the replica's heartbeat, its adopted version and its token counts since."""
        if load:
            tokens = self.view.dispatcher.stats
            for layer, counts in load.items():
                tokens.record_tokens(int(layer), np.asarray(counts))
        deadline = time.monotonic() + self.spec.poll_timeout_s
        with self._cond:
            state = self._replicas.setdefault(replica, _ReplicaState(0, 0.0))
            state.last_seen = time.monotonic()
            if adopted is not None:
                state.version = max(state.version, adopted)
                self._cond.notify_all()
            while self.version <= known and time.monotonic() < deadline:
                self._cond.wait(max(deadline - time.monotonic(), 0.0))
            state.last_seen = time.monotonic()
            return self._snapshot() if self.version > known else None

    def adopted(self, replica: str, version: int) -> None:
        """A replica swapped to `version` (between two of its steps)."""
        with self._cond:
            state = self._replicas.setdefault(replica, _ReplicaState(0, 0.0))
            state.version = max(state.version, version)
            state.last_seen = time.monotonic()
            self._cond.notify_all()

    def report_failure(self, node: str, generation: int, reason: str) -> None:
        """A replica's call to `node`'s shard failed. Reports about a shard already replaced
        are dropped: one fault, one incident, however many replicas saw it."""
        if generation != self.generations.get(node) or node not in self._published.nodes:
            return
        if self.view.dispatcher.on_failure is not None:
            self.view.dispatcher.on_failure(node, reason)

    def recover(self, node: str, generation: int, timeout_s: float) -> PoolSnapshot:
        """A replica has rows for `node` and no live replica of them: bring its shard back
        (promote the standby) unless that already happened or the node was re-placed; the
        current snapshot. ShardLost when the shard is not back within `timeout_s`."""
        if generation == self.generations.get(node) and node in self._published.nodes:
            experts = self._published.node_experts().get(node, {})
            self.view.pool.recover(node, experts, timeout_s)
        with self._cond:
            return self._snapshot()

    # ------------------------------------------------------------------ operators' calls

    def drain(self, node: str) -> float:
        took = self.supervisor.drain(node)
        self.save_state_if_changed()
        return took

    def rejoin(self, node: str) -> float:
        took = self.supervisor.rejoin(node)
        self.sync_shards()
        self.save_state_if_changed()
        return took

    def rebalance(
        self, load: np.ndarray | None = None, threshold: float | None = None
    ) -> dict[str, Any]:
        """Rebalance now: on the load the replicas reported, or on `load` ((MoE layers,
        experts) token counts); the report's fields."""
        report = self.supervisor.rebalance_now(load, threshold)
        return dict(vars(report))

    def check(self) -> None:
        """One supervisor round now (tests)."""
        self.supervisor.check()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        stats = self.supervisor.stats
        with self._cond:
            replicas = {
                r: {"version": s.version, "seen_s_ago": round(now - s.last_seen, 2)}
                for r, s in self._replicas.items()
            }
        return {
            "pool": self.pool_name,
            "version": self.version,
            "replicas": replicas,
            "nodes": self._published.nodes,
            "generations": dict(self.generations),
            "shard_processes": len(self.shards.handles) + len(self.shards.standbys),
            "out_of_service": sorted(self.supervisor.removed),
            "restarts": stats.restarts,
            "nodes_replaced": stats.nodes_replaced,
            "drains": stats.drains,
            "rejoins": stats.rejoins,
            "rebalances": stats.rebalances,
            "dispatch_conditions": {
                f"{mode}:{target}": sorted(seen)
                for (mode, target), seen in self.conditions.active().items()
            },
            "restarted": self.restarted,
        }

    def shards_now(self) -> dict[str, Any]:
        """node -> the serving shard's actor handle (fault injection, benchmarks); a drained
        node's stopped shard is not one."""
        return self._serving_handles()

    def events(self) -> list[FaultEvent]:
        return list(self._events.kept)

    def expert_bytes(self) -> dict[str, int]:
        """Bytes of expert weights each serving shard holds (from the shards themselves)."""
        return shard_expert_bytes(self.config, self._serving_handles())

    def _serving_handles(self) -> dict[str, Any]:
        removed = self.supervisor.removed
        return {n: h for n, h in self.shards.handles.items() if n not in removed}

    def down(self) -> int:
        """Stop every shard and standby and forget the pool's state; the shards stopped.
        The caller then kills this actor (`pool_down`)."""
        from ray.experimental import internal_kv

        self.supervisor.stop()
        stopped = self._stop_shards()
        internal_kv._internal_kv_del(STATE_KEY, namespace=self.namespace)
        return stopped

    def _stop_shards(self) -> int:
        """Kill every shard actor of the namespace (started by any incarnation)."""
        ray = self._ray
        stopped = 0
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != self.namespace or not entry["name"].startswith(SHARD_PREFIX):
                continue
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=self.namespace), no_restart=True)
                stopped += 1
            except Exception:  # already gone
                continue
        return stopped


def shard_expert_bytes(config: Any, handles: Mapping[str, Any]) -> dict[str, int]:
    """node -> bytes of the expert weights its shard holds: experts x (gate, up, down) x
    hidden x expert intermediate x the shard's element size, from each shard's status."""
    import ray
    import torch

    statuses = ray.get([h.status.remote() for h in handles.values()])
    per_expert = 3 * config.hidden_size * config.moe.expert_intermediate
    out = {}
    for node, status in zip(handles, statuses, strict=True):
        dtype = getattr(torch, str(status.extra.get("dtype", "float32")))
        size = torch.empty((), dtype=dtype).element_size()
        out[node] = sum(len(ids) for ids in status.experts.values()) * per_expert * size
    return out
