"""Structured JSON logs: one JSON object per line carrying the trace, span and request ids, one
file per process in a directory every process of the local cluster shares, and a reader that
gathers one request's lines from all of them.

    log_path = configure_json_logging(process_name="shard-3")   # once, at process start
    with bind_request_id(request_id):                             # serving, per request
        logger.info("dispatching %d tokens", n)                   # carries request/trace ids
    read_request_logs(default_log_dir(), request_id, spans_path="spans.jsonl")

A line looks like:

    {"time": "2025-01-01T12:00:00.123456Z", "time_unix_nano": ..., "level": "INFO",
     "logger": "expertmesh.cluster.shard", "message": "...", "process": "shard-3", "pid": 4242,
     "host": "node-a", "thread": "MainThread", "trace_id": "4bf9...", "span_id": "00f0...",
     "request_id": "req-17"}

The trace and span ids are those of the OpenTelemetry span current when the record is made
(OpenTelemetry's context, so any tracer's `start_as_current_span` sets them; absent outside a
span); `request_id` is `request_id_var`'s value (absent when unset). Fields given with
`logger.info(..., extra={...})` are kept; values JSON cannot hold are written with `str()`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id

from .jsonl_exporter import Record, read_records, read_spans

REQUEST_ID_ATTRIBUTE = "expertmesh.request_id"
"""Span attribute on a request's root span that names its request id."""

request_id_var: ContextVar[str | None] = ContextVar("expertmesh_request_id", default=None)
"""The id of the request the current task or thread works on; set it with `bind_request_id`.
A ContextVar follows asyncio tasks and `contextvars.copy_context().run`, not plain threads."""


@contextmanager
def bind_request_id(request_id: str) -> Iterator[None]:
    """Log records made inside the block carry `request_id`; the previous value returns after."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonLogFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newline inside). `process_name` names the
    process or node (shard-3, head, api); the pid and host are added beside it."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "time_unix_nano": int(record.created * 1e9),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process_name,
            "pid": record.process,
            "host": self.host,
            "thread": record.threadName,
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format_trace_id(context.trace_id)
            line["span_id"] = format_span_id(context.span_id)
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in line:
                line[key] = value
        return json.dumps(line, default=str, separators=(",", ":"))


def default_log_dir() -> Path:
    """`$EXPERTMESH_HOME/logs`, else `~/.expertmesh/logs`."""
    home = os.environ.get("EXPERTMESH_HOME")
    return (Path(home) if home else Path.home() / ".expertmesh") / "logs"


def log_file_name(process_name: str, pid: int | None = None) -> str:
    """`<process_name>-<pid>.jsonl`, the name made safe for a file system."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", process_name) or "process"
    return f"{safe}-{os.getpid() if pid is None else pid}.jsonl"


def configure_json_logging(
    log_dir: Path | str | None = None,
    process_name: str = "expertmesh",
    *,
    level: int = logging.INFO,
    logger: logging.Logger | None = None,
) -> Path:
    """Add a handler writing JSON lines to `<log_dir>/<process_name>-<pid>.jsonl` to `logger`
    (the root logger by default) and return the file's path. `log_dir` defaults to
    `default_log_dir()` and is created. Records at `level` and above are written; the logger's
    own level is lowered to `level` if it was higher (the root logger starts at WARNING), which
    lets such records reach its other handlers too. Calling it again for the same file adds no
    second handler. Each line is flushed as it is written."""
    directory = Path(log_dir) if log_dir is not None else default_log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / log_file_name(process_name)).resolve()
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return path
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(JsonLogFormatter(process_name))
    target.addHandler(handler)
    if target.level == logging.NOTSET or target.level > level:
        target.setLevel(level)
    return path


def read_log_file(path: Path | str) -> list[Record]:
    """The lines of one JSON log file. A last line without its newline (a write in progress) is
    skipped; any other line that is not a JSON object raises `TelemetryFileError`."""
    return read_records(path, skip_unterminated=True)


def request_trace_ids(spans: list[Record], request_id: str) -> set[str]:
    """Trace ids of the spans that carry `expertmesh.request_id` == `request_id`."""
    return {
        s["trace_id"]
        for s in spans
        if (s.get("attributes") or {}).get(REQUEST_ID_ATTRIBUTE) == request_id
    }


def read_request_logs(
    log_dir: Path | str, request_id: str, spans_path: Path | str | None = None
) -> list[Record]:
    """Every line in `log_dir/*.jsonl` that has `request_id`, or (with `spans_path`) a trace id
    the spans file associates with it through `expertmesh.request_id`, ordered by time: the
    request's whole path across processes. Raises FileNotFoundError when `log_dir` is missing."""
    directory = Path(log_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"log directory {directory} does not exist")
    trace_ids = request_trace_ids(read_spans(spans_path), request_id) if spans_path else set()
    matches: list[Record] = []
    for path in sorted(directory.glob("*.jsonl")):
        for record in read_log_file(path):
            if _belongs(record, request_id, trace_ids):
                matches.append({**record, "file": path.name})
    matches.sort(key=lambda r: r.get("time_unix_nano") or 0)
    return matches


def _belongs(record: Mapping[str, Any], request_id: str, trace_ids: set[str]) -> bool:
    return record.get("request_id") == request_id or record.get("trace_id") in trace_ids


__all__ = [
    "JsonLogFormatter",
    "bind_request_id",
    "configure_json_logging",
    "default_log_dir",
    "log_file_name",
    "read_log_file",
    "read_request_logs",
    "request_id_var",
    "request_trace_ids",
]
