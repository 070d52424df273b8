"""The supervisor: keeps the expert-parallel model serving through failures, without losing a
request and without changing an output.

A thread checks every `check_interval_s` (and at once when the dispatcher reports a failed
call):

- **shard heartbeats**: each shard answers a ping within `ping_timeout_s`. A shard that does
  not is *lost*: the supervisor asks Ray's restarted actor to reload its experts (`recover`:
  restart and reload). The dispatcher meanwhile sends the shard's tokens to other replicas,
  or holds the step until the shard is back; it never skips an expert.
- **node loss**: a shard whose Ray node is reported dead (no live Ray node offers the node's
  pinning resource: GCS health checks noticed, in about 2 s on the embedded cluster), or that
  is not back `node_lost_after_s` after it died, had its node taken away. Its experts are
  re-placed on the surviving nodes (`placement.plan_increment` without that node: the fewest
  bytes move), loaded there, and the routing table swapped; a step waiting on the lost shard
  adopts the new table at once.
- **drain** (`drain(node)`, planned): the same re-placement before the node goes, then the
  shard is stopped; no request ever waits. A node Ray marks draining (`ray drain-node`,
  KubeRay's autoscaler before a scale-down or preemption) is drained the same way, unasked.
- **rejoin**: a lost or Ray-drained node whose resource a *new* Ray node offers (KubeRay
  recreated the pod) gets a fresh shard, and the increment planner may move experts back;
  `rejoin(node)` does it on request for a node drained by `drain`.
- **load drift**: every `rebalance_every_s` the rebalancer checks the observed expert load
  and moves experts when the predicted imbalance passes its threshold.
- **engine stall**: an optional `engine_health()` callback (the serving scheduler's progress
  heartbeat); a stall is reported (Ray Serve's health check replaces the replica).

Every detection and action is a `FaultEvent` (for `expertmesh fmea`) and a span.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from expertmesh.observability.detectors import Condition
from expertmesh.observability.events import (
    ENGINE_STALLED,
    EXPERT_SHARD_LOST,
    HEAD_FAILURE,
    NODE_DRAINED,
    NODE_LOST,
    ROUTER_IMBALANCE,
    WEIGHTS_CORRUPT,
    FaultEvent,
    SourcedEvents,
)

from . import ray_nodes
from .detect import DispatchDetectors
from .dispatch import RoutingTable, ShardLost
from .placement import PlacementOptions, plan_increment
from .planning import expert_shape, node_capacities
from .runtime import ExpertParallelModel, routes_from_placement
from .topology import Topology

log = logging.getLogger("expertmesh.supervisor")


@dataclass(frozen=True)
class SupervisorConfig:
    check_interval_s: float = 0.2
    ping_timeout_s: float = 0.5
    node_lost_after_s: float = 5.0
    """A shard not back this long after it died: treat its node as lost and re-place."""
    rebalance_every_s: float = 0.0
    """0 disables periodic rebalancing."""
    drain_when_ray_drains: bool = True
    """Move a node's experts off as soon as Ray marks its node draining (`ray drain-node`, or
    KubeRay's autoscaler before a scale-down or a preemption): every replica's supervisor sees
    it, and the node rejoins when a new Ray node offers its resource."""
    rejoin_lost_nodes: bool = True
    """Take a lost node back when a new Ray node offers its resource (KubeRay recreated the
    pod, or the machine came back)."""
    rejoin_timeout_s: float = 60.0
    """How long a returning node's new shard may take to start (a process importing torch)."""
    rejoin_retry_s: float = 5.0
    """Wait this long before trying a failed rejoin again."""


@dataclass
class _Shard:
    failing_since: float | None = None
    incident: int = 0
    node_lost_reported: bool = False
    """This incident's node loss was reported (a re-placement that fails is retried each round,
    reported once)."""


@dataclass
class SupervisorStats:
    restarts: int = 0
    nodes_replaced: int = 0
    drains: int = 0
    rejoins: int = 0
    rebalances: int = 0
    recovery_s: list[float] = field(default_factory=list)
    """Seconds from detection to serving again, per recovered shard or node."""


