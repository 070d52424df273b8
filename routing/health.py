"""Model health as the selector sees it: a set of models currently unfit to serve. The serving
layer marks a model down after errors or failed probes and up again when it recovers; the
selector excludes down models (reason "unhealthy") from choices and fallbacks."""

from __future__ import annotations

import threading
from typing import Protocol


class HealthView(Protocol):
    def unhealthy(self) -> frozenset[str]:
        """Names of models that must not be chosen now. Return the same object while nothing
        changes: the selector caches per object."""
        ...


class ModelHealth:
    """A thread-safe `HealthView` the serving layer updates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: frozenset[str] = frozenset()
        self.reasons: dict[str, str] = {}

    def mark_down(self, model: str, reason: str = "") -> None:
        with self._lock:
            self._down = self._down | {model}
            self.reasons[model] = reason

    def mark_up(self, model: str) -> None:
        with self._lock:
            if model in self._down:
                self._down = self._down - {model}
            self.reasons.pop(model, None)

    def unhealthy(self) -> frozenset[str]:
        return self._down
