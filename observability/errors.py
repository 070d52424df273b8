"""Error types of the telemetry seam. Each names what is wrong and, where it can, the fix.

A malformed `TelemetryConfig` is reported by pydantic's `ValidationError` (at the edge, naming
the field); these types cover what can only fail once the config is acted on.
"""

from __future__ import annotations


class TelemetryError(Exception):
    """Base class for every error raised by `expertmesh.observability`."""


class TelemetryConfigError(TelemetryError):
    """A valid config cannot be put into effect: an optional exporter package is not installed,
    or the output file cannot be opened."""


class TelemetryFileError(TelemetryError):
    """A JSONL telemetry file has a line that is not a JSON object (e.g. a write cut short)."""

    def __init__(self, path: str, line_number: int, reason: str) -> None:
        super().__init__(f"{path}:{line_number}: not a JSON object ({reason})")
        self.path = path
        self.line_number = line_number
