"""The engine's metrics on /metrics (Prometheus, through the OpenTelemetry SDK): expert
tokens, router imbalance, entropy and flip rate, KV bytes and compression, link bytes."""

from __future__ import annotations

import asyncio
import re

from fastapi.testclient import TestClient

from expertmesh.cluster.dispatch import InProcessShardPool
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.shard import ExpertShard
from expertmesh.models.checkpoint import read_config
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.serving.api import make_api
from expertmesh.serving.local_engine import ExpertMeshEngine


def value(text: str, name: str, **labels: object) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_describe_what_tokens_per_second_hides():
    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    config = read_config(DEMO_MODEL_DIR)
    nodes = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    shards = {
        n: ExpertShard(n, str(DEMO_MODEL_DIR), dict.fromkeys(config.moe_layer_ids, ids))
        for n, ids in nodes.items()
    }
    routes = {
        (layer, e): [(n, 1.0)]
        for layer in config.moe_layer_ids
        for n, ids in nodes.items()
        for e in ids
    }
    ep = ExpertParallelModel.from_routes(DEMO_MODEL_DIR, routes, InProcessShardPool(shards))
    engine = ExpertMeshEngine(
        "expertmesh-demo",
        ep.model,
        Tokenizer.from_dir(DEMO_MODEL_DIR),
        owner=ep,
        meter=telemetry.meter,
    )
    client = TestClient(
        make_api(engine, meter=telemetry.meter, prometheus_registry=telemetry.prometheus_registry)
    )
    usage_tokens = 0
    try:
        for prompt in ("ROMEO:", "To be, or not to be"):
            r = client.post(
                "/v1/completions",
                json={"model": "expertmesh-demo", "prompt": prompt, "max_tokens": 6},
            )
            assert r.status_code == 200
            usage, finish = r.json()["usage"], r.json()["choices"][0]["finish_reason"]
            # every visible token but the last is fed back; at a stop, the last one was fed to
            # sample the end-of-turn token (which usage does not count)
            usage_tokens += usage["prompt_tokens"] + usage["completion_tokens"]
            usage_tokens -= finish == "length"
        text = client.get("/metrics").text
    finally:
        asyncio.run(engine.shutdown())
    top_k = config.moe.top_k
    for layer in config.moe_layer_ids:
        # every token that went through the model visited top_k experts in each MoE layer
        assert value(text, "expertmesh_expert_tokens_total", layer=layer) == usage_tokens * top_k
        imbalance = value(text, "expertmesh_router_imbalance", layer=layer)
        assert 1.0 <= imbalance <= config.moe.num_experts
        assert 0.0 < value(text, "expertmesh_router_entropy", layer=layer) <= 1.0
        assert 0.0 <= value(text, "expertmesh_router_flip_rate", layer=layer) <= 1.0
    assert value(text, "expertmesh_kv_cache_compression_ratio") > 1.0  # latent cache
    assert value(text, "expertmesh_link_bytes_total", node="a") > 0
    assert value(text, "expertmesh_link_bytes_total", node="b") > 0
    assert re.search(r"gen_ai_server_time_to_first_token_seconds_count\{[^}]*\} 2\.0", text)
