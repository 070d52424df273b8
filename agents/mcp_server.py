"""expertmesh as a Model Context Protocol server (official `mcp` SDK, streamable HTTP).

    app = build_mcp_app(McpSettings(resource_url="http://127.0.0.1:8001/mcp",
                                    issuer_url="http://127.0.0.1:8001"),
                        verifier, agents, engine, selector, issuer=issuer)
    uvicorn.run(app, port=8001)                     # MCP on /mcp

    python -m expertmesh.agents.mcp_server --port 8001      # demo: built-in issuer, demo model

Tools and the scope each needs (`agent_auth.TOOL_SCOPES`): `chat_completion` (chat:complete)
through the selector and the engine, `text_to_sql` (sql:query) over the configured databases,
`cluster_status` (cluster:read).

Authorisation as the MCP specification prescribes: the server is an OAuth 2.1 resource server.
It publishes Protected Resource Metadata (RFC 9728) at `/.well-known/oauth-protected-resource`
and `/.well-known/oauth-protected-resource/mcp`; the SDK's bearer middleware (with our
`JwtVerifier` as its `TokenVerifier`) answers a missing, invalid, expired or wrong-audience
token with 401 and `WWW-Authenticate: Bearer ... resource_metadata="..."`. Per-tool scopes
are checked before the call reaches the SDK: a `tools/call` whose tool needs a scope the token
lacks gets 403 with `error="insufficient_scope", scope="..."`. The client's token is used
here only; engines and databases never see it.

The calling agent (token `client_id`) maps to a selector tenant (`AgentDirectory`), so
budgets, residency and safety rules apply to agents as to API keys; every tool call is a span
naming the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from opentelemetry.trace import NoOpTracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertmesh.models.generate import SamplingParams
from expertmesh.routing import RoutingError, SelectionRequest, Selector
from expertmesh.serving.engine import Engine, EngineError, EngineRequest
from expertmesh.serving.engine import Message as ChatMessage

from .agent_auth import (
    JWKS_PATH,
    TOOL_SCOPES,
    AgentDirectory,
    JwtVerifier,
    TokenIssuer,
    origin_of,
)
from .config import McpSpec, SqlSpec
from .oauth_token import AS_METADATA_PATH, TOKEN_PATH, OAuthClient, token_app
from .sql import SelectorChooser, SqlScope, TextToSql
from .sql_demo import SAMPLE_DB
from .sql_guard import SqlError
from .sql_open import open_database

log = logging.getLogger("expertmesh.agents.mcp")

PRM_PATH = "/.well-known/oauth-protected-resource"
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest MCP request body the scope gate buffers (413 above it)."""


@dataclass(frozen=True)
class McpSettings:
    resource_url: str
    """This server's MCP endpoint URL: the token audience (RFC 8707) and PRM `resource`."""
    issuer_url: str
    """The authorization server whose tokens are accepted (`iss`)."""
    databases: Mapping[str, str] = field(default_factory=lambda: {"shakespeare": str(SAMPLE_DB)})
    """text_to_sql database name -> SQLite path (or URL)."""
    sql_row_limit: int = 100
    sql_timeout_s: float = 2.0
    max_tokens: int = 256
    """chat_completion's output cap when the call sets none."""


def _json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str]
) -> list[Message]:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": data},
    ]


