"""Ray Serve's direct ingress (`serving.app.DIRECT_INGRESS_ENV`): our API replica serves HTTP
on its own port (`ingress_urls` finds it), streams the same greedy text as the Serve proxy path
and as a non-streaming answer, as a valid OpenAI stream with usage and our headers.

Ray runs in a child process: the variable has to be in the environment Ray starts with, and
this test must not inherit (or leave behind) another module's Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json, os, socket

    from expertmesh.serving.app import DIRECT_INGRESS_ENV, build_app, ingress_urls

    os.environ.update(DIRECT_INGRESS_ENV)
    import httpx, openai, ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"model": "demo", "policy": None, "scheduler": {"num_slots": 4}}
        serve.run(build_app(config), name="api", route_prefix="/api")
        proxy = f"http://127.0.0.1:{port}/api"
        urls = ingress_urls("api")
        out["proxy"], out["urls"] = proxy, urls
        direct = urls[0]
        prompts = ["ROMEO:", "To be, or not to be"]

        def streamed(base, prompt):
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            raw = client.completions.with_raw_response.create(
                model="expertmesh-demo", prompt=prompt, max_tokens=12, temperature=0,
                stream=True, stream_options={"include_usage": True},
            )
            pieces, usage = [], None
            for chunk in raw.parse():
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return {"text": "".join(pieces), "usage": usage,
                    "request_id": raw.headers.get("x-request-id")}

        for prompt in prompts:
            whole = httpx.post(proxy + "/v1/completions", json={
                "model": "expertmesh-demo", "prompt": prompt, "max_tokens": 12,
                "temperature": 0}, timeout=120).json()
            out[prompt] = {
                "whole": whole["choices"][0]["text"],
                "whole_tokens": whole["usage"]["completion_tokens"],
                "direct": streamed(direct, prompt),
                "proxy": streamed(proxy, prompt),
            }
        out["health"] = httpx.get(direct + "/health", timeout=30).json()["status"]
    finally:
        serve.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def served() -> dict:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_the_replica_serves_on_its_own_port(served) -> None:
    assert len(served["urls"]) == 1
    direct, proxy = served["urls"][0], served["proxy"]
    assert direct.endswith("/api")
    assert direct.split("/")[2] != proxy.split("/")[2]  # another host:port than the proxy
    assert served["health"] == "ok"


@pytest.mark.parametrize("prompt", ["ROMEO:", "To be, or not to be"])
def test_direct_stream_equals_the_proxy_stream_and_the_whole_answer(served, prompt) -> None:
    got = served[prompt]
    assert got["whole"]  # a real answer to compare against
    assert got["direct"]["text"] == got["proxy"]["text"] == got["whole"]
    assert got["direct"]["usage"] == got["proxy"]["usage"] == got["whole_tokens"]
    assert got["direct"]["request_id"], "our x-request-id header on the direct path"
