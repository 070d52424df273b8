"""Exact budgets: a SQLite ledger (WAL mode) of what each tenant has spent and reserved per UTC
day and month.

    ledger = BudgetLedger("budgets.sqlite")
    r = ledger.reserve("acme", cost_micro_usd=1_250, budget=tenant.budget)  # or BudgetExceeded
    ...call the model...
    ledger.settle(r.id, actual_micro_usd=830)      # or ledger.release(r.id) if it failed

Why it cannot overspend: `reserve` runs check and update in one `BEGIN IMMEDIATE`
transaction, which takes SQLite's write lock before reading, so no two reservations (threads
or processes sharing the file) can both see the same headroom. A reservation holds the
request's maximum cost (prompt tokens + max_tokens at the model's prices); `settle` replaces
it with the real cost, which is never more when max_tokens is enforced and prompt tokens were
counted exactly or over-estimated.

Amounts are integer micro-USD (`expertmesh.policies.policy` explains the units). Periods are
keyed `day:YYYY-MM-DD` and `month:YYYY-MM` in UTC, fixed at reservation time, so a request
settled after midnight is charged to the day it was admitted in. With `durable=True` (default)
commits are fsynced (`synchronous=FULL`): an acknowledged reservation survives a power cut,
not only a process restart. Reservations left open by a crash are released after
`stale_after_s` when the ledger is next opened.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from expertmesh.policies.policy import MICRO_PER_USD, Budget

from .errors import BudgetExceeded, RoutingError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS periods (
    tenant   TEXT    NOT NULL,
    period   TEXT    NOT NULL,
    spent    INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id         TEXT    PRIMARY KEY,
    tenant     TEXT    NOT NULL,
    day        TEXT    NOT NULL,
    month      TEXT    NOT NULL,
    amount     INTEGER NOT NULL,
    created_at REAL    NOT NULL
);
"""


class UnknownReservation(RoutingError):
    """`settle` or `release` of a reservation that does not exist (already settled, released
    or expired)."""


@dataclass(frozen=True)
class Reservation:
    id: str
    tenant: str
    amount_micro_usd: int
    day: str
    """Period keys the reservation (and its settlement) count against."""
    month: str


@dataclass(frozen=True)
class Spend:
    """A tenant's position in the current periods, micro-USD."""

    day_spent: int
    day_reserved: int
    month_spent: int
    month_reserved: int


class LedgerMonitor(Protocol):
    """Told how the ledger's write lock behaves and when budgets refuse (the platform's
    detectors listen: `routing/budget_watch.py`). Called on the request's thread."""

    def lock_busy(self, waited_s: float) -> None:
        """The write lock was not free for `waited_s` so far (another writer holds it)."""

    def lock_taken(self, waited_s: float) -> None:
        """The write lock was taken after `waited_s`."""

    def refused(self, tenant: str, period: str) -> None:
        """A reservation was refused: the tenant's `period` budget is spent."""

    def reserved(self, tenant: str) -> None:
        """A reservation for `tenant` was held."""


LOCK_PROBE_S = 0.25
"""The write lock is asked for in turns of this long (up to the busy timeout), so a held lock
is reported while requests wait, not after."""


def period_keys(now: float) -> tuple[str, str]:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    return f"day:{t:%Y-%m-%d}", f"month:{t:%Y-%m}"