class ToolScopeGate:
    """ASGI wrapper around the SDK app: serves the PRM and JWKS documents, and refuses a
    `tools/call` whose tool needs a scope the (valid) token lacks with 403 insufficient_scope.
    Invalid or missing tokens pass through to the SDK's bearer middleware, which answers 401."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: JwtVerifier,
        settings: McpSettings,
        mcp_path: str,
        issuer: TokenIssuer | None,
        token_endpoint: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.token_endpoint = token_endpoint
        self.verifier = verifier
        self.mcp_path = mcp_path
        self.issuer = issuer
        origin = origin_of(settings.resource_url)
        self.metadata_url = origin + PRM_PATH + mcp_path
        self.metadata = {
            "resource": settings.resource_url,
            "authorization_servers": [settings.issuer_url],
            "scopes_supported": sorted(set(TOOL_SCOPES.values())),
            "bearer_methods_supported": ["header"],
            "resource_name": "expertmesh",
        }
        if issuer is not None:
            self.metadata["jwks_uri"] = origin + JWKS_PATH

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in (PRM_PATH, PRM_PATH + self.mcp_path) and scope["method"] == "GET":
            await self._send(send, _json_response(200, self.metadata, {}))
            return
        if self.token_endpoint is not None and path in (TOKEN_PATH, AS_METADATA_PATH):
            await self.token_endpoint(scope, receive, send)
            return
        if path == JWKS_PATH and self.issuer is not None and scope["method"] == "GET":
            await self._send(send, _json_response(200, self.issuer.jwks(), {}))
            return
        if path.rstrip("/") != self.mcp_path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                error = {"error": "request_too_large", "limit_bytes": MAX_BODY_BYTES}
                await self._send(send, _json_response(413, error, {}))
                return
        needed = _scopes_needed(body)
        if needed:
            token = await self.verifier.verify_token(_bearer(scope) or "")
            if token is not None:
                missing = sorted(needed - set(token.scopes))
                if missing:
                    log.warning("agent %s refused: needs scope %s", token.client_id, missing)
                    challenge = (
                        f'Bearer error="insufficient_scope", scope="{" ".join(missing)}", '
                        f'resource_metadata="{self.metadata_url}", '
                        f'error_description="this tool needs scope {" ".join(missing)}"'
                    )
                    await self._send(
                        send,
                        _json_response(
                            403,
                            {"error": "insufficient_scope", "scope": " ".join(missing)},
                            {"www-authenticate": challenge},
                        ),
                    )
                    return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _send(send: Send, messages: list[Message]) -> None:
        for m in messages:
            await send(m)


def _bearer(scope: Scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == b"authorization":
            text = v.decode("latin-1")
            if text.lower().startswith("bearer "):
                return text[7:].strip()
    return None


def _scopes_needed(body: bytes) -> set[str]:
    """Scopes the JSON-RPC message(s) in `body` need: one per `tools/call`. A body that does
    not parse needs none here (the SDK answers it)."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return set()
    needed = set()
    for msg in doc if isinstance(doc, list) else [doc]:
        if isinstance(msg, dict) and msg.get("method") == "tools/call":
            scope = TOOL_SCOPES.get(str((msg.get("params") or {}).get("name")))
            if scope is not None:  # an unknown tool is the SDK's to answer (a JSON-RPC error)
                needed.add(scope)
    return needed