class Supervisor:
    def __init__(
        self,
        ep: ExpertParallelModel,
        topology: Topology,
        config: SupervisorConfig | None = None,
        events: Any = None,
        tracer: Any = None,
        rebalancer: Any = None,
        engine_health: Callable[[], bool] | None = None,
    ) -> None:
        self.ep = ep
        self.topology = topology
        self.config = config or SupervisorConfig()
        self.events = events
        """Anything with `emit(FaultEvent)` (observability.events.EventLog), or None."""
        self.tracer = tracer
        self.rebalancer = rebalancer
        self.engine_health = engine_health
        self.stats = SupervisorStats()
        self.shape = expert_shape(ep.config)
        self.removed: set[str] = set()
        """Nodes whose experts were moved away (lost or drained); `rejoin` takes one back."""
        self.lost: dict[str, frozenset[str]] = {}
        """Lost nodes -> the Ray node ids that still offered their resource when they were
        declared lost (empty when Ray reported them dead). Only a *new* Ray node offering the
        resource brings a node back, so a raylet whose shard keeps failing does not flap."""
        self._next_rejoin: dict[str, float] = {}
        self._draining_unreadable = False
        self._removed_as: dict[str, str] = {}
        self._rejoin_failed: set[str] = set()
        self._shards: dict[str, _Shard] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one repair at a time
        self._last_rebalance = time.monotonic()
        self._stalled = False
        ep.dispatcher.on_failure = self._on_dispatch_failure
        platform = SourcedEvents(events, "cluster.supervisor") if events is not None else None
        self._head = Condition(platform, HEAD_FAILURE, "ray-head", "cluster.supervisor")
        self._imbalance = Condition(platform, ROUTER_IMBALANCE, "placement", "cluster.supervisor")
        self.detectors = DispatchDetectors(
            SourcedEvents(events, "cluster.dispatch") if events is not None else None
        )
        """Link and node-slowness detectors on every dispatch reply (`cluster/detect.py`)."""
        ep.dispatcher.observers.append(self.detectors)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Supervisor:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name="expertmesh-supervisor", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.detectors in self.ep.dispatcher.observers:
            self.ep.dispatcher.observers.remove(self.detectors)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _on_dispatch_failure(self, node: str, reason: str) -> None:
        """A request's call to `node` failed: that is the detection (the dispatcher may
        recover the shard itself before the next check)."""
        state = self._shards.setdefault(node, _Shard())
        if state.failing_since is None:
            state.failing_since = time.monotonic()
            state.incident += 1
            self._emit("detected", EXPERT_SHARD_LOST, node, f"dispatch failed: {reason}", state)
        self._wake.set()  # check now, not at the next tick

    def _loop(self) -> None:
        last_error: str | None = None
        while not self._stop.is_set():
            self._wake.wait(self.config.check_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.check()
                last_error = None
            except Exception as e:  # the supervisor must outlive what it supervises
                if repr(e) != last_error:  # retried every round, reported once
                    last_error = repr(e)
                    log.exception("supervisor check failed; retrying every round")
                    self._emit("detected", EXPERT_SHARD_LOST, "supervisor", f"check failed: {e!r}")

    # ----------------------------------------------------------------- checks

    def check(self) -> None:
        """One round of every check (public: tests and the chaos runner call it directly)."""
        with self._lock:
            for node in list(self.ep.dispatcher.table.nodes):
                if node not in self.removed:
                    self._check_shard(node)
            self._check_draining()
            self._check_rejoins()
            self._check_engine()
            self._maybe_rebalance()

    def _check_shard(self, node: str) -> None:
        state = self._shards.setdefault(node, _Shard())
        now = time.monotonic()
        if self._alive(node):
            if state.failing_since is not None:  # back: a standby promoted or a Ray restart
                self.stats.restarts += 1
                self._emit("action", EXPERT_SHARD_LOST, node, "replaced and reloaded", state)
                self._recovered(node, state, EXPERT_SHARD_LOST, "serving again")
            return
        if state.failing_since is None:
            state.failing_since = now
            state.incident += 1
            self._emit("detected", EXPERT_SHARD_LOST, node, "shard does not answer", state)
        offering = self._offering(node)  # None: no Ray to ask; empty: no live Ray node has it
        if offering == set():
            why = "Ray reports its node dead"
        elif now - state.failing_since > self.config.node_lost_after_s:
            why = f"shard not back after {self.config.node_lost_after_s:g} s; node presumed lost"
        else:
            why = ""
        if why:
            if not state.node_lost_reported:
                state.node_lost_reported = True
                self._emit("detected", NODE_LOST, node, why, state)
            self.replace_node(node, NODE_LOST)
            self.lost[node] = frozenset(offering or ())
            self._recovered(node, state, NODE_LOST, "experts re-placed on surviving nodes")
            return
        experts = self.ep.dispatcher.table.node_experts().get(node, {})
        with self._span("expertmesh.supervisor.restart_shard", node):
            try:
                self.ep.pool.recover(node, experts, self.config.ping_timeout_s)
            except ShardLost:
                return  # not back yet; next round
        self.ep.dispatcher.dead.discard(node)
        self.stats.restarts += 1
        self._emit("action", EXPERT_SHARD_LOST, node, "restart and reload", state)
        self._recovered(node, state, EXPERT_SHARD_LOST, "serving again")

    def _alive(self, node: str) -> bool:
        handle = getattr(self.ep.pool, "handles", {}).get(node)
        if handle is None:  # an in-process pool: ask it
            return node not in getattr(self.ep.pool, "dead", set())
        import ray

        try:
            return ray.get(handle.ping.remote(), timeout=self.config.ping_timeout_s) == node
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
        except ray.exceptions.ActorUnavailableError:
            return False

    def _offering_all(self) -> dict[str, set[str]] | None:
        """Topology node -> ids of the live Ray nodes offering its pinning resource (one GCS
        call); None when there is no Ray cluster to ask (an in-process pool) or the GCS does
        not answer."""
        if not getattr(self.ep.pool, "handles", None):
            return None
        import ray

        try:
            infos = ray.nodes()
        except Exception as e:  # the GCS itself unreachable: not evidence against any node
            self._head.update(True, f"GCS does not answer: {e!r}"[:200])
            return None
        self._head.update(False, "GCS answers again")
        return ray_nodes.offering([n.name for n in self.topology.nodes], infos)

    def _offering(self, node: str) -> set[str] | None:
        offering = self._offering_all()
        return None if offering is None else offering.get(node, set())

    def _draining(self) -> dict[str, int]:
        """Ray node id -> drain deadline (Unix ms, 0 for none) of the nodes Ray is draining."""
        if not self.config.drain_when_ray_drains or not getattr(self.ep.pool, "handles", None):
            return {}
        try:
            return ray_nodes.draining_ray_nodes()
        except Exception as e:
            if not self._draining_unreadable:
                self._draining_unreadable = True
                log.warning("cannot read the nodes Ray is draining: %r", e)
            return {}

    def _check_draining(self) -> None:
        draining = self._draining()
        if not draining:
            return
        offering_all = self._offering_all() or {}
        for node in sorted({n.name for n in self.topology.nodes} - self.removed):
            offering = offering_all.get(node)
            if not offering or not offering <= draining.keys():
                continue
            left = ray_nodes.deadline_in_s(max(draining[i] for i in offering))
            why = "Ray is draining its node"
            if left is not None:
                why += f" (deadline in {left:.0f} s)"
            self._drain(node, why)
            self.lost[node] = frozenset(offering)  # back when a new Ray node offers it

    def _check_rejoins(self) -> None:
        if not self.config.rejoin_lost_nodes:
            return
        now = time.monotonic()
        due = [n for n in self.lost if now >= self._next_rejoin.get(n, 0.0)]
        offering_all = self._offering_all() if due else None
        for node in due:
            offering = (offering_all or {}).get(node)
            if not offering or offering <= self.lost[node]:
                continue
            try:
                self._rejoin(node)
            except Exception as e:  # retried every rejoin_retry_s, reported once
                self._next_rejoin[node] = now + self.config.rejoin_retry_s
                log.warning("node %s is back but could not rejoin: %r", node, e)
                if node not in self._rejoin_failed:
                    self._rejoin_failed.add(node)
                    self._emit("detected", NODE_LOST, node, f"rejoin failed: {e!r}"[:200])

    def _recovered(self, node: str, state: _Shard, mode: str, detail: str) -> None:
        if state.failing_since is not None:
            self.stats.recovery_s.append(time.monotonic() - state.failing_since)
        state.failing_since = None
        state.node_lost_reported = False
        self._emit("recovered", mode, node, detail, state)

    def _check_engine(self) -> None:
        if self.engine_health is None:
            return
        healthy = self.engine_health()
        if not healthy and not self._stalled:
            self._emit("detected", ENGINE_STALLED, "engine", "no progress with work held")
        elif healthy and self._stalled:
            self._emit("recovered", ENGINE_STALLED, "engine", "progress again")
        self._stalled = not healthy

    def _maybe_rebalance(self) -> None:
        every = self.config.rebalance_every_s
        if self.rebalancer is None or every <= 0 or time.monotonic() - self._last_rebalance < every:
            return
        self._last_rebalance = time.monotonic()
        report = self.rebalancer.check(exclude=self.removed)
        if report.triggered:  # reported once per incident, until the load fits again
            self._imbalance.update(True, f"predicted imbalance {report.balancedness_before:.2f}")
        if report.applied:
            self.stats.rebalances += 1
            self._emit("action", ROUTER_IMBALANCE, "placement", f"moved {report.moves} replicas")
            self._imbalance.update(False, "rebalanced")
        elif not report.triggered:
            self._imbalance.update(False, f"balanced ({report.balancedness_before:.2f})")

    # ----------------------------------------------------------------- actions

    def replace_node(self, node: str, mode: str = NODE_LOST) -> None:
        """Re-place `node`'s experts on the other nodes (fewest bytes), then swap the table."""
        with self._span("expertmesh.supervisor.replace_node", node):
            members = {n.name for n in self.topology.nodes} - self.removed - {node}
            moves, adds = self._replan(members)
            self.removed.add(node)
            self._removed_as[node] = mode
            self.stats.nodes_replaced += 1
            self._emit("action", mode, node, f"re-placed {len(moves)} replicas on {sorted(adds)}")

    def rejoin(self, node: str) -> float:
        """Take back a drained or lost node whose Ray node is up again: start its shard, plan
        an increment that may move experts onto it (fewest bytes), load them, swap the table.
        Seconds taken. Lost nodes rejoin on their own (`rejoin_lost_nodes`)."""
        if node not in self.removed:
            raise ValueError(f"node {node!r} is serving; only a drained or lost node can rejoin")
        t0 = time.monotonic()
        with self._lock:
            self._rejoin(node)
        return time.monotonic() - t0

    def _rejoin(self, node: str) -> None:
        mode = self._removed_as.get(node, NODE_LOST)
        with self._span("expertmesh.supervisor.rejoin_node", node):
            self.ep.pool.add_node(node, self.config.rejoin_timeout_s)  # type: ignore[attr-defined]
            members = {n.name for n in self.topology.nodes} - self.removed | {node}
            moves, _ = self._replan(members)
            self.removed.discard(node)
            self.lost.pop(node, None)
            self._removed_as.pop(node, None)
            self._next_rejoin.pop(node, None)
            self._rejoin_failed.discard(node)
            self._shards[node] = _Shard()
            self.ep.dispatcher.dead.discard(node)
            self.stats.rejoins += 1
            onto = sum(1 for m in moves if m.dst == node)
            self._emit("action", mode, node, f"rejoined; {onto} replicas moved onto it")

    def _replan(self, members: set[str]) -> tuple[list[Any], dict[str, dict[int, list[int]]]]:
        """Plan an increment over `members`, load what moves, swap the routing table."""
        layer_ids = self.ep.config.moe_layer_ids
        nodes = [c for c in node_capacities(self.topology, self.shape) if c.name in members]
        options = getattr(self.ep, "plan_options", None) or PlacementOptions()
        current = self.ep.placement.by_index(layer_ids)
        new, moves = plan_increment(current, nodes, self.shape, self._load(), options)
        new = new.with_layer_ids(layer_ids)
        adds: dict[str, dict[int, list[int]]] = {}
        for m in moves:
            if m.dst is not None:
                adds.setdefault(m.dst, {}).setdefault(layer_ids[m.layer], []).append(m.expert)
        self.load_replicas(adds)
        self.ep.dispatcher.swap_table(RoutingTable(routes_from_placement(new)))
        self.ep.placement = new
        return moves, adds

    def load_replicas(self, adds: dict[str, dict[int, list[int]]]) -> None:
        """Load new replicas (`{node: {layer: [expert]}}`) onto their shards; a checkpoint
        that cannot be read is reported as `weights_corrupt` before the error propagates
        (nothing is swapped: serving goes on from the weights in memory)."""
        try:
            self.ep.pool.load_many(adds)  # type: ignore[attr-defined]
        except Exception as e:
            if _is_checkpoint_error(e):
                target = ",".join(sorted(adds)) or "checkpoint"
                self._emit("detected", WEIGHTS_CORRUPT, target, f"replica load failed: {e!r}"[:200])
            raise

    def drain(self, node: str) -> float:
        """Planned removal of a node: move its experts, then stop its shard. Seconds taken."""
        t0 = time.monotonic()
        with self._lock:
            self._drain(node, "drain requested")
        return time.monotonic() - t0

    def _drain(self, node: str, why: str) -> None:
        self._emit("detected", NODE_DRAINED, node, why)
        self.replace_node(node, NODE_DRAINED)
        pool: Any = self.ep.pool
        handles = [getattr(pool, "handles", {}).get(node)]
        handles.append(getattr(pool, "standbys", {}).pop(node, None))
        for handle in handles:
            if handle is not None:
                import ray

                ray.kill(handle, no_restart=True)
        self.stats.drains += 1
        self._emit("recovered", NODE_DRAINED, node, "drained")

    def _load(self) -> Any:
        import numpy as np

        tokens = self.ep.dispatcher.stats.tokens
        layers = self.ep.config.moe_layer_ids
        if any(layer not in tokens for layer in layers):
            return None
        return np.stack([tokens[layer] for layer in layers]).astype(float) + 1.0

    # ----------------------------------------------------------------- events

    def _emit(
        self, kind: str, mode: str, target: str, detail: str, state: _Shard | None = None
    ) -> None:
        if self.events is not None:
            self.events.emit(
                FaultEvent(kind, mode, target=target, detail=detail, source="cluster.supervisor")  # type: ignore[arg-type]
            )
        if self.tracer is not None:
            with self.tracer.start_as_current_span(
                f"expertmesh.supervisor.{kind}",
                attributes={
                    "expertmesh.failure_mode": mode,
                    "expertmesh.target": target,
                    "expertmesh.detail": detail,
                },
            ):
                pass

    def _span(self, name: str, node: str) -> Any:
        import contextlib

        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes={"expertmesh.node": node})


def _is_checkpoint_error(error: BaseException) -> bool:
    """A weights file that does not parse (`CheckpointError` from the models package),
    possibly wrapped by Ray (`RayTaskError` keeps the cause and its text)."""
    from expertmesh.models.errors import CheckpointError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, CheckpointError):
            return True
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return "CheckpointError" in repr(error)