class BudgetLedger:
    """The ledger file at `path` (created if missing). Safe to share between threads (one
    connection per thread) and processes (each opens its own `BudgetLedger`)."""

    def __init__(
        self,
        path: str | Path,
        durable: bool = True,
        stale_after_s: float = 3600.0,
        busy_timeout_s: float = 30.0,
        monitor: LedgerMonitor | None = None,
    ) -> None:
        self.path = Path(path)
        self._durable = durable
        self._busy_timeout_s = busy_timeout_s
        self.monitor = monitor
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        if stale_after_s > 0:
            self.expire_reservations(stale_after_s)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=True,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            # Statements after set-up wait at most one probe; `_begin` asks again in turns.
            probe_ms = int(min(LOCK_PROBE_S, self._busy_timeout_s) * 1000)
            conn.execute(f"PRAGMA busy_timeout = {probe_ms}")
            self._local.conn = conn
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE (take the write lock), asking in turns of `LOCK_PROBE_S` up to the
        busy timeout and telling the monitor about each turn the lock stayed held; the last
        "database is locked" error propagates."""
        t0 = time.monotonic()
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                waited = time.monotonic() - t0
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if self.monitor is not None:
                    self.monitor.lock_busy(waited)
                if waited >= self._busy_timeout_s:
                    raise
                continue
            if self.monitor is not None:
                self.monitor.lock_taken(time.monotonic() - t0)
            return

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def reserve(
        self, tenant: str, cost_micro_usd: int, budget: Budget, now: float | None = None
    ) -> Reservation:
        """Hold `cost_micro_usd` against the tenant's day and month, or raise `BudgetExceeded`
        (nothing held). A budget with no limits still records the reservation (cost tracking)."""
        if cost_micro_usd < 0:
            raise ValueError(f"cost_micro_usd must be >= 0, got {cost_micro_usd}")
        day, month = period_keys(time.time() if now is None else now)
        limits = (
            (day, "day", budget.per_day_micro_usd),
            (month, "month", budget.per_month_micro_usd),
        )
        rid = uuid.uuid4().hex
        conn = self._conn()
        self._begin(conn)
        try:
            for key, name, limit in limits:
                if limit is None:
                    continue
                row = conn.execute(
                    "SELECT spent + reserved FROM periods WHERE tenant = ? AND period = ?",
                    (tenant, key),
                ).fetchone()
                committed = row[0] if row else 0
                if committed + cost_micro_usd > limit:
                    if self.monitor is not None:
                        self.monitor.refused(tenant, name)
                    raise BudgetExceeded(
                        tenant,
                        name,
                        limit / MICRO_PER_USD,
                        committed / MICRO_PER_USD,
                        cost_micro_usd / MICRO_PER_USD,
                    )
            for key in (day, month):
                conn.execute(
                    "INSERT INTO periods (tenant, period, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT (tenant, period) DO UPDATE SET reserved = reserved + excluded.reserved",
                    (tenant, key, cost_micro_usd),
                )
            conn.execute(
                "INSERT INTO reservations (id, tenant, day, month, amount, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rid, tenant, day, month, cost_micro_usd, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if self.monitor is not None:
            self.monitor.reserved(tenant)
        return Reservation(rid, tenant, cost_micro_usd, day, month)

    def settle(self, reservation_id: str, actual_micro_usd: int) -> int:
        """Replace the reservation by the real cost; returns the amount charged. A real cost
        above the reservation is charged in full (it was spent) and returned as such; the
        caller should log it, as it means max_tokens was not enforced or tokens were
        under-counted."""
        if actual_micro_usd < 0:
            raise ValueError(f"actual_micro_usd must be >= 0, got {actual_micro_usd}")
        self._close_reservation(reservation_id, actual_micro_usd)
        return actual_micro_usd

    def release(self, reservation_id: str) -> None:
        """Drop the reservation without charging (the call failed before any cost)."""
        self._close_reservation(reservation_id, 0)

    def _close_reservation(self, reservation_id: str, charge: int) -> None:
        conn = self._conn()
        self._begin(conn)
        try:
            row = conn.execute(
                "SELECT tenant, day, month, amount FROM reservations WHERE id = ?",
                (reservation_id,),
            ).fetchone()
            if row is None:
                raise UnknownReservation(
                    f"reservation {reservation_id!r} is not open (already settled, released or "
                    "expired); settle or release each reservation once"
                )
            tenant, day, month, amount = row
            for key in (day, month):
                conn.execute(
                    "UPDATE periods SET reserved = reserved - ?, spent = spent + ? "
                    "WHERE tenant = ? AND period = ?",
                    (amount, charge, tenant, key),
                )
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def expire_reservations(self, older_than_s: float, now: float | None = None) -> int:
        """Release reservations opened more than `older_than_s` ago (left by a crash); returns
        how many."""
        cutoff = (time.time() if now is None else now) - older_than_s
        ids = [
            r[0]
            for r in self._conn().execute(
                "SELECT id FROM reservations WHERE created_at < ?", (cutoff,)
            )
        ]
        released = 0
        for rid in ids:
            try:
                self.release(rid)
                released += 1
            except UnknownReservation:
                pass  # settled by its owner meanwhile
        return released

    def spend(self, tenant: str, now: float | None = None) -> Spend:
        day, month = period_keys(time.time() if now is None else now)
        rows = dict(
            (period, (spent, reserved))
            for period, spent, reserved in self._conn().execute(
                "SELECT period, spent, reserved FROM periods WHERE tenant = ? AND period IN (?, ?)",
                (tenant, day, month),
            )
        )
        d, m = rows.get(day, (0, 0)), rows.get(month, (0, 0))
        return Spend(d[0], d[1], m[0], m[1])

    def open_reservations(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM reservations").fetchone()[0])
