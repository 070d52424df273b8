"""Two agents, two scopes: one may query the sample database over MCP, the other is refused.

    .venv/bin/python examples/agents/two_agents.py           # a server in this process
    .venv/bin/python examples/agents/two_agents.py --up      # the running `expertmesh up`

By default it starts the expertmesh MCP server in this process (uvicorn on a free port, the
built-in token issuer, the bundled demo model, fine-tuned for text-to-SQL, as the engine);
with `--up` it talks to the platform `expertmesh up` runs, with tokens signed by that server's
issuer key (as `expertmesh mcp token` does). Each agent gets its own token and calls
`text_to_sql` through the official `mcp` client: `agent-analyst` holds `sql:query` and gets
rows back; `agent-chat` holds only `chat:complete` and gets HTTP 403 `insufficient_scope`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
import time

import httpx2
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from expertmesh.agents.agent_auth import AgentDirectory, JwtVerifier, TokenIssuer
from expertmesh.agents.mcp_server import McpSettings, build_mcp_app
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.policies import DEFAULT_POLICY, load_policy
from expertmesh.routing import Selector
from expertmesh.serving.local_engine import ExpertMeshEngine

QUESTION = "List the characters in Macbeth."
AGENTS = (("agent-analyst", ["sql:query"]), ("agent-chat", ["chat:complete"]))


async def ask(resource: str, agent: str, token: str) -> None:
    refused: list[httpx2.Response] = []

    async def keep_refusals(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            refused.append(response)

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(
        headers=headers, event_hooks={"response": [keep_refusals]}
    ) as http:
        try:
            async with (
                streamable_http_client(resource, http_client=http) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                result = await session.call_tool("text_to_sql", {"question": QUESTION})
                if result.is_error:  # allowed, but the tool failed (e.g. no valid SQL)
                    text = " ".join(getattr(c, "text", "") for c in result.content)
                    print(f"{agent}: allowed, tool error: {text}")
                    return
                doc = result.structured_content or {}
                print(f"{agent}: allowed\n  SQL:  {doc.get('sql')}\n  rows: {doc.get('rows')}")
                print(f"  {doc.get('explanation')}")
        except Exception:
            r = refused[0] if refused else None
            status = r.status_code if r is not None else "?"
            challenge = r.headers.get("www-authenticate") if r is not None else ""
            print(f"{agent}: refused, HTTP {status}\n  WWW-Authenticate: {challenge}")


def against_up() -> int:
    from expertmesh.cmd_serve import read_state

    state = read_state()
    if state is None or not state.get("mcp_key_file"):
        print("no running `expertmesh up` serving MCP with its built-in issuer; start one")
        return 1
    issuer = TokenIssuer.from_key_file(state["mcp_issuer"], state["mcp_key_file"])
    for agent, scopes in AGENTS:
        asyncio.run(ask(state["mcp"], agent, issuer.issue(agent, state["mcp"], scopes, 300)))
    return 0


def in_process() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    resource = origin + "/mcp"
    issuer = TokenIssuer(origin)
    app = build_mcp_app(
        McpSettings(resource, origin),
        JwtVerifier(issuer.issuer, resource, keys=issuer.public_keys),
        AgentDirectory({"agent-analyst": "anonymous", "agent-chat": "anonymous"}),
        ExpertMeshEngine.load("expertmesh-demo", DEMO_MODEL_DIR),
        Selector(load_policy(DEFAULT_POLICY)),
        issuer=issuer,
    )
    logging.getLogger().setLevel(logging.ERROR)  # the SDK logs every HTTP request at INFO
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    try:
        for agent, scopes in AGENTS:
            asyncio.run(ask(resource, agent, issuer.issue(agent, resource, scopes, ttl_s=300)))
    finally:
        server.should_exit = True
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--up", action="store_true", help="use the running `expertmesh up`")
    return against_up() if parser.parse_args().up else in_process()


if __name__ == "__main__":
    raise SystemExit(main())
