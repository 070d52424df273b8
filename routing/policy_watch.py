"""The policy source's failure detector (`bad_policy`): a reload of the policy file that fails
validation is detected (the previous policy stays in force); the first look that finds a
version in force again (the file fixed, or put back as it was) is its recovery.

    watch = PolicyWatch(events.bind("policies.source"), path)
    source = WatchedPolicyFile(path, watch)      # a PolicyFile: reloads when the file changes
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from expertmesh.observability.detectors import Condition
from expertmesh.observability.events import BAD_POLICY, EventSink
from expertmesh.policies import PolicyError, PolicyFile

SOURCE = "policies.source"


class PolicyWatch:
    def __init__(self, events: EventSink | None, path: str | Path) -> None:
        self.condition = Condition(events, BAD_POLICY, str(path), SOURCE)
        self.rejections = 0

    def rejected(self, error: Exception) -> None:
        self.rejections += 1
        self.condition.update(True, str(error)[:200])

    def in_force(self, label: str) -> None:
        self.condition.update(False, f"the file loads again: {label} in force")


class WatchedPolicyFile(PolicyFile):
    """A `PolicyFile` that tells `watch` of every rejected version and of the file loading
    again (`PolicyFile`'s own `on_reload` fires only for a new version, not for the old one
    put back)."""

    def __init__(
        self,
        path: str | Path,
        watch: PolicyWatch,
        check_interval_s: float = 1.0,
        on_error: Callable[[PolicyError], None] | None = None,
    ) -> None:
        self.watch = watch

        def rejected(error: PolicyError) -> None:
            watch.rejected(error)
            if on_error is not None:
                on_error(error)

        super().__init__(path, check_interval_s, on_error=rejected)

    def reload_if_changed(self) -> bool:
        changed = super().reload_if_changed()
        self._judged()
        return changed

    def reload(self) -> bool:
        loaded = super().reload()
        self._judged()
        return loaded

    def _judged(self) -> None:
        if self.last_error is None and self.watch.condition.active:
            self.watch.in_force(self._policy.label)


__all__ = ["SOURCE", "PolicyWatch", "WatchedPolicyFile"]
