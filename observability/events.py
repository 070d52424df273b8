"""Fault and recovery events: what the chaos runner injected and what the platform's own
detectors saw and did, one JSON object per line, for `expertmesh fmea` to pair up and score.

    events = EventLog("events.jsonl", scenario="kill-shard")
    events.emit(FaultEvent("fault", EXPERT_SHARD_LOST, target="shard-3", source=CHAOS))
    events.emit(FaultEvent("detected", EXPERT_SHARD_LOST, target="shard-3",
                           source="cluster.supervisor", attributes={"signal": "actor_death"}))
    events.emit(FaultEvent("action", EXPERT_SHARD_LOST, target="shard-3",
                           source="cluster.supervisor", detail="restart and reload"))
    events.emit(FaultEvent("recovered", EXPERT_SHARD_LOST, target="shard-3",
                           source="cluster.supervisor"))
    events.close()
    read_events("events.jsonl")   # -> [FaultEvent, ...] in file order

Every event names its `source`, the component that emitted it (`cluster.dispatch`,
`cluster.supervisor`, `serving.engine`, `routing.budget`, `policies.source`, ...). The fault
injector (`source="chaos"`) emits only `fault` (it broke something) and `restored` (it
stopped breaking it); a `detected`, `action` or `recovered` from it is refused when the event
is built, so a chaos run's detection column is written by the platform, never the injector.

An incident is one `fault` and the `detected`, `action`, `restored` and `recovered` events
that follow it for the same failure mode (and target, or `incident` id when the emitter knows
one); see `fmea.pair_incidents`. A `detected` event with no `fault` before it is an incident
nobody injected (a real failure, or in a chaos run a false positive). `request_lost` counts
lost requests (`attributes["count"]`, default 1) against a failure mode.

The failure modes are a fixed vocabulary, one runbook each (`docs/runbooks/<mode>.md`); an
unknown mode is an error when the event is built, so a typo never reaches the file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, get_args

from .errors import TelemetryError
from .jsonl_exporter import _AppendOnlyFile, read_records

EXPERT_SHARD_LOST = "expert_shard_lost"
"""An expert-shard actor died or stopped answering; its experts are unreachable until a replica
takes over or the shard is restarted and reloaded."""
NODE_LOST = "node_lost"
"""A Ray node vanished without warning (power, network, kernel); every actor on it is gone."""
NODE_DRAINED = "node_drained"
"""A node was taken out of service on purpose; its shards move before it goes."""
LINK_DEGRADED = "link_degraded"
"""A link between nodes slowed down or loses packets; expert dispatch over it is late."""
ROUTER_IMBALANCE = "router_imbalance"
"""The router sends far more tokens to some experts than to others (hot experts, drift)."""
KV_CACHE_EXHAUSTED = "kv_cache_exhausted"
"""No KV-cache blocks left: new requests wait or running ones are preempted."""
ENGINE_STALLED = "engine_stalled"
"""An engine's loop stopped making progress while its process is alive."""
BUDGET_EXHAUSTED = "budget_exhausted"
"""A tenant's budget is spent: the selector refuses its requests."""
BAD_POLICY = "bad_policy"
"""A selection-policy file failed validation on (re)load."""
HEAD_FAILURE = "head_failure"
"""The Ray head node (GCS) is down: no scheduling, no actor restarts."""
WEIGHTS_CORRUPT = "weights_corrupt"
"""A weights file does not match its checksum or cannot be parsed."""
BUDGET_DB_LOCKED = "budget_db_locked"
"""The budget database is locked by another writer; reservations block or fail."""
NODE_SLOW = "node_slow"
"""A node computes slower than its calibrated speed (thermal throttling, a noisy neighbour):
its experts' replies are late, the link is not."""

FAILURE_MODES: tuple[str, ...] = (
    EXPERT_SHARD_LOST,
    NODE_LOST,
    NODE_DRAINED,
    LINK_DEGRADED,
    ROUTER_IMBALANCE,
    KV_CACHE_EXHAUSTED,
    ENGINE_STALLED,
    BUDGET_EXHAUSTED,
    BAD_POLICY,
    HEAD_FAILURE,
    WEIGHTS_CORRUPT,
    BUDGET_DB_LOCKED,
    NODE_SLOW,
)
"""Every failure mode an event may name, in the order the FMEA table lists unobserved ones."""

