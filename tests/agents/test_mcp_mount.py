"""MCP beside the OpenAI API in the Ray Serve replica's app (`agents.app.build_app` path: serving's
route-mount hook with `AgentMount`, served here by uvicorn without Ray): a platform config's
`mcp` section mounts it on /mcp, tokens come from the
built-in issuer's key file."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from expertmesh.agents.agent_auth import TokenIssuer
from expertmesh.agents.app import AgentMount, sql_databases
from expertmesh.agents.config import parse_platform_config
from expertmesh.agents.sql_demo import TemplateEngine
from expertmesh.policies.keys import hash_api_key
from expertmesh.serving.app import ApiServer, build_gate
from expertmesh.serving.config import ServingConfigError

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")


class _NoTelemetry:
    meter = None
    prometheus_registry = None
    tracer = None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    key_file = tmp_path_factory.mktemp("mcp") / "issuer.pem"
    platform = parse_platform_config(
        {
            "mcp": {
                "resource_url": f"http://127.0.0.1:{port}/mcp",
                "key_file": str(key_file),
                "agents": {"agent-analyst": "anonymous"},
                "clients": {
                    "agent-analyst": {
                        "secret_hash": hash_api_key("s3cret"),
                        "scopes": ["sql:query"],
                    }
                },
            }
        }
    )
    config = platform.serving
    replica: Any = object.__new__(ApiServer)  # the replica without Ray: same app building
    replica.config = config
    replica.mounts = (AgentMount(platform.agents),)
    replica.engine = TemplateEngine("expertmesh-demo")
    replica.gate = build_gate(config, replica.engine)
    replica.telemetry = _NoTelemetry()
    app = replica.__serve_build_asgi_app__()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", key_file
    server.should_exit = True
    thread.join(5)


def test_api_and_mcp_share_the_server(served: tuple[str, Path]) -> None:
    origin, key_file = served
    assert httpx2.get(origin + "/v1/models").status_code == 200
    assert httpx2.post(origin + "/mcp", json={}).status_code == 401
    token = TokenIssuer.from_key_file(origin, key_file).issue(
        "agent-analyst", origin + "/mcp", ["sql:query"]
    )

    async def ask() -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            streamable_http_client(origin + "/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool("text_to_sql", {"question": "What genre is Macbeth?"})

    result = asyncio.run(ask())
    assert not result.is_error, result
    assert result.structured_content["rows"] == [["tragedy"]]


def test_mcp_without_a_policy_is_a_config_error() -> None:
    with pytest.raises(ServingConfigError, match="needs a `policy`"):
        parse_platform_config({"policy": None, "mcp": {"resource_url": "http://h:8000/mcp"}})


def test_configured_databases_are_served_and_a_missing_file_is_named(tmp_path: Path) -> None:
    from expertmesh.agents.sql_demo import build_sample_db

    db = build_sample_db(tmp_path / "plays.sqlite")
    config = parse_platform_config({"sql": {"databases": {"plays": f"sqlite:///{db}"}}})
    assert sql_databases(config.agents.sql) == {"plays": f"sqlite:///{db}"}
    assert "shakespeare" in sql_databases(parse_platform_config({}).agents.sql)
    missing = parse_platform_config({"sql": {"databases": {"sales": str(tmp_path / "no.db")}}})
    with pytest.raises(ServingConfigError, match=r"sql.databases.sales: no SQLite file"):
        sql_databases(missing.agents.sql)
    with pytest.raises(ServingConfigError, match=r"sql.row_limit"):
        parse_platform_config({"sql": {"row_limit": 0}})


def test_an_agent_mapped_to_a_tenant_the_policy_lacks_is_a_config_error(tmp_path: Path) -> None:
    from expertmesh.agents.mcp_server import build_mcp_from_spec
    from expertmesh.policies import DEFAULT_POLICY, load_policy
    from expertmesh.routing import Selector

    selector = Selector(load_policy(DEFAULT_POLICY))
    for mcp, field in (
        ({"agents": {"agent-x": "finance"}}, "mcp.agents.agent-x: tenant 'finance'"),
        ({"default_tenant": "nobody"}, "mcp.default_tenant: tenant 'nobody'"),
    ):
        spec = parse_platform_config(
            {"mcp": {"resource_url": "http://h:1/mcp", "key_file": str(tmp_path / "k"), **mcp}}
        ).agents.mcp
        assert spec is not None
        with pytest.raises(ServingConfigError, match=field):
            build_mcp_from_spec(spec, TemplateEngine("expertmesh-demo"), selector)


def test_an_agent_gets_its_token_from_the_token_endpoint_and_calls_a_tool(
    served: tuple[str, Path],
) -> None:
    origin, _ = served
    meta = httpx2.get(origin + "/.well-known/oauth-protected-resource/mcp").json()
    (issuer,) = meta["authorization_servers"]
    as_meta = httpx2.get(issuer + "/.well-known/oauth-authorization-server").json()
    r = httpx2.post(
        as_meta["token_endpoint"],
        data={"grant_type": "client_credentials", "resource": origin + "/mcp"},
        auth=("agent-analyst", "s3cret"),
    )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]

    async def ask() -> Any:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
            streamable_http_client(origin + "/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool("text_to_sql", {"question": "What genre is Hamlet?"})

    result = asyncio.run(ask())
    assert not result.is_error and result.structured_content["rows"] == [["tragedy"]]
