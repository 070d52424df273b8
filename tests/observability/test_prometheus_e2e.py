"""Prometheus for real: a Prometheus server (Debian's `prometheus`, own free port, temporary
config and data directory) scrapes the serving app's /metrics over HTTP, and the
`expertmesh_*` series the alerts use are queryable through its HTTP API."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest

from expertmesh.models.checkpoint import load_model
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.serving.api import make_api
from expertmesh.serving.local_engine import ExpertMeshEngine

pytestmark = [pytest.mark.e2e]

WANTED = {
    "expertmesh_requests_total",
    "expertmesh_engine_requests",
    "expertmesh_router_imbalance",
    "expertmesh_router_churn",
    "expertmesh_tpot_spread",
    "expertmesh_expert_tokens_total",
    "gen_ai_server_time_per_output_token_seconds_bucket",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api_server():
    """The OpenAI API with Prometheus metrics, served by uvicorn on a free port."""
    import uvicorn

    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    engine = ExpertMeshEngine(
        "expertmesh-demo",
        load_model(DEMO_MODEL_DIR),
        Tokenizer.from_dir(DEMO_MODEL_DIR),
        meter=telemetry.meter,
    )
    app = make_api(engine, meter=telemetry.meter, prometheus_registry=telemetry.prometheus_registry)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    asyncio.run(engine.shutdown())
    telemetry.shutdown()


@pytest.fixture
def prometheus(tmp_path, api_server):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not on PATH: run `make prometheus-tools` (Debian's prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: expertmesh\n"
        f"    static_configs: [{{targets: ['{api_server}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(base: str, promql: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_api_and_answers_queries_on_expertmesh_series(
    api_server, prometheus
):
    with httpx.Client(base_url=f"http://{api_server}", timeout=60) as client:
        for _ in range(3):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": "expertmesh-demo",
                    "messages": [{"role": "user", "content": "ROMEO:"}],
                    "max_tokens": 6,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    names: set[str] = set()
    while time.monotonic() < deadline:
        names = {s["metric"]["__name__"] for s in query(prometheus, '{__name__=~"expertmesh_.*"}')}
        names |= {s["metric"]["__name__"] for s in query(prometheus, '{__name__=~"gen_ai_.*"}')}
        ok = query(prometheus, 'sum(expertmesh_requests_total{status="200"})')
        if names >= WANTED and ok and float(ok[0]["value"][1]) >= 3:
            break
        time.sleep(1)
    assert names >= WANTED, WANTED - names
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
    assert [t["health"] for t in targets["activeTargets"]] == ["up"]
    layers = {s["metric"]["layer"] for s in query(prometheus, "expertmesh_router_churn")}
    assert layers, "expertmesh_router_churn has no layer label"
    spread = query(prometheus, "max(expertmesh_tpot_spread)")
    assert spread and float(spread[0]["value"][1]) >= 1.0
