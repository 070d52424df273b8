"""OTLP for real: spans leave through the OpenTelemetry OTLP/HTTP exporter to a receiver in
this test that decodes the protobuf (`opentelemetry-proto`), and each request is one trace
with every hop (HTTP entry, selector, engine request, engine steps, expert dispatch, the
expert shards' own spans) and the GenAI semantic-convention attribute names."""

from __future__ import annotations

import asyncio
import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from expertmesh.cluster.dispatch import InProcessShardPool
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard
from expertmesh.models.checkpoint import read_config
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.policies import DEFAULT_POLICY
from expertmesh.serving.api import make_api
from expertmesh.serving.gate import SelectorGate
from expertmesh.serving.local_engine import ExpertMeshEngine

trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="opentelemetry-proto missing: install the dev extra (pip install -e '.[dev]')",
)
pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    reason="the OTLP/HTTP exporter is missing: install the dev extra (pip install -e '.[dev]')",
)

HOPS = {
    "chat expertmesh-demo",
    "expertmesh.select",
    "expertmesh.engine.request",
    "expertmesh.engine.step",
    "expertmesh.dispatch",
    "expertmesh.shard.compute",
}
GENAI_ROOT_ATTRIBUTES = {
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
}


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) for every span received."""
        out = []
        for request in self.requests:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out += [(resource, span) for span in ss.spans]
        return out


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.headers["Content-Type"] == "application/x-protobuf"
        request = trace_service.ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.requests.append(request)
        self.server.paths.append(self.path)
        reply = trace_service.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_each_request_is_one_otlp_trace_with_every_hop_and_genai_names(receiver):
    from fastapi.testclient import TestClient

    otlp = {"exporter": "otlp", "otlp_endpoint": receiver.endpoint}
    telemetry = configure_telemetry(TelemetryConfig(**otlp))
    config = read_config(DEMO_MODEL_DIR)
    nodes = {"a": [0, 2, 4, 6], "b": [1, 3, 5, 7]}
    shards = {
        n: ExpertShard(
            n, str(DEMO_MODEL_DIR), dict.fromkeys(config.moe_layer_ids, ids), telemetry=otlp
        )
        for n, ids in nodes.items()
    }
    routes = {
        (layer, e): [(n, 1.0)]
        for layer in config.moe_layer_ids
        for n, ids in nodes.items()
        for e in ids
    }
    ep = ExpertParallelModel.from_routes(
        DEMO_MODEL_DIR, routes, InProcessShardPool(shards), tracer=telemetry.tracer
    )
    engine = ExpertMeshEngine(
        "expertmesh-demo", ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR), tracer=telemetry.tracer
    )
    gate = SelectorGate.from_policy_file(DEFAULT_POLICY, engine, tracer=telemetry.tracer)
    client = TestClient(make_api(engine, gate=gate, tracer=telemetry.tracer))
    trace_ids = []
    try:
        for rid in ("otlp-1", "otlp-2"):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": "expertmesh-demo",
                    "messages": [{"role": "user", "content": "ROMEO:"}],
                    "max_tokens": 3,
                },
                headers={"x-request-id": rid},
            )
            assert r.status_code == 200, r.text
            trace_ids.append(r.headers["x-trace-id"])
    finally:
        asyncio.run(engine.shutdown())
    telemetry.shutdown()  # flushes the batch processor: the last spans go out now
    for shard in shards.values():
        shard.flush_telemetry()

    assert receiver.requests and set(receiver.paths) == {"/v1/traces"}
    spans = receiver.spans()
    by_trace: dict[str, list] = {}
    for resource, span in spans:
        by_trace.setdefault(span.trace_id.hex(), []).append((resource, span))
    roots = [
        (t, s)
        for t, group in by_trace.items()
        for _, s in group
        if s.name == "chat expertmesh-demo"
    ]
    assert sorted(t for t, _ in roots) == sorted(trace_ids)  # one trace per request
    for trace_id, rid in zip(trace_ids, ("otlp-1", "otlp-2")):
        group = by_trace[trace_id]
        names = {s.name for _, s in group}
        assert names >= HOPS, HOPS - names
        ids = {s.span_id for _, s in group}
        assert [s.name for _, s in group if s.parent_span_id not in ids] == [
            "chat expertmesh-demo"
        ]  # everything else hangs under the request's root
        root = next(s for _, s in group if s.name == "chat expertmesh-demo")
        attributes = {a.key: _value(a.value) for a in root.attributes}
        assert attributes.keys() >= GENAI_ROOT_ATTRIBUTES, GENAI_ROOT_ATTRIBUTES - attributes.keys()
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.usage.output_tokens"] == 3
        assert attributes["expertmesh.request_id"] == rid
        assert root.kind == root.SPAN_KIND_SERVER
        shard_nodes = {
            _value(a.value)
            for _, s in group
            if s.name == "expertmesh.shard.compute"
            for a in s.attributes
            if a.key == "expertmesh.node"
        }
        assert shard_nodes == {"a", "b"}
        assert {r.get("service.name") for r, _ in group} >= {"expertmesh"}