def build_mcp_app(
    settings: McpSettings,
    verifier: JwtVerifier,
    agents: AgentDirectory,
    engine: Engine,
    selector: Selector,
    *,
    sql_service: TextToSql | None = None,
    issuer: TokenIssuer | None = None,
    clients: Mapping[str, OAuthClient] | None = None,
    token_ttl_s: float = 600.0,
    tracer: Any = None,
    mcp_path: str = "/mcp",
    host: str = "127.0.0.1",
) -> ASGIApp:
    """The MCP server as an ASGI app (MCP on `mcp_path`, plus PRM and, with `issuer`, JWKS;
    with `issuer` and `clients`, the OAuth token endpoint, `oauth_token.py`)."""
    tracer = tracer if tracer is not None else NoOpTracer()
    sql = sql_service or TextToSql(engine, SelectorChooser(selector))
    server: MCPServer = MCPServer(
        name="expertmesh",
        instructions="Chat completions, text-to-SQL and cluster status from expertmesh.",
        token_verifier=verifier,
        auth=AuthSettings(
            issuer_url=settings.issuer_url,  # type: ignore[arg-type]
            resource_server_url=settings.resource_url,  # type: ignore[arg-type]
            validate_token_resource=True,
        ),
    )

    @contextlib.contextmanager
    def tool_span(tool: str) -> Iterator[tuple[str, str]]:
        token = get_access_token()
        if token is None:  # the bearer middleware guarantees one; be explicit anyway
            raise ToolError("no access token on this request")
        agent = token.client_id
        try:
            tenant = agents.tenant_for(agent)
        except PermissionError as e:
            raise ToolError(str(e)) from e
        with tracer.start_as_current_span(
            f"mcp.tool {tool}",
            attributes={
                "mcp.tool.name": tool,
                "expertmesh.agent": agent,
                "enduser.id": token.subject or agent,
                "expertmesh.tenant": tenant,
            },
        ) as span:
            log.info("tool call", extra={"tool": tool, "agent": agent, "tenant": tenant})
            try:
                yield agent, tenant
            except Exception as e:
                span.set_attribute("error.type", type(e).__name__)
                raise

    @server.tool(description="Chat completion through the policy-driven model selector.")
    async def chat_completion(prompt: str, max_tokens: int | None = None) -> dict[str, Any]:
        with tool_span("chat_completion") as (_agent, tenant):
            try:
                decision = selector.decide(
                    SelectionRequest(
                        tenant=tenant, prompt=prompt, max_tokens=max_tokens or settings.max_tokens
                    )
                )
            except RoutingError as e:
                raise ToolError(f"refused by the selector ({e.http_status}): {e}") from e
            request = EngineRequest(
                request_id=f"mcp-{uuid.uuid4().hex[:12]}",
                model=decision.model.name,
                params=SamplingParams(max_tokens=decision.max_tokens),
                messages=(ChatMessage("user", prompt),),
            )
            parts, prompt_tokens, completion_tokens = [], 0, 0
            try:
                async for out in engine.generate(request):
                    parts.append(out.text)
                    prompt_tokens, completion_tokens = out.prompt_tokens, out.completion_tokens
            except EngineError as e:
                selector.release(decision)
                raise ToolError(f"engine error ({e.status}): {e}") from e
            selector.settle(decision, prompt_tokens, completion_tokens)
            return {
                "model": decision.model.name,
                "text": "".join(parts),
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                "decision_id": decision.decision_id,
            }

    @server.tool(
        description="Answer a question over a database with checked, read-only SQL. "
        "Returns the SQL, the rows and an explanation."
    )
    async def text_to_sql(question: str, database: str = "shakespeare") -> dict[str, Any]:
        with tool_span("text_to_sql") as (agent, tenant):
            if database not in settings.databases:
                raise ToolError(
                    f"unknown database {database!r}; this server has {sorted(settings.databases)}"
                )
            scope = SqlScope(
                tenant,
                agents.tables_for(agent),
                settings.sql_row_limit,
                settings.sql_timeout_s,
                agent,
            )
            try:
                answer = await sql.answer(
                    question,
                    await asyncio.to_thread(open_database, settings.databases[database]),
                    scope,
                )
            except (SqlError, RoutingError, EngineError) as e:
                raise ToolError(str(e)) from e
            return answer.to_dict()

    @server.tool(description="Health and models of the serving engine.")
    async def cluster_status() -> dict[str, Any]:
        with tool_span("cluster_status"):
            h = engine.health()
            return {
                "healthy": h.healthy,
                "detail": h.detail,
                "running": h.running,
                "waiting": h.waiting,
                "models": [
                    {"id": c.id, "context_window": c.context_window} for c in engine.models()
                ],
            }

    app = server.streamable_http_app(
        streamable_http_path=mcp_path, stateless_http=True, json_response=True, host=host
    )
    endpoint = None
    if issuer is not None and clients:
        endpoint = token_app(issuer, settings.resource_url, clients, token_ttl_s)
    return ToolScopeGate(app, verifier, settings, mcp_path, issuer, endpoint)


def check_agent_tenants(spec: McpSpec, tenants: Sequence[str]) -> None:
    """ServingConfigError naming the field when an agent maps to a tenant not in `tenants`."""
    from expertmesh.serving.config import ServingConfigError

    named = [(f"mcp.agents.{a}", t) for a, t in spec.agents.items()]
    if spec.default_tenant is not None:
        named.append(("mcp.default_tenant", spec.default_tenant))
    for field_name, tenant in named:
        if tenant not in tenants:
            raise ServingConfigError(
                f"{field_name}: tenant {tenant!r} is not in the policy; use one of {sorted(tenants)}"
            )


