"""The serving engine's own failure detector: KV-cache pressure.

The scheduler admits a request when a slot is free and its KV reservation (prompt + max
tokens) fits the engine's KV budget; beyond that, requests wait, and beyond the bounded queue
they are refused with 429 (`Overloaded`). Pressure is either: a refusal in the last
`refusal_window_s`, or reservations at `occupancy_on` of the budget with requests waiting.
It clears when neither has held for `clear_after_s`.

    pressure = KvPressure(events.bind("serving.engine"), engine.batcher)
    pressure.refused()     # the engine answered 429
    pressure.check()       # periodically (the supervisor's engine-health round)
"""

from __future__ import annotations

import threading
import time
from typing import Any

from expertmesh.observability.detectors import Condition
from expertmesh.observability.events import KV_CACHE_EXHAUSTED, EventSink

SOURCE = "serving.engine"


class KvPressure:
    def __init__(
        self,
        events: EventSink | None,
        batcher: Any,
        occupancy_on: float = 0.9,
        refusal_window_s: float = 1.0,
        clear_after_s: float = 1.0,
    ) -> None:
        self.batcher = batcher
        self.occupancy_on = occupancy_on
        self.refusal_window_s = refusal_window_s
        self.clear_after_s = clear_after_s
        self.condition = Condition(events, KV_CACHE_EXHAUSTED, "engine", SOURCE)
        self._lock = threading.Lock()
        self._last_refusal = -float("inf")
        self._last_pressure = -float("inf")
        self.refusals = 0

    def refused(self) -> None:
        with self._lock:
            self._last_refusal = time.monotonic()
            self.refusals += 1
        self.check()

    def check(self) -> None:
        now = time.monotonic()
        state = self.batcher.describe()
        budget = max(int(state["kv_budget_tokens"]), 1)
        occupancy = int(state["kv_reserved_tokens"]) / budget
        waiting = int(state["waiting"])
        with self._lock:
            refused_recently = now - self._last_refusal <= self.refusal_window_s
            full = occupancy >= self.occupancy_on and waiting > 0
            if refused_recently or full:
                self._last_pressure = now
            on = now - self._last_pressure <= self.clear_after_s
            refusals = self.refusals
        why = []
        if refused_recently:
            why.append("queue full: requests refused with 429")
        why.append(f"KV {occupancy:.0%} reserved, {waiting} waiting")
        self.condition.update(
            on,
            "; ".join(why),
            {"kv_occupancy": round(occupancy, 3), "waiting": waiting, "refusals": refusals},
        )


__all__ = ["SOURCE", "KvPressure"]
