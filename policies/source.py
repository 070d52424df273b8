"""Where the selector gets its policy: a fixed `Policy`, or a file that reloads on change.

`PolicyFile` checks the file's modification time and size at most every `check_interval_s`
when `current()` is called (so the request path pays one `time.monotonic()` call between
checks, no thread). A changed file is validated in full before it replaces the policy in
force; a bad file is rejected, the old policy stays, and the error is kept in `last_error`,
logged, and passed to `on_error`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import PolicyError
from .load import load_policy
from .policy import Policy

log = logging.getLogger("expertmesh.policies")


@runtime_checkable
class PolicySource(Protocol):
    def current(self) -> Policy:
        """The policy in force now (cheap: called on every decision)."""
        ...


class StaticPolicy:
    """A policy that never changes (tests, replay)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def current(self) -> Policy:
        return self._policy


class PolicyFile:
    """A policy file, reloaded when it changes. The first load must succeed (raises
    `PolicyError`); later bad versions are rejected and the previous policy stays in force."""

    def __init__(
        self,
        path: str | Path,
        check_interval_s: float = 1.0,
        on_error: Callable[[PolicyError], None] | None = None,
        on_reload: Callable[[Policy], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._on_error = on_error
        self._on_reload = on_reload
        self._lock = threading.Lock()
        self.last_error: PolicyError | None = None
        """The error of the last rejected version; None once a good version loads."""
        self._stamp = self._file_stamp()
        self._policy = load_policy(self.path)
        self._next_check = time.monotonic() + check_interval_s

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> Policy:
        if time.monotonic() >= self._next_check:
            self.reload_if_changed()
        return self._policy

    def reload_if_changed(self) -> bool:
        """Reload if the file changed since the last look; True if a new policy is in force."""
        with self._lock:
            self._next_check = time.monotonic() + self.check_interval_s
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return self._load()

    def reload(self) -> bool:
        """Reload now, changed or not; True if the file's policy is in force afterwards."""
        with self._lock:
            self._stamp = self._file_stamp()
            return self._load()

    def _load(self) -> bool:
        try:
            policy = load_policy(self.path)
        except PolicyError as e:
            self.last_error = e
            log.error(
                "policy %s rejected; %s stays in force:\n%s", self.path, self._policy.label, e
            )
            if self._on_error is not None:
                self._on_error(e)
            return False
        self.last_error = None
        changed = policy.version != self._policy.version
        self._policy = policy
        if changed:
            log.info("policy %s loaded: %s", self.path, policy.label)
            if self._on_reload is not None:
                self._on_reload(policy)
        return True
