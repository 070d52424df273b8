"""One trace per request, readable end to end from the JSONL exporter: HTTP entry, selector,
engine request, engine steps, expert dispatch and the expert shards' own spans."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from expertmesh.cluster.dispatch import InProcessShardPool
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard
from expertmesh.models.checkpoint import read_config
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.observability.jsonl_exporter import spans_by_trace
from expertmesh.policies import DEFAULT_POLICY
from expertmesh.serving.api import make_api
from expertmesh.serving.gate import SelectorGate
from expertmesh.serving.local_engine import ExpertMeshEngine


def test_a_request_trace_reads_from_http_entry_to_expert_shards(tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    telemetry = configure_telemetry(TelemetryConfig(exporter="jsonl", jsonl_path=spans_file))
    config = read_config(DEMO_MODEL_DIR)
    nodes = {"a": [0, 2, 4, 6], "b": [1, 3, 5, 7]}
    shards = {
        n: ExpertShard(
            n,
            str(DEMO_MODEL_DIR),
            {layer: ids for layer in config.moe_layer_ids},
            telemetry={"exporter": "jsonl", "jsonl_path": str(spans_file)},
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
    try:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "expertmesh-demo",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
            },
            headers={"x-request-id": "trace-me"},
        )
        assert r.status_code == 200
    finally:
        asyncio.run(engine.shutdown())
    telemetry.shutdown()
    for shard in shards.values():
        shard.flush_telemetry()
    traces = spans_by_trace(spans_file)
    trace_id = r.headers["x-trace-id"]
    spans = traces[trace_id]
    names = {s["name"] for s in spans}
    assert {
        "chat expertmesh-demo",
        "expertmesh.select",
        "expertmesh.engine.request",
        "expertmesh.engine.step",
        "expertmesh.dispatch",
        "expertmesh.shard.compute",
    } <= names
    root = next(s for s in spans if s["name"] == "chat expertmesh-demo")
    assert root["parent_span_id"] is None
    assert root["attributes"]["gen_ai.operation.name"] == "chat"
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert root["attributes"]["expertmesh.request_id"] == "trace-me"
    nodes_seen = {
        s["attributes"]["expertmesh.node"] for s in spans if s["name"] == "expertmesh.shard.compute"
    }
    assert nodes_seen == {"a", "b"}
