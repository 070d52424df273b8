"""Platform detections as metrics, for dashboards and alerts (`manifests/base/prometheusrule.yaml`):

| metric (Prometheus name) | kind | attributes | meaning |
|---|---|---|---|
| `expertmesh.fault.detections` (`expertmesh_fault_detections_total`) | counter | failure_mode, source | times a platform detector turned on |
| `expertmesh.fault.active` (`expertmesh_fault_active`) | gauge (up-down counter) | failure_mode, source | detector conditions on now (detected, not yet recovered) |

`MeteredEvents` wraps the event sink the detectors write to, so every detector that emits
fault events (ledger, policy source, engine, supervisor, dispatch, head watch) is counted
without knowing about metrics. Injected events (`source: chaos`) are not counted.

    events = MeteredEvents(EventLog(path), telemetry.meter)
    LedgerWatch(SourcedEvents(events, "routing.budget"), ledger_path)
"""

from __future__ import annotations

import threading
from typing import Any

from .events import EventSink, FaultEvent

DETECTIONS_METRIC = "expertmesh.fault.detections"
ACTIVE_METRIC = "expertmesh.fault.active"


class MeteredEvents:
    def __init__(self, inner: EventSink | None, meter: Any) -> None:
        self.inner = inner
        self._detections = meter.create_counter(
            DETECTIONS_METRIC,
            unit="{detection}",
            description="Times a platform failure detector turned on",
        )
        self._active = meter.create_up_down_counter(
            ACTIVE_METRIC,
            unit="{condition}",
            description="Platform failure-detector conditions on now",
        )
        self._on: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def emit(self, event: FaultEvent) -> FaultEvent:
        if event.from_platform and event.kind in ("detected", "recovered"):
            key = (event.failure_mode, event.source, event.target)
            attributes = {"failure_mode": event.failure_mode, "source": event.source}
            with self._lock:
                if event.kind == "detected" and key not in self._on:
                    self._on.add(key)
                    self._detections.add(1, attributes)
                    self._active.add(1, attributes)
                elif event.kind == "recovered" and key in self._on:
                    self._on.discard(key)
                    self._active.add(-1, attributes)
        return self.inner.emit(event) if self.inner is not None else event


__all__ = ["ACTIVE_METRIC", "DETECTIONS_METRIC", "MeteredEvents"]
