"""A small recorded run, written through the real exporters and `EventLog`: 40 requests, an expert
shard lost (one request fails, the rest of its window is slow), a node lost (one request lost),
an uninjected KV-cache exhaustion, and an expert-load counter over 2 layers x 4 experts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode, set_span_in_context

from expertmesh.observability.events import (
    EXPERT_SHARD_LOST,
    KV_CACHE_EXHAUSTED,
    NODE_LOST,
    EventLog,
    FaultEvent,
)
from expertmesh.observability.jsonl_exporter import JsonlMetricExporter, JsonlSpanExporter

T0 = 1_700_000_000 * 10**9
S = 10**9  # one second in ns
MS = 10**6

SHARD_FAULT_S, SHARD_DETECTED_S, SHARD_RECOVERED_S = 5.0, 5.3, 6.5
NODE_FAULT_S, NODE_DETECTED_S, NODE_RECOVERED_S = 12.0, 18.0, 19.5
KV_DETECTED_S, KV_RECOVERED_S = 15.0, 15.2
EXPERT_TOKENS = {(0, 0): 10, (0, 1): 70, (0, 2): 10, (0, 3): 10, (1, 0): 25, (1, 1): 25}


@dataclass(frozen=True)
class RecordedRun:
    spans: Path
    metrics: Path
    events: Path
    requests: int


def _at(seconds: float) -> int:
    return T0 + int(seconds * S)


def write_spans(path: Path, n_requests: int = 40) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(path)))
    tracer = provider.get_tracer("test")
    for i in range(n_requests):
        start = _at(i * 0.5)
        in_shard_window = _at(SHARD_FAULT_S) <= start <= _at(SHARD_RECOVERED_S)
        duration = (400 if in_shard_window else 100) * MS
        root = tracer.start_span(
            "POST /v1/chat/completions",
            start_time=start,
            attributes={"expertmesh.request_id": f"req-{i}"},
        )
        child = tracer.start_span(
            "engine.decode", context=set_span_in_context(root), start_time=start + MS
        )
        child.end(end_time=start + duration - MS)
        if start == _at(SHARD_FAULT_S):
            root.set_status(Status(StatusCode.ERROR, "shard lost"))
        root.end(end_time=start + duration)
    provider.shutdown()


def write_metrics(path: Path) -> None:
    reader = PeriodicExportingMetricReader(
        JsonlMetricExporter(path), export_interval_millis=3_600_000
    )
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    counter = provider.get_meter("test").create_counter("expertmesh.expert.tokens")
    for (layer, expert), tokens in EXPERT_TOKENS.items():
        counter.add(tokens // 2, {"layer": layer, "expert": expert})
    provider.force_flush()  # a first collection: cumulative totals so far
    for (layer, expert), tokens in EXPERT_TOKENS.items():
        counter.add(tokens - tokens // 2, {"layer": layer, "expert": expert})
    provider.shutdown()  # the final collection repeats the (now complete) totals


def write_events(path: Path) -> None:
    with EventLog(path, scenario="smoke") as log:
        for kind, seconds in (
            ("fault", SHARD_FAULT_S),
            ("detected", SHARD_DETECTED_S),
            ("action", SHARD_DETECTED_S + 0.1),
            ("recovered", SHARD_RECOVERED_S),
        ):
            log.emit(FaultEvent(kind, EXPERT_SHARD_LOST, "shard-1", time_unix_nano=_at(seconds)))
        for kind, seconds in (
            ("fault", NODE_FAULT_S),
            ("detected", NODE_DETECTED_S),
            ("request_lost", NODE_DETECTED_S),
            ("recovered", NODE_RECOVERED_S),
        ):
            log.emit(FaultEvent(kind, NODE_LOST, "node-b", time_unix_nano=_at(seconds)))
        log.emit(
            FaultEvent(
                "detected", KV_CACHE_EXHAUSTED, "engine-0", time_unix_nano=_at(KV_DETECTED_S)
            )
        )
        log.emit(
            FaultEvent(
                "recovered", KV_CACHE_EXHAUSTED, "engine-0", time_unix_nano=_at(KV_RECOVERED_S)
            )
        )


@pytest.fixture
def recorded_run(tmp_path: Path) -> RecordedRun:
    run = RecordedRun(
        spans=tmp_path / "spans.jsonl",
        metrics=tmp_path / "metrics.jsonl",
        events=tmp_path / "events.jsonl",
        requests=40,
    )
    write_spans(run.spans, run.requests)
    write_metrics(run.metrics)
    write_events(run.events)
    return run
