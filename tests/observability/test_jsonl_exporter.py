"""The JSONL exporters and readers on their own: concurrency, grouping, corrupt files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from expertmesh.observability import (
    JsonlSpanExporter,
    TelemetryFileError,
    read_spans,
    spans_by_trace,
)


@pytest.fixture
def provider_and_path(tmp_path: Path):
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(path)))
    yield provider, path
    provider.shutdown()


def test_spans_from_concurrent_threads_are_whole_lines(provider_and_path) -> None:
    provider, path = provider_and_path
    tracer = provider.get_tracer("test")
    n_threads, n_spans = 8, 200
    long_value = "x" * 20_000  # longer than any I/O buffer, so a split write would show

    def work(i: int) -> None:
        for j in range(n_spans):
            with tracer.start_as_current_span(f"t{i}", attributes={"j": j, "pad": long_value}):
                pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    spans = read_spans(path)  # raises on any torn line
    assert len(spans) == n_threads * n_spans
    for i in range(n_threads):
        js = [s["attributes"]["j"] for s in spans if s["name"] == f"t{i}"]
        assert js == list(range(n_spans))


def test_spans_by_trace_separates_requests_and_orders_by_start(provider_and_path) -> None:
    provider, path = provider_and_path
    tracer = provider.get_tracer("test")
    for request in ("a", "b"):
        with tracer.start_as_current_span(f"{request}.request"):
            with tracer.start_as_current_span(f"{request}.prefill"):
                pass
            with tracer.start_as_current_span(f"{request}.decode"):
                pass

    traces = spans_by_trace(path)
    assert [[s["name"] for s in spans] for spans in traces.values()] == [
        ["a.request", "a.prefill", "a.decode"],
        ["b.request", "b.prefill", "b.decode"],
    ]


def test_file_records_finishing_order_children_first(provider_and_path) -> None:
    provider, path = provider_and_path
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request"), tracer.start_as_current_span("prefill"):
        pass
    assert [s["name"] for s in read_spans(path)] == ["prefill", "request"]


def test_exporter_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    for name in ("first_run", "second_run"):
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(path)))
        with provider.get_tracer("test").start_as_current_span(name):
            pass
        provider.shutdown()
    assert [s["name"] for s in read_spans(path)] == ["first_run", "second_run"]


def test_read_spans_names_file_and_line_of_a_torn_record(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text('{"name": "ok"}\n\n{"name": "cut sho\n')
    with pytest.raises(TelemetryFileError, match=r"spans\.jsonl:3: not a JSON object") as exc:
        read_spans(path)
    assert exc.value.line_number == 3
