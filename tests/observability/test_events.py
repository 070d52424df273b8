"""Fault events: the record, the appender and the reader."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from expertmesh.observability import TelemetryError
from expertmesh.observability.events import (
    EXPERT_SHARD_LOST,
    FAILURE_MODES,
    NODE_LOST,
    EventFileError,
    EventLog,
    FaultEvent,
    read_events,
)


def test_event_round_trips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    event = FaultEvent(
        "detected",
        NODE_LOST,
        "node-b",
        time_unix_nano=123,
        scenario="kill-node",
        detail="3 heartbeats missed",
        trace_id="ab" * 16,
        incident="inc-1",
        attributes={"signal": "heartbeat_timeout"},
    )
    with EventLog(path) as log:
        log.emit(event)
    assert read_events(path) == [event]


def test_log_fills_in_its_scenario_only_where_missing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, scenario="chaos-1") as log:
        log.emit(FaultEvent("fault", NODE_LOST, "node-a"))
        log.emit(FaultEvent("fault", NODE_LOST, "node-b", scenario="other"))
    assert [e.scenario for e in read_events(path)] == ["chaos-1", "other"]


def test_unknown_failure_mode_or_kind_is_rejected_when_built() -> None:
    with pytest.raises(ValueError, match="failure_mode 'shard_gone'"):
        FaultEvent("fault", "shard_gone", "shard-1")
    with pytest.raises(ValueError, match="kind 'crashed'"):
        FaultEvent("crashed", NODE_LOST, "node-a")  # type: ignore[arg-type]


def test_vocabulary_matches_the_runbooks() -> None:
    assert len(FAILURE_MODES) == 13
    assert EXPERT_SHARD_LOST in FAILURE_MODES and "budget_db_locked" in FAILURE_MODES


def test_events_from_concurrent_threads_are_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)

    def work(i: int) -> None:
        for j in range(100):
            log.emit(FaultEvent("action", EXPERT_SHARD_LOST, f"shard-{i}", detail=str(j)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    events = read_events(path)
    assert len(events) == 400
    for i in range(4):
        assert [e.detail for e in events if e.target == f"shard-{i}"] == [
            str(j) for j in range(100)
        ]


def test_emit_after_close_raises(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.close()
    with pytest.raises(TelemetryError, match="closed"):
        log.emit(FaultEvent("fault", NODE_LOST, "node-a"))


def test_reader_names_file_and_line_of_an_invalid_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.emit(FaultEvent("fault", NODE_LOST, "node-a"))
    with open(path, "a") as f:
        f.write("\n")
        f.write('{"kind": "fault", "failure_mode": "oops", "target": "x", "time_unix_nano": 1}\n')
    with pytest.raises(EventFileError, match=r"events.jsonl:3: .*'oops'"):
        read_events(path)


def test_lost_count_defaults_to_one() -> None:
    assert FaultEvent("request_lost", NODE_LOST, "node-a").lost_count == 1
    lost = FaultEvent("request_lost", NODE_LOST, "node-a", attributes={"count": 3})
    assert lost.lost_count == 3
    assert FaultEvent("fault", NODE_LOST, "node-a").lost_count == 0
