"""OpenTelemetry seam: tracer and meter providers configured in one place (`telemetry.py`),
handed to components by constructor, never set globally; a JSONL span/metric exporter and
readers (`jsonl_exporter.py`). Imports no other expertmesh package."""

from .errors import TelemetryConfigError, TelemetryError, TelemetryFileError
from .jsonl_exporter import (
    JsonlMetricExporter,
    JsonlSpanExporter,
    read_metrics,
    read_spans,
    spans_by_trace,
)
from .telemetry import Telemetry, TelemetryConfig, configure_telemetry

__all__ = [
    "JsonlMetricExporter",
    "JsonlSpanExporter",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TelemetryError",
    "TelemetryFileError",
    "configure_telemetry",
    "read_metrics",
    "read_spans",
    "spans_by_trace",
]
