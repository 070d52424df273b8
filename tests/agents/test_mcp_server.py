"""The MCP server, driven by the SDK's own client over streamable HTTP: tokens that are
missing, expired, for another audience or without the tool's scope are refused with the status
and `WWW-Authenticate` header the MCP authorisation spec names; a good token lists the tools
and answers text_to_sql over the sample database."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from expertmesh.agents.agent_auth import AgentDirectory, JwtVerifier, TokenIssuer
from expertmesh.agents.mcp_server import McpSettings, build_mcp_app
from expertmesh.agents.sql_demo import TemplateEngine, build_sample_db
from expertmesh.policies import DEFAULT_POLICY, load_policy
from expertmesh.routing import Selector
from expertmesh.serving.engine import EngineOutput, EngineRequest


@dataclass
class Server:
    origin: str
    resource: str
    issuer: TokenIssuer
    spans: InMemorySpanExporter
    engine: RecordingEngine

    def token(
        self, agent: str = "agent-analyst", scopes: tuple[str, ...] = ("sql:query",), **kw: Any
    ) -> str:
        return self.issuer.issue(agent, kw.pop("audience", self.resource), scopes, **kw)


class RecordingEngine(TemplateEngine):
    def __init__(self) -> None:
        super().__init__("expertmesh-demo")
        self.requests: list[EngineRequest] = []

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        return super().generate(request)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    resource = origin + "/mcp"
    issuer = TokenIssuer(origin)
    verifier = JwtVerifier(issuer.issuer, resource, keys=issuer.public_keys)
    db = build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = RecordingEngine()
    app = build_mcp_app(
        McpSettings(resource, origin, databases={"shakespeare": str(db)}),
        verifier,
        AgentDirectory(
            {"agent-analyst": "anonymous", "agent-chat": "dev", "agent-narrow": "anonymous"},
            sql_tables={"agent-narrow": frozenset({"characters"})},
        ),
        engine,
        Selector(load_policy(DEFAULT_POLICY)),
        issuer=issuer,
        tracer=provider.get_tracer("test"),
    )
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Server(origin, resource, issuer, exporter, engine)
    uv.should_exit = True
    thread.join(5)


async def _session(
    server: Server, token: str | None, work: Any
) -> tuple[Any, list[httpx2.Response]]:
    """Run `work(session)` with the SDK client; returns its result (or the exception) and the
    HTTP responses seen."""
    seen: list[httpx2.Response] = []

    async def record(response: httpx2.Response) -> None:
        seen.append(response)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(
        headers=headers, event_hooks={"response": [record]}, timeout=10
    ) as http:
        try:
            async with (
                streamable_http_client(server.resource, http_client=http) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await work(session), seen
        except BaseException as e:  # the SDK raises (an ExceptionGroup) on HTTP errors
            return e, seen


def _refusal(seen: list[httpx2.Response]) -> httpx2.Response:
    refused = [r for r in seen if r.status_code >= 400]
    assert refused, f"no refusal among {[r.status_code for r in seen]}"
    return refused[0]


async def _list(session: ClientSession) -> Any:
    return await session.list_tools()


@pytest.mark.parametrize("case", ["missing", "expired", "wrong_audience", "other_issuer"])
def test_bad_tokens_get_401_with_resource_metadata(server: Server, case: str) -> None:
    token = {
        "missing": None,
        "expired": server.token(ttl_s=-60),
        "wrong_audience": server.token(audience="http://other.example/mcp"),
        "other_issuer": TokenIssuer("http://evil.example").issue(
            "agent-analyst", server.resource, ["sql:query"]
        ),
    }[case]
    result, seen = asyncio.run(_session(server, token, _list))
    assert isinstance(result, BaseException)
    r = _refusal(seen)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert (
        f'resource_metadata="{server.origin}/.well-known/oauth-protected-resource/mcp"' in challenge
    )


def test_wrong_scope_gets_403_insufficient_scope(server: Server) -> None:
    token = server.token("agent-chat", ("chat:complete",))

    async def call(session: ClientSession) -> Any:
        return await session.call_tool("text_to_sql", {"question": "What genre is Hamlet?"})

    _, seen = asyncio.run(_session(server, token, call))
    r = _refusal(seen)
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="sql:query"' in challenge
    assert "resource_metadata=" in challenge


def test_good_token_lists_tools_and_answers_text_to_sql(server: Server) -> None:
    token = server.token("agent-analyst", ("sql:query", "cluster:read"))

    async def work(session: ClientSession) -> Any:
        tools = await session.list_tools()
        answer = await session.call_tool("text_to_sql", {"question": "What genre is Hamlet?"})
        return tools, answer

    result, _ = asyncio.run(_session(server, token, work))
    assert not isinstance(result, BaseException), result
    tools, answer = result
    assert {t.name for t in tools.tools} == {"chat_completion", "text_to_sql", "cluster_status"}
    assert not answer.is_error, answer
    assert answer.structured_content["rows"] == [["tragedy"]]
    assert answer.structured_content["sql"].startswith("SELECT genre FROM plays")
    spans = [s for s in server.spans.get_finished_spans() if s.name == "mcp.tool text_to_sql"]
    assert spans and spans[-1].attributes["expertmesh.agent"] == "agent-analyst"
    assert spans[-1].attributes["expertmesh.tenant"] == "anonymous"


def test_unmapped_agent_is_refused_by_the_tool(server: Server) -> None:
    token = server.token("agent-stranger", ("cluster:read",))

    async def call(session: ClientSession) -> Any:
        return await session.call_tool("cluster_status", {})

    result, _ = asyncio.run(_session(server, token, call))
    assert not isinstance(result, BaseException), result
    assert result.is_error and "not mapped to a tenant" in result.content[0].text


def test_rotated_key_still_verifies_old_tokens_until_dropped(server: Server) -> None:
    issuer = TokenIssuer(server.origin)
    verifier = JwtVerifier(issuer.issuer, server.resource, keys=issuer.public_keys)
    old = issuer.issue("a", server.resource, ["cluster:read"])
    issuer.rotate()
    new = issuer.issue("a", server.resource, ["cluster:read"])
    assert asyncio.run(verifier.verify_token(old)) is not None
    assert asyncio.run(verifier.verify_token(new)) is not None
    assert [k["kid"] for k in issuer.jwks()["keys"]] == ["k1", "k2"]
    issuer.drop_retired()
    assert asyncio.run(verifier.verify_token(old)) is None


def test_protected_resource_metadata_and_jwks_are_published(server: Server) -> None:
    prm = httpx2.get(server.origin + "/.well-known/oauth-protected-resource").json()
    assert prm["resource"] == server.resource
    assert prm["authorization_servers"] == [server.origin]
    assert set(prm["scopes_supported"]) == {"chat:complete", "sql:query", "cluster:read"}
    jwks = httpx2.get(server.origin + "/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "OKP" and "kid" in jwks["keys"][0]


def test_chat_goes_through_the_selector_and_the_token_stays_here(server: Server) -> None:
    token = server.token("agent-chat", ("chat:complete",))

    async def call(session: ClientSession) -> Any:
        return await session.call_tool("chat_completion", {"prompt": "Hello"})

    result, _ = asyncio.run(_session(server, token, call))
    assert not isinstance(result, BaseException), result
    assert not result.is_error, result
    assert result.structured_content["model"] == "expertmesh-demo"
    assert result.structured_content["decision_id"]
    assert server.engine.requests and all(token not in repr(r) for r in server.engine.requests)


def test_an_agents_table_scope_limits_text_to_sql(server: Server) -> None:
    token = server.token("agent-narrow", ("sql:query",))

    async def call(session: ClientSession) -> Any:
        return await session.call_tool("text_to_sql", {"question": "What genre is Hamlet?"})

    result, _ = asyncio.run(_session(server, token, call))
    assert not isinstance(result, BaseException), result
    assert result.is_error and "outside this caller's scope" in result.content[0].text
