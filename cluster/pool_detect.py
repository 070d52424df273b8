"""The dispatch-side detectors (`cluster/detect.py`: link degraded, node slow) with a shared
expert pool. Replies arrive in the replicas, not in the controller, so each replica runs the
detectors on its own replies (its own round trips, as an attention worker of a private pool
does) and sends what they emit to the controller (`ForwardedEvents`). The controller keeps one
condition per (failure mode, target) over every replica (`PoolConditions`): `detected` when
the first replica sees it, `recovered` when the last replica that saw it no longer does. A
slow node seen by three replicas is one incident in the pool's event log, not three.

    replica:    DispatchDetectors(ForwardedEvents(controller, replica))  # on its Dispatcher
    controller: PoolConditions(events).report(replica, event)            # report_event
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from expertmesh.observability.events import EventSink, FaultEvent


class ForwardedEvents:
    """A replica's event sink: each event goes to the pool's controller (`report_event`), fire
    and forget (a detector runs on the attention worker's thread; it must not wait)."""

    def __init__(self, controller: Any, replica: str) -> None:
        self.controller = controller
        self.replica = replica
        self.sent = 0

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.controller.report_event.remote(self.replica, event)
        self.sent += 1
        return event


class PoolConditions:
    """One on/off condition per (failure mode, target) over all replicas' detectors."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def active(self) -> dict[tuple[str, str], set[str]]:
        """(failure mode, target) -> the replicas that see it now."""
        with self._lock:
            return {k: set(v) for k, v in self._seen.items()}

    def report(self, replica: str, event: FaultEvent) -> FaultEvent | None:
        """Take one replica's event; the event emitted to the pool's log (None: none)."""
        key = (event.failure_mode, event.target)
        with self._lock:
            seen = self._seen.get(key)
            if event.kind == "detected":
                first = seen is None
                self._seen.setdefault(key, set()).add(replica)
                if not first:
                    return None
            elif event.kind == "recovered":
                if seen is None or replica not in seen:
                    return None
                seen.discard(replica)
                if seen:
                    return None
                del self._seen[key]
            attributes = {**event.attributes, "replica": replica}
            return self.sink.emit(dataclasses.replace(event, attributes=attributes))

    def forget(self, replica: str) -> None:
        """A replica left: it no longer holds a condition open. A condition only it saw is
        closed without a `recovered` (nobody saw the recovery; the pool's log shows it open)."""
        with self._lock:
            for key in list(self._seen):
                self._seen[key].discard(replica)
                if not self._seen[key]:
                    del self._seen[key]


__all__ = ["ForwardedEvents", "PoolConditions"]