EventKind = Literal["fault", "restored", "detected", "action", "recovered", "request_lost"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
CHAOS = "chaos"
"""The fault injector's `source`."""
INJECTOR_KINDS: tuple[str, ...] = ("fault", "restored")
"""The only kinds the injector may emit."""


class EventFileError(TelemetryError):
    """An events file has a record that is not a valid fault event."""


@dataclass(frozen=True)
class FaultEvent:
    """One fault or recovery event. Times are Unix nanoseconds, like span and metric records."""

    kind: EventKind
    """"fault": injected; "restored": the injector stopped injecting (the platform may still
    be recovering); "detected": a platform detector noticed; "action": the platform acted
    (restart, reroute, drain...; one event per action, `detail` says which); "recovered":
    serving normally again (the platform's verdict); "request_lost": a request failed for good
    because of this mode."""
    failure_mode: str
    """One of `FAILURE_MODES`."""
    target: str
    """What failed: node name, actor name, file path."""
    time_unix_nano: int = field(default_factory=time.time_ns)
    scenario: str | None = None
    """Chaos scenario that injected the fault; None for a real failure."""
    detail: str = ""
    """Free text for people: what was injected, which action was taken."""
    trace_id: str | None = None
    """Hex trace id of the span recording this event or the request it concerns, if any."""
    incident: str | None = None
    """Ties events of one incident together when the emitter knows it (the chaos runner and a
    supervisor sharing an id); otherwise events pair by failure mode and target."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """JSON-serialisable extras, e.g. {"signal": "heartbeat_timeout"} on "detected",
    {"count": 3} on "request_lost"."""
    source: str = ""
    """The component that emitted it: "chaos" (the injector), "cluster.dispatch",
    "cluster.supervisor", "serving.engine", "routing.budget", "policies.source"...; "" in
    recordings from before the field existed."""

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(EVENT_KINDS)}")
        if self.source == CHAOS and self.kind not in INJECTOR_KINDS:
            raise ValueError(
                f"the fault injector (source {CHAOS!r}) emits only "
                f"{' and '.join(INJECTOR_KINDS)}, not {self.kind!r}: detection and recovery "
                "come from the platform's own detectors"
            )
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a string, got {self.source!r}")
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(
                f"failure_mode {self.failure_mode!r} is not one of {', '.join(FAILURE_MODES)}: "
                "use a constant from expertmesh.observability.events"
            )
        if not isinstance(self.time_unix_nano, int) or self.time_unix_nano < 0:
            raise ValueError(
                f"time_unix_nano must be a non-negative int, got {self.time_unix_nano!r}"
            )

    @property
    def lost_count(self) -> int:
        """Requests a "request_lost" event stands for (0 for other kinds)."""
        if self.kind != "request_lost":
            return 0
        return int(self.attributes.get("count", 1))

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time_unix_nano": self.time_unix_nano,
            "failure_mode": self.failure_mode,
            "target": self.target,
            "scenario": self.scenario,
            "detail": self.detail,
            "trace_id": self.trace_id,
            "incident": self.incident,
            "attributes": dict(self.attributes),
            "source": self.source,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FaultEvent:
        """The event a `to_record` dict describes; ValueError naming the problem otherwise."""
        missing = [
            k for k in ("kind", "failure_mode", "target", "time_unix_nano") if k not in record
        ]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        attributes = record.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ValueError(f"attributes must be an object, got {type(attributes).__name__}")
        return cls(
            kind=record["kind"],
            failure_mode=record["failure_mode"],
            target=str(record["target"]),
            time_unix_nano=record["time_unix_nano"],
            scenario=record.get("scenario"),
            detail=record.get("detail") or "",
            trace_id=record.get("trace_id"),
            incident=record.get("incident"),
            attributes=attributes,
            source=record.get("source") or "",
        )

    @property
    def from_platform(self) -> bool:
        """Emitted by the platform, not by the fault injector."""
        return self.source != CHAOS


class EventLog:
    """Appends fault events to a JSONL file, one line per event, written and handed to the OS
    before `emit` returns (no buffer for a crash to lose). Safe to share between threads; give
    each process its own file, or accept that concurrent appends from several processes are
    only as atomic as the OS makes them.

    `scenario`, when given, is filled into events that have none, so a chaos run sets it once.
    `bind(source)` gives an emitter that stamps its component on every event.
    """

    def __init__(self, path: Path | str, *, scenario: str | None = None) -> None:
        self._file = _AppendOnlyFile(Path(path))
        self.scenario = scenario

    @property
    def path(self) -> Path:
        return self._file.path

    def emit(self, event: FaultEvent) -> FaultEvent:
        """Write `event` (with this log's scenario if it has none) and return what was written.
        Raises `TelemetryError` once the log is closed."""
        if event.scenario is None and self.scenario is not None:
            event = dataclasses.replace(event, scenario=self.scenario)
        if not self._file.append([event.to_record()]):
            raise TelemetryError(f"event log {self.path} is closed")
        return event

    def bind(self, source: str) -> SourcedEvents:
        """An emitter for one component: events it emits without a source get `source`."""
        return SourcedEvents(self, source)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventSink(Protocol):
    def emit(self, event: FaultEvent) -> FaultEvent: ...


class SourcedEvents:
    """`emit` with a component's name filled into events that have no `source`
    (`EventLog.bind`). Any `EventSink` underneath: a file, or a list in a test."""

    def __init__(self, sink: EventSink, source: str) -> None:
        self.sink = sink
        self.source = source

    def emit(self, event: FaultEvent) -> FaultEvent:
        if not event.source:
            event = dataclasses.replace(event, source=self.source)
        return self.sink.emit(event)


def read_events(path: Path | str) -> list[FaultEvent]:
    """The events of a file written by `EventLog`, in file order. A line that is not a JSON
    object raises `TelemetryFileError`; one that is not a valid event raises `EventFileError`,
    both naming the file and line."""
    events: list[FaultEvent] = []
    records = read_records(path)
    # read_records skips blank lines, so count lines again for the error message.
    numbers = _line_numbers(path)
    for number, record in zip(numbers, records):
        try:
            events.append(FaultEvent.from_record(record))
        except (ValueError, TypeError) as e:
            raise EventFileError(f"{path}:{number}: not a fault event ({e})") from e
    return events


def _line_numbers(path: Path | str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


__all__ = [
    "BAD_POLICY",
    "BUDGET_DB_LOCKED",
    "BUDGET_EXHAUSTED",
    "CHAOS",
    "ENGINE_STALLED",
    "EVENT_KINDS",
    "EXPERT_SHARD_LOST",
    "FAILURE_MODES",
    "HEAD_FAILURE",
    "INJECTOR_KINDS",
    "KV_CACHE_EXHAUSTED",
    "LINK_DEGRADED",
    "NODE_DRAINED",
    "NODE_LOST",
    "NODE_SLOW",
    "ROUTER_IMBALANCE",
    "WEIGHTS_CORRUPT",
    "EventFileError",
    "EventKind",
    "EventLog",
    "EventSink",
    "FaultEvent",
    "SourcedEvents",
    "read_events",
]
