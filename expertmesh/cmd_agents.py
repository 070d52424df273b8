"""`expertmesh sql` and `expertmesh mcp token`: text-to-SQL and agent tokens from the shell.

    expertmesh sql "How many characters are in Hamlet?"          # the running `expertmesh up`
    expertmesh sql --local "What genre is Macbeth?"               # in this process, demo model
    expertmesh mcp token --agent agent-analyst --scope sql:query  # a bearer token for /mcp

`sql` posts to `/v1/sql/answer` of the platform `expertmesh up` started (or `--url`), so the
selector picks the model (task `sql`) and the caller's key (`--api-key`, else
$EXPERTMESH_API_KEY, else anonymous) names the tenant. `--local` runs the same service in
this process on a checkpoint (the bundled demo model by default) and a SQLite file, without a
selector. `mcp token` signs with the built-in issuer's key that `up` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def add_agents(sub: argparse._SubParsersAction) -> None:
    sql = sub.add_parser("sql", help="answer a question over a database (text-to-SQL)")
    sql.add_argument("question")
    sql.add_argument("--url", default=None, help="API URL (default: the running `expertmesh up`)")
    sql.add_argument("--database", default="shakespeare", help="database name on the server")
    sql.add_argument("--api-key", default=None, help="default: $EXPERTMESH_API_KEY, else none")
    sql.add_argument("--local", action="store_true", help="answer in this process (no server)")
    sql.add_argument("--model", default="demo", help="--local: checkpoint directory or 'demo'")
    sql.add_argument("--db", default=None, help="--local: SQLite file (default: the sample)")
    sql.add_argument("--row-limit", type=int, default=100, help="--local: rows returned at most")
    sql.add_argument("--json", action="store_true", help="print the answer as JSON")
    sql.set_defaults(func=run_sql)

    mcp = sub.add_parser("mcp", help="MCP agent access").add_subparsers(
        dest="mcp_command", required=True, metavar="SUBCOMMAND"
    )
    token = mcp.add_parser("token", help="sign a bearer token for an agent (built-in issuer)")
    token.add_argument("--agent", required=True, help="the agent's identity (token client_id)")
    token.add_argument(
        "--scope",
        action="append",
        default=[],
        help="repeatable: chat:complete, sql:query, cluster:read",
    )
    token.add_argument("--ttl-s", type=float, default=3600.0)
    token.add_argument("--resource", default=None, help="MCP URL (default: the running `up`)")
    token.add_argument("--key-file", default=None, help="issuer key (default: the running `up`'s)")
    token.set_defaults(func=run_mcp_token)


class CommandError(RuntimeError):
    """A command cannot run as asked; the message says what to change."""


def _running() -> dict[str, Any]:
    from .cmd_serve import read_state

    state = read_state()
    if state is None or not state.get("ready"):
        raise CommandError(
            "no running `expertmesh up` (start one, or pass --url / --local for sql, "
            "--resource and --key-file for mcp token)"
        )
    return state


def run_sql(args: argparse.Namespace) -> int:
    if args.local:
        answer = asyncio.run(_local_answer(args))
    else:
        answer = _remote_answer(args)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    console = Console()
    console.print(f"[bold]SQL[/bold] ({answer['model']}): {answer['sql']}", highlight=False)
    table = Table(*answer["columns"])
    for row in answer["rows"]:
        table.add_row(*(str(v) for v in row))
    console.print(table)
    console.print(answer["explanation"], highlight=False)
    return 0


def _remote_answer(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    url = (args.url or _running()["url"]).rstrip("/").removesuffix("/v1")
    key = args.api_key or os.environ.get("EXPERTMESH_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(
            f"{url}/v1/sql/answer",
            json={"question": args.question, "database": args.database},
            headers=headers,
            timeout=120,
        )
    except httpx.HTTPError as e:
        raise CommandError(f"cannot reach {url}: {e}") from e
    try:
        body: dict[str, Any] = r.json()
    except ValueError:  # not the API (a proxy's error page, another server on the port)
        body = {}
    if r.status_code != 200:
        message = body.get("error", {}).get("message", r.text[:200])
        raise CommandError(f"refused (HTTP {r.status_code}): {message}")
    if "sql" not in body:
        raise CommandError(f"{url} did not answer as expertmesh does: {r.text[:200]}")
    return body


async def _local_answer(args: argparse.Namespace) -> dict[str, Any]:
    from expertmesh.agents.sql import FixedModel, SqlScope, TextToSql
    from expertmesh.agents.sql_demo import SAMPLE_DB
    from expertmesh.agents.sql_open import open_database
    from expertmesh.models.paths import resolve_model
    from expertmesh.serving.local_engine import ExpertMeshEngine

    db = open_database(args.db or SAMPLE_DB)
    name = "expertmesh-demo" if args.model == "demo" else Path(args.model).name
    engine = ExpertMeshEngine.load(name, resolve_model(args.model))
    try:
        service = TextToSql(engine, FixedModel(name))
        answer = await service.answer(args.question, db, SqlScope("cli", row_limit=args.row_limit))
    finally:
        await engine.shutdown()
    return answer.to_dict()


def run_mcp_token(args: argparse.Namespace) -> int:
    from expertmesh.agents.agent_auth import TOOL_SCOPES, TokenIssuer, origin_of

    known = set(TOOL_SCOPES.values())
    unknown = [s for s in args.scope if s not in known]
    if unknown or not args.scope:
        raise CommandError(f"--scope: give one or more of {sorted(known)} (got {unknown or []})")
    if args.resource and args.key_file:
        resource, key_file, issuer = args.resource, args.key_file, origin_of(args.resource)
    else:
        state = _running()
        if not state.get("mcp_key_file"):
            raise CommandError(
                "the running `expertmesh up` serves no MCP with the built-in issuer "
                "(started with --no-mcp, or its config names an external issuer)"
            )
        resource = args.resource or state["mcp"]
        key_file = args.key_file or state["mcp_key_file"]
        issuer = state["mcp_issuer"]
    print(
        TokenIssuer.from_key_file(issuer, key_file).issue(
            args.agent, resource, args.scope, args.ttl_s
        )
    )
    return 0


def expected_errors() -> tuple[type[BaseException], ...]:
    from expertmesh.agents.agent_auth import AgentAuthError
    from expertmesh.agents.sql_guard import SqlError

    return CommandError, SqlError, AgentAuthError
