"""configure_telemetry: what each config builds, what it rejects, and what reaches the files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from opentelemetry.metrics import NoOpMeter
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode
from pydantic import ValidationError

from expertmesh.observability import (
    Telemetry,
    TelemetryConfig,
    TelemetryConfigError,
    configure_telemetry,
    read_metrics,
    read_spans,
    spans_by_trace,
)


@pytest.fixture
def jsonl_telemetry(tmp_path: Path):
    telemetry = configure_telemetry(
        TelemetryConfig(exporter="jsonl", jsonl_path=tmp_path / "spans.jsonl")
    )
    yield telemetry, tmp_path / "spans.jsonl"
    telemetry.shutdown()


def _field_error(exc: pytest.ExceptionInfo[ValidationError], field: str) -> str:
    """The message of the one error located at `field`."""
    [error] = [e for e in exc.value.errors() if e["loc"] == (field,)]
    return str(error["msg"])


# --- what reaches the file -------------------------------------------------------------------


def test_jsonl_child_span_links_to_parent_in_same_trace(jsonl_telemetry) -> None:
    telemetry, path = jsonl_telemetry
    with telemetry.tracer.start_as_current_span("request"):
        with telemetry.tracer.start_as_current_span("prefill"):
            pass
        with telemetry.tracer.start_as_current_span("decode_step"):
            pass

    [(trace_id, spans)] = spans_by_trace(path).items()
    assert [s["name"] for s in spans] == ["request", "prefill", "decode_step"]
    root, *children = spans
    assert root["parent_span_id"] is None
    assert all(c["parent_span_id"] == root["span_id"] for c in children)
    assert all(s["trace_id"] == trace_id for s in spans)
    assert len(trace_id) == 32 and len(root["span_id"]) == 16
    int(trace_id, 16)  # hex


def test_span_is_in_file_as_soon_as_it_ends(jsonl_telemetry) -> None:
    telemetry, path = jsonl_telemetry
    with telemetry.tracer.start_as_current_span("prefill"):
        pass
    assert [s["name"] for s in read_spans(path)] == ["prefill"]  # no flush, no shutdown


def test_span_attributes_survive_jsonl_round_trip(jsonl_telemetry) -> None:
    telemetry, path = jsonl_telemetry
    attributes = {
        "expertmesh.model": "mixtral",
        "expertmesh.batch_size": 4,
        "expertmesh.temperature": 0.7,
        "expertmesh.streaming": True,
        "expertmesh.experts": (3, 5),
        "expertmesh.stop": ("\n\n", "</s>"),
    }
    with telemetry.tracer.start_as_current_span("request", attributes=attributes):
        pass

    [span] = read_spans(path)
    assert span["attributes"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()
    }


def test_span_events_status_kind_and_timing_are_recorded(jsonl_telemetry) -> None:
    telemetry, path = jsonl_telemetry
    with telemetry.tracer.start_as_current_span("request", kind=SpanKind.SERVER) as span:
        span.add_event("first_token", {"expertmesh.token_index": 0})
        span.set_status(Status(StatusCode.ERROR, "shard lost"))

    [record] = read_spans(path)
    assert record["kind"] == "SERVER"
    assert record["status"] == {"code": "ERROR", "description": "shard lost"}
    [event] = record["events"]
    assert event["name"] == "first_token"
    assert event["attributes"] == {"expertmesh.token_index": 0}
    assert record["start_time_ns"] <= event["time_ns"] <= record["end_time_ns"]
    assert record["duration_ms"] == (record["end_time_ns"] - record["start_time_ns"]) / 1e6


def test_spans_carry_service_name_resource(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    config = TelemetryConfig(exporter="jsonl", jsonl_path=path, service_name="router")
    with configure_telemetry(config) as telemetry, telemetry.tracer.start_as_current_span("route"):
        pass
    [span] = read_spans(path)
    assert span["resource"]["service.name"] == "router"
    assert span["scope"] == "expertmesh"


def test_two_telemetries_in_one_process_keep_their_spans_apart(tmp_path: Path) -> None:
    a = configure_telemetry(TelemetryConfig(exporter="jsonl", jsonl_path=tmp_path / "a.jsonl"))
    b = configure_telemetry(TelemetryConfig(exporter="jsonl", jsonl_path=tmp_path / "b.jsonl"))
    with a.tracer.start_as_current_span("from_a"):
        pass
    with b.tracer.start_as_current_span("from_b"):
        pass
    a.shutdown()
    b.shutdown()
    assert [s["name"] for s in read_spans(tmp_path / "a.jsonl")] == ["from_a"]
    assert [s["name"] for s in read_spans(tmp_path / "b.jsonl")] == ["from_b"]


def test_sample_ratio_zero_records_no_spans(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    config = TelemetryConfig(exporter="jsonl", jsonl_path=path, sample_ratio=0.0)
    with (
        configure_telemetry(config) as telemetry,
        telemetry.tracer.start_as_current_span("request") as span,
    ):
        assert not span.is_recording()
    assert read_spans(path) == []


def test_shutdown_twice_is_harmless(jsonl_telemetry) -> None:
    telemetry, _ = jsonl_telemetry
    telemetry.shutdown()
    telemetry.shutdown()
    assert telemetry.force_flush() is False


# --- disabled --------------------------------------------------------------------------------


def test_disabled_config_gives_noop_tracer_and_meter() -> None:
    telemetry = configure_telemetry(TelemetryConfig(exporter="none"))
    assert isinstance(telemetry.tracer, NoOpTracer)
    assert isinstance(telemetry.meter, NoOpMeter)
    assert not telemetry.enabled
    assert not telemetry.tracing_enabled


def test_disabled_classmethod_gives_noop_tracer_and_meter() -> None:
    telemetry = Telemetry.disabled()
    assert isinstance(telemetry.tracer, NoOpTracer)
    assert isinstance(telemetry.meter, NoOpMeter)
    assert not telemetry.enabled


def test_disabled_spans_do_not_record_and_write_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    telemetry = configure_telemetry(TelemetryConfig())
    with telemetry.tracer.start_as_current_span("request", attributes={"a": 1}) as span:
        span.set_attribute("b", 2)
        assert not span.is_recording()
    telemetry.meter.create_counter("expertmesh.requests").add(1)
    telemetry.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_metrics_only_config_keeps_tracer_noop(tmp_path: Path) -> None:
    config = TelemetryConfig(metrics_exporter="jsonl", metrics_jsonl_path=tmp_path / "m.jsonl")
    with configure_telemetry(config) as telemetry:
        assert isinstance(telemetry.tracer, NoOpTracer)
        assert telemetry.metrics_enabled and not telemetry.tracing_enabled


# --- metrics ---------------------------------------------------------------------------------


def test_counter_is_recorded_to_jsonl_on_flush(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    config = TelemetryConfig(metrics_exporter="jsonl", metrics_jsonl_path=path)
    with configure_telemetry(config) as telemetry:
        counter = telemetry.meter.create_counter("expertmesh.tokens", unit="{token}")
        counter.add(5, {"expertmesh.phase": "decode"})
        counter.add(2, {"expertmesh.phase": "decode"})
        assert telemetry.force_flush()

    [point] = [m for m in read_metrics(path) if m["name"] == "expertmesh.tokens"][-1:]
    assert point["kind"] == "sum" and point["is_monotonic"] is True
    assert point["value"] == 7
    assert point["attributes"] == {"expertmesh.phase": "decode"}
    assert point["unit"] == "{token}"
    assert point["resource"]["service.name"] == "expertmesh"


def test_histogram_is_recorded_to_jsonl_with_buckets(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    config = TelemetryConfig(metrics_exporter="jsonl", metrics_jsonl_path=path)
    with configure_telemetry(config) as telemetry:
        histogram = telemetry.meter.create_histogram("expertmesh.ttft", unit="ms")
        for ms in (12.0, 30.0, 700.0):
            histogram.record(ms)
        telemetry.force_flush()

    [point] = [m for m in read_metrics(path) if m["name"] == "expertmesh.ttft"][-1:]
    assert point["kind"] == "histogram"
    assert point["count"] == 3 and point["sum"] == 742.0
    assert (point["min"], point["max"]) == (12.0, 700.0)
    assert sum(point["bucket_counts"]) == 3


def test_prometheus_registry_exposes_counter() -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    with configure_telemetry(TelemetryConfig(metrics_exporter="prometheus")) as telemetry:
        telemetry.meter.create_counter("expertmesh.requests").add(3, {"route": "chat"})
        assert telemetry.prometheus_registry is not None
        samples = [
            s
            for family in telemetry.prometheus_registry.collect()
            for s in family.samples
            if s.name == "expertmesh_requests_total"
        ]
    assert [(s.labels["route"], s.value) for s in samples] == [("chat", 3.0)]


# --- validation at the edge ------------------------------------------------------------------


def test_jsonl_exporter_without_path_names_field_and_fix() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="jsonl")
    message = _field_error(exc, "jsonl_path")
    assert "required when exporter is 'jsonl'" in message
    assert "set jsonl_path" in message


def test_jsonl_path_without_jsonl_exporter_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="console", jsonl_path=tmp_path / "spans.jsonl")
    assert "remove jsonl_path" in _field_error(exc, "jsonl_path")


def test_jsonl_metrics_exporter_without_path_names_field() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(metrics_exporter="jsonl")
    assert "set metrics_jsonl_path" in _field_error(exc, "metrics_jsonl_path")


def test_spans_and_metrics_cannot_share_a_file(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(
            exporter="jsonl", jsonl_path=path, metrics_exporter="jsonl", metrics_jsonl_path=path
        )
    assert "must differ from jsonl_path" in _field_error(exc, "metrics_jsonl_path")


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_sample_ratio_outside_zero_to_one_is_rejected(ratio: float) -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(sample_ratio=ratio)
    assert _field_error(exc, "sample_ratio")


def test_unknown_exporter_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="zipkin")  # type: ignore[arg-type]
    assert "'jsonl'" in _field_error(exc, "exporter")


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="none", sampling=0.5)  # type: ignore[call-arg]
    assert _field_error(exc, "sampling")


def test_otlp_endpoint_with_signal_path_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="otlp", otlp_endpoint="http://collector:4318/v1/traces")
    assert "give the base URL" in _field_error(exc, "otlp_endpoint")


def test_otlp_endpoint_without_otlp_exporter_is_rejected() -> None:
    with pytest.raises(ValidationError) as exc:
        TelemetryConfig(exporter="console", otlp_endpoint="http://collector:4318")
    assert "remove otlp_endpoint" in _field_error(exc, "otlp_endpoint")


# --- errors when the config is put into effect ------------------------------------------------


def test_otlp_without_exporter_package_says_how_to_install(monkeypatch) -> None:
    # A None entry in sys.modules makes the import fail, installed or not.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(TelemetryConfigError, match=r"pip install 'expertmesh\[otlp\]'"):
        configure_telemetry(TelemetryConfig(exporter="otlp"))


def test_unopenable_jsonl_path_fails_at_configuration(tmp_path: Path) -> None:
    config = TelemetryConfig(exporter="jsonl", jsonl_path=tmp_path / "missing" / "spans.jsonl")
    with pytest.raises(TelemetryConfigError, match="cannot open"):
        configure_telemetry(config)
