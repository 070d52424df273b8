"""The production gate's detectors (`serving/app.py` build_gate, what every API replica and
`expertmesh up` build): a spent budget, a locked ledger and a rejected policy are reported
as fault events in `<log_dir>/events.jsonl` (sources routing.budget, policies.source) and as
`expertmesh_fault_*` metrics on the replica's Prometheus /metrics, and their end too. Real
policy file, SQLite ledger, selector, API and Prometheus registry; fake engine (the `Engine`
protocol)."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_api import FakeEngine
from test_gate import KEY, POLICY

from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.observability.events import (
    BAD_POLICY,
    BUDGET_DB_LOCKED,
    BUDGET_EXHAUSTED,
    read_events,
)
from expertmesh.routing.budget import period_keys
from expertmesh.serving.api import make_api
from expertmesh.serving.app import build_gate
from expertmesh.serving.config import parse_serving_config


@pytest.fixture
def replica(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("per_day_usd: 0.05", "per_day_usd: 100"))
    config = parse_serving_config(
        {
            "policy": str(policy),
            "budget_ledger": str(tmp_path / "budget.sqlite"),
            "log_dir": str(tmp_path / "logs"),
        }
    )
    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    engine = FakeEngine()
    gate = build_gate(config, engine, telemetry)
    app = make_api(
        engine, gate=gate, meter=telemetry.meter, prometheus_registry=telemetry.prometheus_registry
    )
    yield TestClient(app), tmp_path
    telemetry.shutdown()


def ask(client):
    body = {"model": "fake", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 2}
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )


def events_of(root: Path, mode: str) -> list[tuple[str, str]]:
    return [
        (e.kind, e.source)
        for e in read_events(root / "logs" / "events.jsonl")
        if e.failure_mode == mode
    ]


def metric(client, name: str, mode: str) -> float | None:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and f'failure_mode="{mode}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def add_spend(root: Path, micro_usd: int) -> None:
    with sqlite3.connect(root / "budget.sqlite") as conn:
        conn.execute(
            "INSERT INTO periods (tenant, period, spent) VALUES ('team', ?, ?) "
            "ON CONFLICT (tenant, period) DO UPDATE SET spent = spent + excluded.spent",
            (period_keys(time.time())[0], micro_usd),
        )


def test_a_spent_budget_is_detected_counted_and_its_end_reported(replica):
    client, root = replica
    assert ask(client).status_code == 200
    assert events_of(root, BUDGET_EXHAUSTED) == []
    add_spend(root, 10**12)  # another writer spent the tenant's day
    for _ in range(3):
        assert ask(client).status_code == 429
    assert events_of(root, BUDGET_EXHAUSTED) == [("detected", "routing.budget")]  # once
    assert metric(client, "expertmesh_fault_detections_total", BUDGET_EXHAUSTED) == 1
    assert metric(client, "expertmesh_fault_active", BUDGET_EXHAUSTED) == 1
    add_spend(root, -(10**12))
    assert ask(client).status_code == 200
    assert events_of(root, BUDGET_EXHAUSTED) == [
        ("detected", "routing.budget"),
        ("recovered", "routing.budget"),
    ]
    assert metric(client, "expertmesh_fault_active", BUDGET_EXHAUSTED) == 0


def test_a_locked_ledger_is_detected_while_a_request_waits(replica):
    client, root = replica
    assert ask(client).status_code == 200
    holder = sqlite3.connect(root / "budget.sqlite", timeout=5, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    answered: list[int] = []
    waiting = threading.Thread(target=lambda: answered.append(ask(client).status_code))
    waiting.start()
    time.sleep(0.8)  # the ledger's probe is 0.25 s
    assert events_of(root, BUDGET_DB_LOCKED) == [("detected", "routing.budget")]
    holder.rollback()
    holder.close()
    waiting.join(10)
    assert answered == [200]
    assert ask(client).status_code == 200  # a reservation that takes the lock at once
    assert events_of(root, BUDGET_DB_LOCKED)[-1] == ("recovered", "routing.budget")
    assert metric(client, "expertmesh_fault_detections_total", BUDGET_DB_LOCKED) == 1
    assert metric(client, "expertmesh_fault_active", BUDGET_DB_LOCKED) == 0


def test_a_rejected_policy_is_detected_and_the_file_put_back_recovers(replica):
    client, root = replica
    policy = root / "policy.yaml"
    good = policy.read_text()
    policy.write_text("version: 1\nname: broken\nmodels: [oops\n")
    time.sleep(1.1)  # the gate looks at the file at most once a second
    assert ask(client).status_code == 200  # the previous policy stays in force
    assert events_of(root, BAD_POLICY) == [("detected", "policies.source")]
    assert metric(client, "expertmesh_fault_active", BAD_POLICY) == 1
    policy.write_text(good)
    time.sleep(1.1)
    assert ask(client).status_code == 200
    assert events_of(root, BAD_POLICY) == [
        ("detected", "policies.source"),
        ("recovered", "policies.source"),
    ]
    assert metric(client, "expertmesh_fault_active", BAD_POLICY) == 0


def test_a_fault_free_replica_reports_nothing(replica):
    client, root = replica
    for _ in range(20):
        assert ask(client).status_code == 200
    assert read_events(root / "logs" / "events.jsonl") == []
    assert metric(client, "expertmesh_fault_detections_total", BUDGET_EXHAUSTED) is None
