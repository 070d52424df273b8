"""The budget ledger's own failure detectors (a `LedgerMonitor`, see `budget.py`):

- **budget database locked** (`budget_db_locked`): the ledger's write lock stayed held by
  another writer for a whole probe (`budget.LOCK_PROBE_S`) while a request waited; clears
  when a reservation takes the lock again within one probe.
- **budget exhausted** (`budget_exhausted`): a tenant's reservation was refused because its
  day or month budget is spent; clears at that tenant's next reservation held.

    watch = LedgerWatch(events.bind("routing.budget"), ledger_path)
    ledger = BudgetLedger(ledger_path, monitor=watch)
"""

from __future__ import annotations

import threading
from pathlib import Path

from expertmesh.observability.detectors import Condition
from expertmesh.observability.events import BUDGET_DB_LOCKED, BUDGET_EXHAUSTED, EventSink

from .budget import LOCK_PROBE_S

SOURCE = "routing.budget"


class LedgerWatch:
    def __init__(self, events: EventSink | None, ledger_path: str | Path) -> None:
        self.events = events
        self.locked = Condition(events, BUDGET_DB_LOCKED, Path(ledger_path).name, SOURCE)
        self._tenants: dict[str, Condition] = {}
        self._lock = threading.Lock()

    def lock_busy(self, waited_s: float) -> None:
        self.locked.update(
            True,
            f"ledger write lock held by another writer; waited {waited_s:.2f} s so far",
            {"waited_s": round(waited_s, 3)},
        )

    def lock_taken(self, waited_s: float) -> None:
        if waited_s < LOCK_PROBE_S:
            self.locked.update(False, f"write lock taken in {waited_s * 1e3:.0f} ms")

    def _tenant(self, tenant: str) -> Condition:
        with self._lock:
            if tenant not in self._tenants:
                self._tenants[tenant] = Condition(
                    self.events, BUDGET_EXHAUSTED, f"tenant:{tenant}", SOURCE
                )
            return self._tenants[tenant]

    def refused(self, tenant: str, period: str) -> None:
        self._tenant(tenant).update(True, f"{period} budget spent: reservations refused")

    def reserved(self, tenant: str) -> None:
        with self._lock:
            condition = self._tenants.get(tenant)
        if condition is not None:
            condition.update(False, "reservations held again")


__all__ = ["SOURCE", "LedgerWatch"]
