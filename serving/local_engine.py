"""`ExpertMeshEngine`: our MoE model (one process, or expert-parallel on the cluster) behind the
`Engine` protocol, with the continuous-batching scheduler of `scheduler.py`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from expertmesh.models.checkpoint import load_model
from expertmesh.models.errors import ModelError
from expertmesh.models.generate import StreamEvent
from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .config import SupervisorSpec
from .engine import (
    DeadlineExceeded,
    EngineDead,
    EngineHealth,
    EngineOutput,
    EngineRequest,
    InvalidRequest,
    ModelCard,
    Overloaded,
    UnknownModel,
)
from .scheduler import ContinuousBatcher, SchedulerConfig, SchedulerEvent


def _merge(a: SchedulerEvent, b: SchedulerEvent) -> SchedulerEvent:
    """Two consecutive stream events of one request as one (b's counts and finish reason)."""
    assert a.event is not None and b.event is not None
    event = StreamEvent(
        b.event.index, b.event.token_id, a.event.text + b.event.text, b.event.finish_reason
    )
    return SchedulerEvent(event, b.prompt_tokens, b.completion_tokens, b.finish_reason)


class _Outbox:
    """Outputs from the engine thread to one event loop: one wake-up of the loop carries
    every output that came while it was busy (a step of 32 requests wakes it once, not 32
    times; each `call_soon_threadsafe` is a pipe write and a GIL hand-over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue[SchedulerEvent], SchedulerEvent]] = deque()
        self.scheduled = False
        self.settled = threading.Event()
        """Set once the loop delivered everything put and ran the streams it woke."""
        self.settled.set()

    def put(self, queue: asyncio.Queue[SchedulerEvent], event: SchedulerEvent) -> None:
        """On the engine thread."""
        self.items.append((queue, event))
        if not self.scheduled:
            self.scheduled = True
            self.settled.clear()
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        """On the loop: hand out everything queued (an item put while this runs either is
        taken here or scheduled another delivery: `scheduled` is cleared first)."""
        self.scheduled = False
        while self.items:
            queue, event = self.items.popleft()
            queue.put_nowait(event)
        # Runs after the streams this woke (their wake-ups are ahead of it in the ready queue).
        self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        if not self.scheduled:
            self.settled.set()


_COUNTED_KEPT = 1024
"""Counted prompts kept for their `generate` call (a refused request never comes back)."""


def _prompt_key(request: EngineRequest) -> object:
    return request.prompt if request.messages is None else request.messages


def _pool_fields(
    dtype: str,
    embedded: bool,
    telemetry_config: dict[str, Any] | None,
    spec: SupervisorSpec | None,
    log_dir: str | Path | None,
) -> dict[str, Any]:
    """`PoolSpec` fields for a shared expert pool this replica may have to start."""
    from expertmesh.cluster.supervisor import SupervisorConfig
    from expertmesh.observability.logs import default_log_dir

    spec = spec or SupervisorSpec()
    config = SupervisorConfig(
        check_interval_s=spec.check_interval_s,
        ping_timeout_s=spec.ping_timeout_s,
        node_lost_after_s=spec.node_lost_after_s,
        rebalance_every_s=spec.rebalance_every_s if spec.enabled else 0.0,
        drain_when_ray_drains=spec.drain_when_ray_drains,
        rejoin_lost_nodes=spec.rejoin_lost_nodes,
    )
    directory = Path(log_dir) if log_dir is not None else default_log_dir()
    return {
        "dtype": dtype,
        "emulate": embedded,
        "telemetry": telemetry_config,
        "supervisor": config,
        "rebalance_threshold": spec.rebalance_threshold,
        "rebalance_min_tokens": spec.rebalance_min_tokens,
        "events_path": str(directory / "events.jsonl"),
    }


class ExpertMeshEngine:
    """Serves one model under `name`. Owns the scheduler thread; `shutdown` stops it (and the
    expert-parallel cluster, when it started one)."""

    def __init__(
        self,
        name: str,
        model: MoEModel,
        tokenizer: Tokenizer,
        scheduler: SchedulerConfig | None = None,
        kv_mode: str | None = None,
        owner: Any = None,
        tracer: Any = None,
        meter: Any = None,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.batcher = ContinuousBatcher(model, tokenizer, scheduler, kv_mode, tracer)  # type: ignore[arg-type]
        self.owner = owner
        if meter is not None:
            from .engine_metrics import EngineMetrics

            dispatcher = getattr(owner, "dispatcher", None)
            self.batcher.observer = EngineMetrics(
                meter, self.batcher, dispatcher, out_of_service=self._out_of_service
            )
        self._counter = 0
        self._counted: OrderedDict[str, tuple[object, list[int]]] = OrderedDict()
        """request id -> (its prompt, its ids) from `count_prompt_tokens`, for `generate`."""
        self.supervisor: Any = None
        self.kv_pressure: Any = None
        """`engine_detect.KvPressure` once `supervise` gave the engine an event log."""
        self._events: Any = None
        self._outboxes: tuple[_Outbox, ...] = ()
        """One per event loop that asked (a replica has one or two): the engine thread's
        outputs on their way to the requests' queues. Replaced whole, never mutated, so the
        engine thread can walk it while a loop adds its own."""
        if self.batcher.config.pace_delivery_s > 0:
            self.batcher.after_step_hook = self._await_delivery
        self.batcher.start()

    @classmethod
    def load(
        cls,
        name: str,
        checkpoint: str | Path,
        scheduler: SchedulerConfig | None = None,
        kv_mode: str | None = None,
        topology: str | Path | None = None,
        dtype: str = "float32",
        embedded: bool = False,
        telemetry: Any = None,
        telemetry_config: dict[str, Any] | None = None,
        supervisor: SupervisorSpec | None = None,
        log_dir: str | Path | None = None,
        expert_pool: str | None = None,
    ) -> ExpertMeshEngine:
        """Load a checkpoint in this process, or (with `topology`) place its experts on an
        expert-parallel cluster: a running Ray cluster with the topology's node resources, or
        the embedded one when this process is not connected to Ray."""
        tokenizer = Tokenizer.from_dir(checkpoint)
        tracer = telemetry.tracer if telemetry is not None else None
        meter = telemetry.meter if telemetry is not None else None
        if topology is None:
            model = load_model(checkpoint, dtype)
            return cls(name, model, tokenizer, scheduler, kv_mode, None, tracer, meter)
        import ray

        from expertmesh.cluster.runtime import ExpertParallelModel
        from expertmesh.cluster.topology import load_topology

        local = not ray.is_initialized()
        layout = load_topology(topology)
        if expert_pool is not None:  # the pool's controller supervises, not this replica
            from expertmesh.cluster.pool_attachment import attach_pool

            ep = attach_pool(
                expert_pool,
                checkpoint,
                layout,
                tracer=tracer,
                **_pool_fields(dtype, embedded, telemetry_config, supervisor, log_dir),
            )
            return cls(name, ep.model, tokenizer, scheduler, kv_mode, ep, tracer, meter)
        ep = ExpertParallelModel.launch(
            checkpoint,
            layout,
            dtype=dtype,
            local=local,
            emulate=local or embedded,
            tracer=tracer,
            telemetry_config=telemetry_config,
        )
        engine = cls(name, ep.model, tokenizer, scheduler, kv_mode, ep, tracer, meter)
        if supervisor is not None and supervisor.enabled:
            engine.supervise(ep, layout, supervisor, log_dir, tracer)
        return engine

    def supervise(
        self,
        ep: Any,
        topology: Any,
        spec: SupervisorSpec,
        log_dir: str | Path | None = None,
        tracer: Any = None,
        events: Any = None,
    ) -> Any:
        """Start the cluster's supervisor (recovery, rejoin, rebalancing); its fault events go
        to `events` (an `EventLog`, the caller's to close), else to `<log_dir>/events.jsonl`.
        `shutdown` stops it."""
        from expertmesh.cluster.rebalance import Rebalancer
        from expertmesh.cluster.supervisor import Supervisor, SupervisorConfig
        from expertmesh.observability.events import EventLog, SourcedEvents
        from expertmesh.observability.logs import default_log_dir

        if events is None:
            directory = Path(log_dir) if log_dir is not None else default_log_dir()
            directory.mkdir(parents=True, exist_ok=True)
            events = self._events = EventLog(directory / "events.jsonl")
        from .engine_detect import SOURCE, KvPressure

        self.kv_pressure = KvPressure(SourcedEvents(events, SOURCE), self.batcher)
        rebalancer = None
        if spec.rebalance_every_s > 0:
            rebalancer = Rebalancer(
                ep, topology, spec.rebalance_threshold, spec.rebalance_min_tokens
            )
        config = SupervisorConfig(
            check_interval_s=spec.check_interval_s,
            ping_timeout_s=spec.ping_timeout_s,
            node_lost_after_s=spec.node_lost_after_s,
            rebalance_every_s=spec.rebalance_every_s,
            drain_when_ray_drains=spec.drain_when_ray_drains,
            rejoin_lost_nodes=spec.rejoin_lost_nodes,
        )
        self.supervisor = Supervisor(
            ep,
            topology,
            config,
            events=events,
            tracer=tracer,
            rebalancer=rebalancer,
            engine_health=self._engine_health,
        ).start()
        return self.supervisor

    def _engine_health(self) -> bool:
        """The supervisor's engine round: KV pressure, then the progress heartbeat."""
        if self.kv_pressure is not None:
            self.kv_pressure.check()
        return self.health().healthy

    def _out_of_service(self) -> int:
        attachment = getattr(self.owner, "attachment", None)  # a shared pool's controller
        if attachment is not None:
            return len(attachment.out_of_service)
        return len(self.supervisor.removed) if self.supervisor is not None else 0

    def _outbox(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        for outbox in self._outboxes:
            if outbox.loop is loop:
                return outbox
        outbox = _Outbox(loop)
        self._outboxes = (*self._outboxes, outbox)
        return outbox

    def _await_delivery(self) -> None:
        """On the engine thread, after a step: wait (at most `pace_delivery_s`) until the
        event loops handed the step's outputs to their streams."""
        timeout = self.batcher.config.pace_delivery_s
        for outbox in self._outboxes:
            outbox.settled.wait(timeout)

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, self.batcher.context_window)]

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """Exact prompt tokens as the model will see them; the ids are kept for the `generate`
        call with the same request id and text, so the prompt is tokenised once."""
        ids = self.prompt_ids(request)
        self._counted[request.request_id] = (_prompt_key(request), ids)
        while len(self._counted) > _COUNTED_KEPT:  # counted, then refused: never generated
            self._counted.popitem(last=False)
        return len(ids)

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        counted = self._counted.pop(request.request_id, None)
        if counted is not None and counted[0] == _prompt_key(request):
            return counted[1]
        if request.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in request.messages]
                )
            except ModelError as e:
                raise InvalidRequest(str(e), param="messages") from e
        else:
            assert request.prompt is not None
            text = request.prompt
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        return ids

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if request.model != self.name:
            raise UnknownModel(f"model {request.model!r} is not served here; try {self.name!r}")
        if not self.batcher.alive:
            raise EngineDead(f"the engine loop is not running ({self.batcher.fatal!r})")
        ids = self.prompt_ids(request)
        outbox = self._outbox(asyncio.get_running_loop())
        queue: asyncio.Queue[SchedulerEvent] = asyncio.Queue()

        interval = self.batcher.config.stream_interval
        held: list[SchedulerEvent] = []

        def sink(event: SchedulerEvent) -> None:  # on the engine thread
            if event.event is not None and event.error is None:
                if held:
                    event = _merge(held.pop(), event)
                if (
                    event.finish_reason is None
                    and event.completion_tokens > 1
                    and (event.completion_tokens - 1) % interval
                ):
                    held.append(event)  # the next token(s) go with it
                    return
            elif held:  # ended without an event (cancelled, deadline, error): text first
                outbox.put(queue, held.pop())
            outbox.put(queue, event)

        from opentelemetry import context as otel_context

        try:
            self.batcher.submit(
                request.request_id,
                ids,
                request.params,
                sink,
                request.deadline_s,
                parent=otel_context.get_current(),
            )
        except Overloaded:
            if self.kv_pressure is not None:
                self.kv_pressure.refused()
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                # A consumer that fell behind gets what piled up as one output (fewer SSE
                # events through the proxy under load; the same text and counts).
                while not queue.empty() and item.event is not None and item.error is None:
                    if item.event.finish_reason is not None:
                        break
                    nxt = queue.get_nowait()
                    if nxt.event is None or nxt.error is not None:
                        queue.put_nowait(nxt)  # keep order: handled on the next turn
                        break
                    item = _merge(item, nxt)
                if item.error is not None:
                    finished = True
                    raise EngineDead(f"the engine failed: {item.error!r}") from item.error
                if item.event is None:  # ended by the scheduler: cancelled or deadline
                    finished = True
                    if item.finish_reason == "deadline":
                        raise DeadlineExceeded(
                            f"request {request.request_id} passed its deadline after "
                            f"{item.completion_tokens} tokens"
                        )
                    return
                finish = item.event.finish_reason
                yield EngineOutput(
                    item.event.text, finish, item.prompt_tokens, item.completion_tokens
                )
                if finish is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer stopped early (client disconnected)
                self.batcher.cancel(request.request_id)

    def health(self) -> EngineHealth:
        running, waiting = self.batcher.counts()
        age = time.monotonic() - self.batcher.last_progress
        if not self.batcher.alive:
            return EngineHealth(
                False, f"engine loop dead: {self.batcher.fatal!r}", running, waiting, age
            )
        if self.batcher.stalled():
            return EngineHealth(
                False,
                f"engine loop stalled: no progress for {age:.1f} s with {running + waiting} requests",
                running,
                waiting,
                age,
            )
        extra = self.batcher.describe()
        placement = getattr(self.owner, "placement", None)
        if placement is not None:
            extra["experts_per_node"] = {n: len(placement.experts_on(n)) for n in placement.nodes}
        if self.supervisor is not None:
            stats = self.supervisor.stats
            extra["supervisor"] = {
                "restarts": stats.restarts,
                "nodes_replaced": stats.nodes_replaced,
                "rejoins": stats.rejoins,
                "rebalances": stats.rebalances,
                "out_of_service": sorted(self.supervisor.removed),
            }
        attachment = getattr(self.owner, "attachment", None)
        if attachment is not None:  # the pool's controller supervises; what it published
            extra["expert_pool"] = {
                "pool": getattr(self.owner, "pool_name", None),
                "version": attachment.version,
                "out_of_service": list(attachment.out_of_service),
                "dispatch_detections": attachment.detectors.detections,
            }
        return EngineHealth(True, "ok", running, waiting, age, extra)

    async def shutdown(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self._events is not None:
            self._events.close()
        self.batcher.stop()
        if self.owner is not None:
            with contextlib.suppress(Exception):
                self.owner.shutdown()
