"""Structured JSON logs: the formatter's ids, one file per process, one request across files."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import format_span_id, format_trace_id

from expertmesh.observability.jsonl_exporter import JsonlSpanExporter
from expertmesh.observability.logs import (
    JsonLogFormatter,
    bind_request_id,
    configure_json_logging,
    default_log_dir,
    read_request_logs,
    request_id_var,
)


def _record(message: str = "hello", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("expertmesh.test", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_formatter_carries_ids_of_the_current_span() -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    formatter = JsonLogFormatter("shard-3")
    with provider.get_tracer("test").start_as_current_span("dispatch") as span:
        line = json.loads(formatter.format(_record()))
    context = span.get_span_context()
    assert line["trace_id"] == format_trace_id(context.trace_id)
    assert line["span_id"] == format_span_id(context.span_id)
    assert (line["process"], line["pid"], line["level"]) == ("shard-3", os.getpid(), "INFO")
    assert line["logger"] == "expertmesh.test" and line["message"] == "hello"
    outside = json.loads(formatter.format(_record()))
    assert "trace_id" not in outside and "span_id" not in outside


def test_bound_request_id_is_logged_and_reset_after() -> None:
    formatter = JsonLogFormatter("api")
    with bind_request_id("req-7"):
        assert json.loads(formatter.format(_record()))["request_id"] == "req-7"
    assert request_id_var.get() is None
    assert "request_id" not in json.loads(formatter.format(_record()))


def test_extra_fields_and_exceptions_are_kept() -> None:
    formatter = JsonLogFormatter("api")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = _record("failed", tokens=12, where=Path("/x"))
        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert line["tokens"] == 12 and line["where"] == "/x"
    assert "RuntimeError: boom" in line["exception"]


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("expertmesh.test.logs")
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.NOTSET)


def test_configure_writes_one_file_per_process_once(tmp_path: Path, logger) -> None:
    path = configure_json_logging(tmp_path / "logs", "shard 3", logger=logger)
    assert path == (tmp_path / "logs" / f"shard_3-{os.getpid()}.jsonl").resolve()
    assert configure_json_logging(tmp_path / "logs", "shard 3", logger=logger) == path
    assert sum(isinstance(h, logging.FileHandler) for h in logger.handlers) == 1
    with bind_request_id("req-1"):
        logger.info("loaded %d experts", 4)
    logger.debug("not written")
    [line] = [json.loads(x) for x in path.read_text().splitlines()]
    assert (line["message"], line["request_id"], line["process"]) == (
        "loaded 4 experts",
        "req-1",
        "shard 3",
    )


def test_default_log_dir_follows_expertmesh_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path))
    assert default_log_dir() == tmp_path / "logs"
    monkeypatch.delenv("EXPERTMESH_HOME")
    assert default_log_dir() == Path.home() / ".expertmesh" / "logs"


def _write_lines(path: Path, lines: list[dict], partial: str = "") -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + partial)


def test_request_logs_gathered_across_files_by_request_and_trace_id(tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(spans)))
    with provider.get_tracer("test").start_as_current_span(
        "request", attributes={"expertmesh.request_id": "req-1"}
    ) as span:
        trace_id = format_trace_id(span.get_span_context().trace_id)
    provider.shutdown()

    logs = tmp_path / "logs"
    logs.mkdir()
    _write_lines(
        logs / "api-1.jsonl",
        [
            {"time_unix_nano": 30, "process": "api", "message": "done", "request_id": "req-1"},
            {"time_unix_nano": 10, "process": "api", "message": "start", "request_id": "req-1"},
            {"time_unix_nano": 15, "process": "api", "message": "other", "request_id": "req-2"},
        ],
        partial='{"time_unix_nano": 40, "mess',  # a write in progress
    )
    _write_lines(
        logs / "shard-2.jsonl",
        [
            {"time_unix_nano": 20, "process": "shard", "message": "dispatch", "trace_id": trace_id},
            {"time_unix_nano": 25, "process": "shard", "message": "x", "trace_id": "f" * 32},
        ],
    )
    lines = read_request_logs(logs, "req-1", spans_path=spans)
    assert [x["message"] for x in lines] == ["start", "dispatch", "done"]
    assert [x["file"] for x in lines] == ["api-1.jsonl", "shard-2.jsonl", "api-1.jsonl"]
    # Without the spans file only lines that carry the request id match.
    assert [x["message"] for x in read_request_logs(logs, "req-1")] == ["start", "done"]


def test_request_logs_of_a_missing_directory_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_request_logs(tmp_path / "nope", "req-1")