def build_mcp_from_spec(
    spec: McpSpec,
    engine: Engine,
    selector: Selector,
    tracer: Any = None,
    *,
    sql_service: TextToSql | None = None,
    databases: Mapping[str, str] | None = None,
    sql: SqlSpec | None = None,
) -> ASGIApp:
    """The MCP app a serving config's `mcp` section describes (see `config.McpSpec`); the
    text_to_sql tool shares the API's service, databases and limits (`config.SqlSpec`).
    ServingConfigError when an agent maps to a tenant the policy lacks."""
    check_agent_tenants(spec, [t.name for t in selector.policy.tenants])
    issuer_url = spec.issuer_url or origin_of(spec.resource_url)
    issuer: TokenIssuer | None = None
    if spec.jwks_url is not None:
        verifier = JwtVerifier(issuer_url, spec.resource_url, jwks_url=spec.jwks_url)
    else:
        issuer = TokenIssuer.from_key_file(issuer_url, spec.key_file)
        verifier = JwtVerifier(issuer.issuer, spec.resource_url, keys=issuer.public_keys)
    agents = AgentDirectory(
        dict(spec.agents),
        {a: frozenset(t) for a, t in spec.sql_tables.items()},
        spec.default_tenant,
    )
    host = spec.resource_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    sql = sql or SqlSpec()
    settings = McpSettings(
        spec.resource_url,
        issuer_url,
        databases=databases or {"shakespeare": str(SAMPLE_DB)},
        sql_row_limit=sql.row_limit,
        sql_timeout_s=sql.timeout_s,
    )
    return build_mcp_app(
        settings,
        verifier,
        agents,
        engine,
        selector,
        sql_service=sql_service,
        issuer=issuer,
        clients={
            name: OAuthClient(c.secret_hash, frozenset(c.scopes))
            for name, c in spec.clients.items()
        },
        token_ttl_s=spec.token_ttl_s,
        tracer=tracer,
        host=host,
    )


class WithMcp:
    """One ASGI app: MCP (`/mcp`, `/.well-known/...`) beside the API. Lifespan events go to the
    MCP app (its session manager runs there; the API app has no lifespan of its own)."""

    def __init__(self, api: ASGIApp, mcp: ASGIApp, mcp_path: str = "/mcp") -> None:
        self.api = api
        self.mcp = mcp
        self.mcp_path = mcp_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.mcp(scope, receive, send)
            return
        path = scope.get("path", "")
        if (
            path.rstrip("/") == self.mcp_path
            or path.startswith("/.well-known/")
            or path == TOKEN_PATH
        ):
            await self.mcp(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    """Serve the demo: built-in issuer, the demo model, the default policy, two agents."""
    import argparse

    import uvicorn

    from expertmesh.models.paths import DEMO_MODEL_DIR
    from expertmesh.policies import DEFAULT_POLICY, load_policy
    from expertmesh.serving.local_engine import ExpertMeshEngine

    parser = argparse.ArgumentParser(description="expertmesh MCP server (demo)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--print-tokens", action="store_true", help="print demo agent tokens")
    args = parser.parse_args(argv)
    origin = f"http://{args.host}:{args.port}"
    resource = origin + "/mcp"
    issuer = TokenIssuer(origin)
    verifier = JwtVerifier(issuer.issuer, resource, keys=issuer.public_keys)
    agents = AgentDirectory({"agent-analyst": "anonymous", "agent-chat": "anonymous"})
    if args.print_tokens:
        for agent, scopes in (
            ("agent-analyst", ["sql:query", "cluster:read"]),
            ("agent-chat", ["chat:complete"]),
        ):
            print(f"{agent} ({' '.join(scopes)}): {issuer.issue(agent, resource, scopes, 3600)}")
    engine = ExpertMeshEngine.load("expertmesh-demo", Path(DEMO_MODEL_DIR))
    selector = Selector(load_policy(DEFAULT_POLICY))
    app = build_mcp_app(
        McpSettings(resource, origin), verifier, agents, engine, selector, issuer=issuer
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
