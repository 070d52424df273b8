"""Tracer and meter providers, configured in one place and handed to components by constructor.

    telemetry = configure_telemetry(TelemetryConfig(exporter="jsonl", jsonl_path="spans.jsonl"))
    generator = Generator(model, tokenizer, tracer=telemetry.tracer)
    ...
    telemetry.shutdown()

Nothing here touches OpenTelemetry's global providers (`trace.set_tracer_provider`): each
`Telemetry` owns its own `TracerProvider` / `MeterProvider`, so two configurations can live in
one process (a test beside a server) and nothing is reached by import. With tracing off the
tracer is OpenTelemetry's `NoOpTracer` (likewise `NoOpMeter`), so instrumented code costs a
function call; code that builds expensive attributes checks `telemetry.tracing_enabled` first.

Span processors, by exporter:
- "jsonl", "console": `SimpleSpanProcessor`, which exports each span as it ends, in the thread
  that ended it. Writing one line to a local file or stderr costs microseconds; in exchange a
  span is in the file the moment it ends (tests and `jq` see it at once, a crash loses nothing)
  and there is no background thread to flush or lose.
- "otlp": `BatchSpanProcessor`. A network round trip per span would sit on the request path;
  batches go from a background thread, and `shutdown()` (or `force_flush()`) sends the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from opentelemetry.metrics import Meter, NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NoOpTracer, Tracer
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .errors import TelemetryConfigError
from .jsonl_exporter import JsonlMetricExporter, JsonlSpanExporter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

SCOPE = "expertmesh"
"""Instrumentation scope of `Telemetry.tracer` and `Telemetry.meter`."""

OTLP_INSTALL_HINT = "pip install 'expertmesh[otlp]'"
PROMETHEUS_INSTALL_HINT = "pip install opentelemetry-exporter-prometheus"


class TelemetryConfig(BaseModel):
    """Where traces and metrics go: what a user writes (YAML, CLI flags). Everything off by
    default; each exporter's own settings are required with it and rejected without it."""

    # validate_default: the "required when" checks must run when a path is left out. Each
    # field validator reads fields declared before its own (`info.data`): keep the order.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True
    )

    exporter: Literal["none", "console", "otlp", "jsonl"] = "none"
    """Span exporter. "none": tracing off (a no-op tracer); "console": JSON to stderr;
    "otlp": OTLP/HTTP to a collector (needs the `otlp` extra); "jsonl": one line per span
    appended to `jsonl_path`."""

    jsonl_path: Path | None = None
    """File spans are appended to; required when `exporter` is "jsonl", and only then."""

    metrics_exporter: Literal["none", "console", "otlp", "prometheus", "jsonl"] = "none"
    """Metric exporter. "none": metrics off (a no-op meter); "console": JSON to stderr every
    `metrics_export_interval_s`; "otlp": OTLP/HTTP push; "prometheus": kept in
    `Telemetry.prometheus_registry` for the server to expose at /metrics (pull); "jsonl": one line
    per data point appended to `metrics_jsonl_path`."""

    metrics_jsonl_path: Path | None = None
    """File metric data points are appended to; required when `metrics_exporter` is "jsonl"."""

    metrics_export_interval_s: float = Field(default=60.0, gt=0)
    """Seconds between pushes of the push exporters ("console", "otlp", "jsonl")."""

    otlp_endpoint: str | None = None
    """Base URL of the collector's OTLP/HTTP receiver, e.g. "http://collector:4318";
    "/v1/traces" and "/v1/metrics" are appended. Unset: the exporter's own default
    (`OTEL_EXPORTER_OTLP_ENDPOINT`, else http://localhost:4318)."""

    service_name: str = Field(default="expertmesh", min_length=1)
    """`service.name` resource attribute on every span and metric."""

    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of traces recorded. Decided once per trace from its id, at the root span;
    child spans (and remote children that propagate the decision) follow their parent, so a
    trace is recorded whole or not at all."""

    @field_validator("jsonl_path", mode="after")
    @classmethod
    def _jsonl_path_iff_jsonl(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _required_iff(path, info, selector="exporter", field="jsonl_path", what="spans")

    @field_validator("metrics_jsonl_path", mode="after")
    @classmethod
    def _metrics_jsonl_path_iff_jsonl(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        path = _required_iff(
            path,
            info,
            selector="metrics_exporter",
            field="metrics_jsonl_path",
            what="metric data points",
        )
        if path is not None and path == info.data.get("jsonl_path"):
            raise ValueError(
                "must differ from jsonl_path: spans and metric data points go to separate files"
            )
        return path

    @field_validator("otlp_endpoint", mode="after")
    @classmethod
    def _otlp_endpoint_is_base_url(cls, endpoint: str | None, info: ValidationInfo) -> str | None:
        if endpoint is None:
            return None
        exporters = (info.data.get("exporter"), info.data.get("metrics_exporter"))
        if "otlp" not in exporters:
            raise ValueError(
                "only used when exporter or metrics_exporter is 'otlp': set one to 'otlp' or "
                "remove otlp_endpoint"
            )
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"{endpoint!r} is not an http(s) URL: write e.g. 'http://collector:4318'"
            )
        endpoint = endpoint.rstrip("/")
        if endpoint.endswith(("/v1/traces", "/v1/metrics")):
            raise ValueError(
                f"{endpoint!r} names one signal's path: give the base URL (without /v1/traces or "
                "/v1/metrics), both paths are appended"
            )
        return endpoint


def _required_iff(
    path: Path | None, info: ValidationInfo, *, selector: str, field: str, what: str
) -> Path | None:
    """`path` must be given exactly when `info.data[selector]` is "jsonl"."""
    if selector not in info.data:  # the selector itself failed validation; that error suffices
        return path
    chosen = info.data[selector]
    if chosen == "jsonl" and path is None:
        raise ValueError(
            f"required when {selector} is 'jsonl': set {field} to the file {what} are appended to"
        )
    if chosen != "jsonl" and path is not None:
        raise ValueError(
            f"only used when {selector} is 'jsonl' ({selector} is {chosen!r}): set {selector} "
            f"to 'jsonl' or remove {field}"
        )
    return path


class Telemetry:
    """The tracer and meter a process's components are given, and the providers behind them.

    Build one with `configure_telemetry` (or `Telemetry.disabled()`), pass `tracer` / `meter`
    to components by constructor, and call `shutdown()` once when the process is done (or use
    it as a context manager). Tests of other packages can inject their own providers, e.g. a
    `TracerProvider` with an `InMemorySpanExporter`.

    `prometheus_registry` (metrics_exporter "prometheus", else None) is the registry for the
    server to expose at /metrics, e.g. `prometheus_client.make_asgi_app(registry=...)`; it
    belongs to this object, not to prometheus_client's process-wide default registry.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        prometheus_registry: CollectorRegistry | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.tracer: Tracer = tracer_provider.get_tracer(SCOPE) if tracer_provider else NoOpTracer()
        self.meter: Meter = meter_provider.get_meter(SCOPE) if meter_provider else NoOpMeter(SCOPE)
        self.prometheus_registry = prometheus_registry
        self._shut_down = False

    @classmethod
    def disabled(cls) -> Self:
        """Tracing and metrics off: a `NoOpTracer` and a `NoOpMeter`."""
        return cls()

    @property
    def tracing_enabled(self) -> bool:
        """Spans go somewhere (they may still be sampled out)."""
        return self._tracer_provider is not None

    @property
    def metrics_enabled(self) -> bool:
        """Measurements go somewhere."""
        return self._meter_provider is not None

    @property
    def enabled(self) -> bool:
        """Either signal is on. Code deciding whether to build span attributes can ask the
        narrower `tracing_enabled`."""
        return self.tracing_enabled or self.metrics_enabled

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        """Export what is buffered (batched spans) and collect and export metrics now. True if
        every exporter finished within `timeout_ms`."""
        if self._shut_down:
            return False
        ok = True
        if self._tracer_provider is not None:
            ok = self._tracer_provider.force_flush(timeout_ms) and ok
        if self._meter_provider is not None:
            ok = self._meter_provider.force_flush(timeout_ms) and ok
        return ok

    def shutdown(self) -> None:
        """Flush and close every exporter (files, connections, background threads). Idempotent;
        the tracer and meter are inert afterwards."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def configure_telemetry(config: TelemetryConfig) -> Telemetry:
    """Build the providers and exporters `config` asks for. Raises `TelemetryConfigError` when an
    exporter's optional package is missing or its file cannot be opened; nothing is left open
    when it does."""
    if config.exporter == "none" and config.metrics_exporter == "none":
        return Telemetry.disabled()
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES; our service.name takes precedence.
    resource = Resource.create({SERVICE_NAME: config.service_name})
    tracer_provider = _tracer_provider(config, resource)
    try:
        meter_provider, registry = _meter_provider(config, resource)
    except BaseException:
        if tracer_provider is not None:
            tracer_provider.shutdown()
        raise
    return Telemetry(tracer_provider, meter_provider, prometheus_registry=registry)


def _tracer_provider(config: TelemetryConfig, resource: Resource) -> TracerProvider | None:
    if config.exporter == "none":
        return None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)), resource=resource
    )
    provider.add_span_processor(_span_processor(config))
    return provider


def _span_processor(config: TelemetryConfig) -> SpanProcessor:
    """See the module docstring for why each exporter gets the processor it gets."""
    if config.exporter == "jsonl":
        assert config.jsonl_path is not None  # TelemetryConfig requires it
        return SimpleSpanProcessor(JsonlSpanExporter(config.jsonl_path))
    if config.exporter == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    if config.exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise TelemetryConfigError(
                f"exporter 'otlp' needs opentelemetry-exporter-otlp-proto-http: {OTLP_INSTALL_HINT}"
            ) from e
        exporter: SpanExporter = OTLPSpanExporter(endpoint=_otlp_url(config, "traces"))
        return BatchSpanProcessor(exporter)
    # The Literal type of `exporter` keeps this unreachable.
    raise AssertionError(f"unhandled exporter {config.exporter!r}")


def _meter_provider(
    config: TelemetryConfig, resource: Resource
) -> tuple[MeterProvider | None, CollectorRegistry | None]:
    if config.metrics_exporter == "none":
        return None, None
    registry: CollectorRegistry | None = None
    reader: MetricReader
    if config.metrics_exporter == "prometheus":
        registry, reader = _prometheus_reader()
    else:
        reader = PeriodicExportingMetricReader(
            _push_metric_exporter(config),
            export_interval_millis=config.metrics_export_interval_s * 1000,
        )
    return MeterProvider(resource=resource, metric_readers=[reader]), registry


def _push_metric_exporter(config: TelemetryConfig) -> MetricExporter:
    if config.metrics_exporter == "jsonl":
        assert config.metrics_jsonl_path is not None  # TelemetryConfig requires it
        return JsonlMetricExporter(config.metrics_jsonl_path)
    if config.metrics_exporter == "console":
        return ConsoleMetricExporter(out=sys.stderr)
    if config.metrics_exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError as e:
            raise TelemetryConfigError(
                "metrics_exporter 'otlp' needs opentelemetry-exporter-otlp-proto-http: "
                f"{OTLP_INSTALL_HINT}"
            ) from e
        exporter: MetricExporter = OTLPMetricExporter(endpoint=_otlp_url(config, "metrics"))
        return exporter
    raise AssertionError(f"unhandled metrics_exporter {config.metrics_exporter!r}")


def _prometheus_reader() -> tuple[CollectorRegistry, MetricReader]:
    """A reader registered in a registry of its own, not prometheus_client's process-wide one."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry
    except ImportError as e:
        raise TelemetryConfigError(
            f"metrics_exporter 'prometheus' needs opentelemetry-exporter-prometheus: {PROMETHEUS_INSTALL_HINT}"
        ) from e
    registry = CollectorRegistry()
    try:
        reader: MetricReader = PrometheusMetricReader(registry=registry)
    except TypeError as e:  # releases before the `registry` argument only use the global one
        raise TelemetryConfigError(
            "metrics_exporter 'prometheus' needs an opentelemetry-exporter-prometheus that takes "
            f"a registry: pip install -U opentelemetry-exporter-prometheus ({e})"
        ) from e
    return registry, reader


def _otlp_url(config: TelemetryConfig, signal: Literal["traces", "metrics"]) -> str | None:
    return f"{config.otlp_endpoint}/v1/{signal}" if config.otlp_endpoint is not None else None
