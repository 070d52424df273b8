"""OpenTelemetry seam: tracer and meter providers configured in one place (`telemetry.py`),
handed to components by constructor, never set globally; a JSONL span/metric exporter and
readers (`jsonl_exporter.py`); fault events (`events.py`), the FMEA built from all three
(`fmea.py`, `fmea_report.py`) and structured JSON logs (`logs.py`). Imports no other expertmesh
package."""

from .errors import TelemetryConfigError, TelemetryError, TelemetryFileError
from .events import FAILURE_MODES, EventFileError, EventLog, FaultEvent, read_events
from .fmea import FmeaInputs, FmeaReport, build_fmea
from .jsonl_exporter import (
    JsonlMetricExporter,
    JsonlSpanExporter,
    read_metrics,
    read_spans,
    spans_by_trace,
)
from .logs import (
    JsonLogFormatter,
    bind_request_id,
    configure_json_logging,
    read_request_logs,
    request_id_var,
)
from .telemetry import Telemetry, TelemetryConfig, configure_telemetry

__all__ = [
    "FAILURE_MODES",
    "EventFileError",
    "EventLog",
    "FaultEvent",
    "FmeaInputs",
    "FmeaReport",
    "JsonLogFormatter",
    "JsonlMetricExporter",
    "JsonlSpanExporter",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TelemetryError",
    "TelemetryFileError",
    "bind_request_id",
    "build_fmea",
    "configure_json_logging",
    "configure_telemetry",
    "read_events",
    "read_metrics",
    "read_request_logs",
    "read_spans",
    "request_id_var",
    "spans_by_trace",
]
