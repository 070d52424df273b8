"""The budget ledger's own detectors on a real SQLite file: another writer holding the lock is
reported while a reservation waits (not after), once, and its end when the lock is free
again; a spent budget is reported once per tenant until a reservation is held again; an
ordinary run of reservations reports nothing."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from expertmesh.observability.events import BUDGET_DB_LOCKED, BUDGET_EXHAUSTED, FaultEvent
from expertmesh.policies.policy import Budget
from expertmesh.routing.budget import BudgetLedger
from expertmesh.routing.budget_watch import LedgerWatch
from expertmesh.routing.errors import BudgetExceeded


class ListSink:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.events.append(event)
        return event


def watched(tmp_path):
    sink = ListSink()
    path = tmp_path / "budget.sqlite"
    return BudgetLedger(path, monitor=LedgerWatch(sink, path)), path, sink


def test_a_held_lock_is_detected_while_the_reservation_waits(tmp_path):
    ledger, path, sink = watched(tmp_path)
    other = sqlite3.connect(path, timeout=5)
    other.execute("BEGIN EXCLUSIVE")
    locked_at = time.time_ns()
    done = threading.Event()

    def reserve() -> None:
        r = ledger.reserve("acme", 10, Budget())
        ledger.settle(r.id, 10)
        done.set()

    thread = threading.Thread(target=reserve)
    thread.start()
    time.sleep(1.5)
    assert not done.is_set()  # still waiting: nothing lost, nothing refused
    detected = [e for e in sink.events if e.kind == "detected"]
    assert [(e.failure_mode, e.source) for e in detected] == [(BUDGET_DB_LOCKED, "routing.budget")]
    assert (detected[0].time_unix_nano - locked_at) / 1e9 < 1.0
    other.rollback()
    other.close()
    thread.join(10)
    assert done.is_set()
    ledger.reserve("acme", 10, Budget())  # the lock comes at once again
    assert [e.kind for e in sink.events] == ["detected", "recovered"]


def test_a_spent_budget_is_reported_once_until_reservations_are_held_again(tmp_path):
    ledger, _, sink = watched(tmp_path)
    budget = Budget(per_day_micro_usd=100)
    first = ledger.reserve("acme", 80, budget)
    for _ in range(3):
        with pytest.raises(BudgetExceeded):
            ledger.reserve("acme", 50, budget)
    assert [(e.kind, e.failure_mode, e.target) for e in sink.events] == [
        ("detected", BUDGET_EXHAUSTED, "tenant:acme")
    ]
    ledger.release(first.id)
    ledger.reserve("acme", 50, budget)
    assert [e.kind for e in sink.events] == ["detected", "recovered"]


def test_ordinary_reservations_report_nothing(tmp_path):
    ledger, _, sink = watched(tmp_path)
    for i in range(50):
        r = ledger.reserve(f"t{i % 3}", 5, Budget(per_day_micro_usd=10_000))
        ledger.settle(r.id, 3)
    assert sink.events == []
