"""Fault and recovery events: what the chaos runner injected and what the supervisor saw and did,
one JSON object per line, for `expertmesh fmea` to pair up and score.

    events = EventLog("events.jsonl", scenario="kill-shard")
    events.emit(FaultEvent("fault", EXPERT_SHARD_LOST, target="shard-3"))       # chaos runner
    events.emit(FaultEvent("detected", EXPERT_SHARD_LOST, target="shard-3",
                           attributes={"signal": "actor_death"}))              # supervisor
    events.emit(FaultEvent("action", EXPERT_SHARD_LOST, target="shard-3",
                           detail="restart and reload"))
    events.emit(FaultEvent("recovered", EXPERT_SHARD_LOST, target="shard-3"))
    events.close()
    read_events("events.jsonl")   # -> [FaultEvent, ...] in file order

An incident is one `fault` and the `detected`, `action` and `recovered` events that follow it
for the same failure mode (and target, or `incident` id when the emitter knows one); see
`fmea.pair_incidents`. A `detected` event with no `fault` before it is an incident nobody
injected (a real failure). `request_lost` counts lost requests (`attributes["count"]`, default 1)
against a failure mode.

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
from typing import Any, Literal, Self, get_args

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
)
"""Every failure mode an event may name, in the order the FMEA table lists unobserved ones."""

EventKind = Literal["fault", "detected", "action", "recovered", "request_lost"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


class EventFileError(TelemetryError):
    """An events file has a record that is not a valid fault event."""


@dataclass(frozen=True)
class FaultEvent:
    """One fault or recovery event. Times are Unix nanoseconds, like span and metric records."""

    kind: EventKind
    """"fault": injected or first seen; "detected": the supervisor noticed; "action": it acted
    (restart, reroute, drain...; one event per action, `detail` says which); "recovered":
    serving normally again; "request_lost": a request failed for good because of this mode."""
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

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(EVENT_KINDS)}")
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
        )


class EventLog:
    """Appends fault events to a JSONL file, one line per event, written and handed to the OS
    before `emit` returns (no buffer for a crash to lose). Safe to share between threads; give
    each process its own file, or accept that concurrent appends from several processes are
    only as atomic as the OS makes them.

    `scenario`, when given, is filled into events that have none, so a chaos run sets it once.
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
    "ENGINE_STALLED",
    "EVENT_KINDS",
    "EXPERT_SHARD_LOST",
    "FAILURE_MODES",
    "HEAD_FAILURE",
    "KV_CACHE_EXHAUSTED",
    "LINK_DEGRADED",
    "NODE_DRAINED",
    "NODE_LOST",
    "ROUTER_IMBALANCE",
    "WEIGHTS_CORRUPT",
    "EventFileError",
    "EventKind",
    "EventLog",
    "FaultEvent",
    "read_events",
]
