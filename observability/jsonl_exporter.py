"""JSON Lines exporters: each finished span (or metric data point) is appended to a file as one
JSON object, and readers turn the file back into records, a request's trace end to end.

A file needs no collector, outlives the process and can be read by a test or by `jq`:

    jq -c 'select(.trace_id == "…") | [.name, .duration_ms]' spans.jsonl

Each export is a single unbuffered `write` to a file opened for appending, under a lock, so
records from concurrent threads never interleave and a record is in the OS's hands when the call
returns. Give each process its own file: appends from several processes to one file on a local
disk do not interleave in practice, but nothing guarantees it (network filesystems least).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import format_span_id, format_trace_id

from .errors import TelemetryConfigError, TelemetryFileError

Record = dict[str, Any]


class _AppendOnlyFile:
    """A file opened once for appending; `append` writes a batch of records as one locked write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # Unbuffered: nothing sits in a Python buffer waiting for a flush that a crash skips.
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise TelemetryConfigError(f"cannot open {path} for appending: {e.strerror}") from e
        self._lock = threading.Lock()

    def append(self, records: Iterable[Mapping[str, Any]]) -> bool:
        """Write `records`, one JSON object a line. False once the file is closed."""
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        with self._lock:
            if self._file.closed:
                return False
            view = memoryview(data)
            while view:  # a regular file takes it all at once; loop in case it does not
                view = view[self._file.write(view) :]
        return True

    def close(self) -> None:
        with self._lock:
            self._file.close()


def span_record(span: ReadableSpan) -> Record:
    """The JSON form of one finished span: ids as lowercase hex (as W3C `traceparent` writes
    them), times in Unix nanoseconds, attribute sequences as lists."""
    context = span.context
    start_ns, end_ns = span.start_time, span.end_time
    scope = span.instrumentation_scope
    duration_ms: float | None = None
    if start_ns is not None and end_ns is not None:
        duration_ms = (end_ns - start_ns) / 1e6
    return {
        "trace_id": format_trace_id(context.trace_id),
        "span_id": format_span_id(context.span_id),
        "parent_span_id": format_span_id(span.parent.span_id) if span.parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_time_ns": start_ns,
        "end_time_ns": end_ns,
        "duration_ms": duration_ms,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
        "links": [
            {
                "trace_id": format_trace_id(link.context.trace_id),
                "span_id": format_span_id(link.context.span_id),
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "scope": scope.name if scope is not None else None,
        "resource": dict(span.resource.attributes),
    }


class JsonlSpanExporter(SpanExporter):
    """Appends one JSON object per finished span (see `span_record`) to `path`.

    The file is opened when the exporter is built, so a bad path fails at configuration time
    (`TelemetryConfigError`), not at the first span.
    """

    def __init__(self, path: Path) -> None:
        self._file = _AppendOnlyFile(Path(path))

    @property
    def path(self) -> Path:
        return self._file.path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        ok = self._file.append(span_record(s) for s in spans)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export is written before it returns

    def shutdown(self) -> None:
        self._file.close()


def metric_records(metrics_data: MetricsData) -> list[Record]:
    """One JSON object per data point: the metric's name, kind ("sum", "gauge", "histogram",
    "exponentialhistogram"), unit, the point's fields (value, or count/sum/buckets) and
    attributes, and the resource and scope that produced it. Exemplars keep their span and
    trace ids as hex, so a slow histogram bucket leads to the trace that filled it."""
    records: list[Record] = []
    for resource_metrics in metrics_data.resource_metrics:
        resource = dict(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                data = metric.data
                temporality = getattr(data, "aggregation_temporality", None)
                for point in data.data_points:
                    fields = {
                        f.name: getattr(point, f.name)
                        for f in dataclasses.fields(point)
                        if f.name not in ("attributes", "exemplars")
                    }
                    records.append(
                        {
                            "name": metric.name,
                            "kind": type(data).__name__.lower(),
                            "unit": metric.unit or "",
                            "description": metric.description or "",
                            "temporality": temporality.name if temporality is not None else None,
                            "is_monotonic": getattr(data, "is_monotonic", None),
                            "attributes": dict(point.attributes or {}),
                            **_plain(fields),
                            "exemplars": [_exemplar_record(x) for x in point.exemplars],
                            "scope": scope_metrics.scope.name,
                            "resource": resource,
                        }
                    )
    return records


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Nested dataclasses (exponential-histogram buckets) as dicts, sequences as lists."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _exemplar_record(exemplar: Any) -> Record:
    return {
        "value": exemplar.value,
        "time_ns": exemplar.time_unix_nano,
        "trace_id": format_trace_id(exemplar.trace_id) if exemplar.trace_id else None,
        "span_id": format_span_id(exemplar.span_id) if exemplar.span_id else None,
        "attributes": dict(exemplar.filtered_attributes or {}),
    }


class JsonlMetricExporter(MetricExporter):
    """Appends one JSON object per metric data point (see `metric_records`) to `path`, once per
    collection. Cumulative temporality (the SDK default): each collection repeats the totals so
    far, so the last record of a series is its current value."""

    def __init__(
        self,
        path: Path,
        preferred_temporality: dict[type, AggregationTemporality] | None = None,
    ) -> None:
        super().__init__(preferred_temporality=preferred_temporality)
        self._file = _AppendOnlyFile(Path(path))

    @property
    def path(self) -> Path:
        return self._file.path

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        ok = self._file.append(metric_records(metrics_data))
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # every export is written before it returns

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._file.close()


def read_records(path: Path | str, skip_unterminated: bool = False) -> list[Record]:
    """Every record of a JSONL telemetry file, in file order. Blank lines are skipped; a line
    that is not a JSON object raises `TelemetryFileError` naming the file and line.
    skip_unterminated: ignore a last line without its newline (a write still in progress)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if skip_unterminated:
        lines = lines[:-1]  # what follows the last newline is empty or still being written
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TelemetryFileError(str(path), number, e.msg) from e
        if not isinstance(record, dict):
            raise TelemetryFileError(str(path), number, f"got {type(record).__name__}")
        records.append(record)
    return records


def read_spans(path: Path | str) -> list[Record]:
    """The spans of a file written by `JsonlSpanExporter`, in the order they finished."""
    return read_records(path)


def read_metrics(path: Path | str) -> list[Record]:
    """The data points of a file written by `JsonlMetricExporter`, in the order collected."""
    return read_records(path)


def spans_by_trace(path: Path | str) -> dict[str, list[Record]]:
    """The spans of a file grouped by trace id, each trace's spans ordered by start time (so a
    parent comes before its children; the file has them in finishing order, children first),
    traces ordered by when they started. One request is one trace, so
    `spans_by_trace(path)[trace_id]` reads that request end to end."""
    traces: dict[str, list[Record]] = {}
    for span in sorted(read_spans(path), key=lambda s: s["start_time_ns"]):
        traces.setdefault(span["trace_id"], []).append(span)
    return traces
