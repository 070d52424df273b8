"""The budget ledger: exact under concurrency (threads and processes), durable across
reopening, and wired into the selector so free models are never blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from expertmesh.policies import Budget
from expertmesh.routing import (
    BudgetExceeded,
    BudgetLedger,
    RoutingError,
    SelectionRequest,
    Selector,
    UnknownReservation,
)

COST = 1_000  # micro-USD per reservation
FITS = 150  # reservations the budget can hold
EDGE = Budget(per_day_micro_usd=FITS * COST + COST // 2, per_month_micro_usd=10**9)


def test_reserve_settle_release_move_money_exactly(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite")
    budget = Budget(per_day_micro_usd=10_000)
    r1 = ledger.reserve("t", 4_000, budget)
    r2 = ledger.reserve("t", 4_000, budget)
    with pytest.raises(BudgetExceeded) as e:
        ledger.reserve("t", 4_000, budget)
    assert e.value.http_status == 429 and e.value.period == "day"
    assert "per_day_usd" in str(e.value)
    assert ledger.settle(r1.id, 1_500) == 1_500
    ledger.release(r2.id)
    s = ledger.spend("t")
    assert (s.day_spent, s.day_reserved, s.month_spent, s.month_reserved) == (1_500, 0, 1_500, 0)
    with pytest.raises(UnknownReservation):
        ledger.settle(r1.id, 1)


def test_month_budget_is_enforced_too(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite")
    budget = Budget(per_day_micro_usd=None, per_month_micro_usd=5_000)
    ledger.settle(ledger.reserve("t", 5_000, budget).id, 5_000)
    with pytest.raises(BudgetExceeded) as e:
        ledger.reserve("t", 1, budget)
    assert e.value.period == "month"


def test_budgets_survive_reopening_the_ledger(tmp_path):
    path = tmp_path / "b.sqlite"
    ledger = BudgetLedger(path)
    budget = Budget(per_day_micro_usd=3_000)
    ledger.settle(ledger.reserve("t", 2_000, budget).id, 2_000)
    held = ledger.reserve("t", 500, budget)
    ledger.close()
    reopened = BudgetLedger(path)
    assert reopened.spend("t").day_spent == 2_000
    assert reopened.spend("t").day_reserved == 500  # an open reservation still counts
    with pytest.raises(BudgetExceeded):
        reopened.reserve("t", 501, budget)
    reopened.settle(held.id, 400)
    assert reopened.spend("t").day_spent == 2_400


def test_reservations_left_by_a_crash_expire(tmp_path):
    path = tmp_path / "b.sqlite"
    BudgetLedger(path).reserve("t", 700, Budget())
    assert BudgetLedger(path, stale_after_s=3600).open_reservations() == 1
    later = BudgetLedger(path, stale_after_s=0)
    assert later.expire_reservations(older_than_s=0, now=time.time() + 1) == 1
    assert later.spend("t").day_reserved == 0


def test_200_concurrent_threads_at_the_edge_never_overspend(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite")
    barrier = threading.Barrier(200)
    granted: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            r = ledger.reserve("edge", COST, EDGE)
        except BudgetExceeded:
            with lock:
                refused.append(1)
            return
        with lock:
            granted.append(r.id)

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == FITS and len(refused) == 200 - FITS
    s = ledger.spend("edge")
    assert s.day_reserved == FITS * COST
    overspend = max(0, s.day_spent + s.day_reserved - EDGE.per_day_micro_usd)
    assert overspend == 0
    for rid in granted:
        ledger.settle(rid, COST)
    assert ledger.spend("edge").day_spent == FITS * COST


_WORKER = textwrap.dedent(
    """
    import os, sys, threading, time
    from expertmesh.policies import Budget
    from expertmesh.routing import BudgetExceeded, BudgetLedger

    path, n, go, limit, cost = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    # durable=False skips the fsync per commit (slow on CI disks); atomicity is the same.
    ledger = BudgetLedger(path, durable=False)
    budget = Budget(per_day_micro_usd=limit, per_month_micro_usd=10**9)
    ok = []
    ready = threading.Barrier(n + 1)
    def work():
        ready.wait()
        deadline = time.time() + 60  # never outlive a failed test
        while not os.path.exists(go):
            if time.time() > deadline:
                return
            time.sleep(0.001)
        try:
            r = ledger.reserve("edge", cost, budget)
        except BudgetExceeded:
            return
        ledger.settle(r.id, cost)
        ok.append(1)
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads: t.start()
    ready.wait()
    print("ready", flush=True)
    for t in threads: t.join()
    print(len(ok))
    """
)


def test_200_concurrent_reservations_from_4_processes_never_overspend(tmp_path):
    path = tmp_path / "b.sqlite"
    BudgetLedger(path)  # create the schema once
    go = tmp_path / "go"
    args = [str(path), "50", str(go), str(EDGE.per_day_micro_usd), str(COST)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        for p in procs:  # every process has its 50 threads waiting on the start line
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        granted = sum(int(p.communicate(timeout=60)[0].strip()) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs)
    s = BudgetLedger(path).spend("edge")
    assert granted == FITS
    assert s.day_spent == FITS * COST and s.day_reserved == 0
    assert s.day_spent <= EDGE.per_day_micro_usd  # overspend exactly 0


# -- the selector and budgets ----------------------------------------------------------------------


def _budget_policy(make_policy, policy_data, per_day_usd: float, objective: str = "fastest"):
    tenants = policy_data()["tenants"]
    tenants[1]["budget"] = {"per_day_usd": per_day_usd}
    tenants[1]["objective"] = objective
    return make_policy(tenants=tenants)


def test_selector_needs_a_ledger_for_budgeted_tenants(make_policy, policy_data):
    with pytest.raises(RoutingError, match="ledger=BudgetLedger"):
        Selector(_budget_policy(make_policy, policy_data, 1))


def test_exhausted_budget_moves_auto_requests_to_a_free_model(make_policy, policy_data, tmp_path):
    policy = _budget_policy(make_policy, policy_data, 0.0001)  # 100 micro-USD
    selector = Selector(policy, ledger=BudgetLedger(tmp_path / "b.sqlite"))
    d = selector.decide(SelectionRequest("global", "hello", max_tokens=1000))
    # fastest ranks us-fast first; its max cost (>= 1000 micro-USD) does not fit
    assert d.model.name == "local-free" and d.reservation is None
    reasons = {e.model: e.constraint for e in d.excluded}
    assert reasons["us-fast"] == "budget"
    assert all(not m.free or m.name == "local-free" for m in d.fallbacks)
    assert "us-fast" not in [m.name for m in d.fallbacks]


def test_free_model_is_never_blocked_by_a_zero_budget(make_policy, policy_data, tmp_path):
    policy = _budget_policy(make_policy, policy_data, 0, objective="cheapest")
    selector = Selector(policy, ledger=BudgetLedger(tmp_path / "b.sqlite"))
    for _ in range(3):
        d = selector.decide(SelectionRequest("global", "hi", requested_model="local-free"))
        assert d.model.name == "local-free"
        selector.settle(d, 10, 10)


def test_requested_paid_model_over_budget_is_429(make_policy, policy_data, tmp_path):
    policy = _budget_policy(make_policy, policy_data, 0.0001)
    selector = Selector(policy, ledger=BudgetLedger(tmp_path / "b.sqlite"))
    with pytest.raises(BudgetExceeded) as e:
        selector.decide(SelectionRequest("global", "hi", requested_model="us-big"))
    assert e.value.http_status == 429 and e.value.code == "insufficient_quota"


def test_decide_reserves_max_cost_and_settle_charges_real_cost(make_policy, policy_data, tmp_path):
    policy = _budget_policy(make_policy, policy_data, 1)
    ledger = BudgetLedger(tmp_path / "b.sqlite")
    selector = Selector(policy, ledger=ledger)
    d = selector.decide(
        SelectionRequest("global", "hi", requested_model="us-big", prompt_tokens=10, max_tokens=100)
    )
    assert d.reservation is not None
    assert d.reservation.amount_micro_usd == 10 * 3 + 100 * 15 == d.estimated_cost_micro_usd
    assert ledger.spend("global").day_reserved == 1_530
    assert selector.settle(d, 10, 20) == pytest.approx((30 + 300) / 1e6)
    s = ledger.spend("global")
    assert (s.day_spent, s.day_reserved) == (330, 0)


def test_fallback_releases_the_failed_reservation(make_policy, policy_data, tmp_path):
    data = policy_data(fallbacks={"us-big": ["eu-strict"]})
    data["tenants"][1]["budget"] = {"per_day_usd": 1}
    from expertmesh.policies import parse_policy

    ledger = BudgetLedger(tmp_path / "b.sqlite")
    selector = Selector(parse_policy(data), ledger=ledger)
    d = selector.decide(
        SelectionRequest("global", "hi", requested_model="us-big", prompt_tokens=10, max_tokens=100)
    )
    d1 = selector.fallback(d, "timeout")
    assert d1.model.name == "eu-strict"
    assert ledger.spend("global").day_reserved == 10 * 1 + 100 * 2
    selector.release(d1)
    assert ledger.spend("global").day_reserved == 0
    assert ledger.open_reservations() == 0


def test_ledger_file_is_in_wal_mode(tmp_path):
    import sqlite3

    BudgetLedger(tmp_path / "b.sqlite")
    mode = sqlite3.connect(tmp_path / "b.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert Path(tmp_path / "b.sqlite").exists()
