"""The platform's API with agent access: serving's app plus text-to-SQL and MCP routes.

    serve run expertmesh.agents.app:build_app model=demo policy=default   # Serve CLI
    # RayService serveConfigV2: import_path: expertmesh.agents.app:build_app, args: {...}
    expertmesh up                                                        # the CLI composes it

`build_app(args)` takes serving fields plus the `mcp` and `sql` sections (`config.py`) and
hands serving one `RouteMount`, `AgentMount`: on each replica it adds `/v1/sql/answer` when
the replica has the selector gate (the selector picks the model for task `sql`) and, when
`mcp` is set, serves MCP on `/mcp` (with the OAuth metadata and token endpoint) in front of the
API. Serving knows only the hook; this module is the one place the two meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from expertmesh.serving.app import Replica
from expertmesh.serving.app import build_app as build_serving_app
from expertmesh.serving.config import ServingConfigError

from .config import AgentRoutes, PlatformConfig, SqlSpec, parse_platform_config


def sql_databases(sql: SqlSpec) -> dict[str, str]:
    """The text-to-SQL databases by name; ServingConfigError naming a missing file (`expertmesh
    up` calls it before starting anything, the replica again when it mounts the routes)."""
    from .sql_demo import SAMPLE_DB

    databases = sql.databases or {"shakespeare": str(SAMPLE_DB)}
    for name, target in databases.items():
        local = target.removeprefix("sqlite:///")
        if "://" not in local and not Path(local).expanduser().is_file():  # URLs: checked on use
            raise ServingConfigError(
                f"sql.databases.{name}: no SQLite file at {local}; fix the path or remove the entry"
            )
    return dict(databases)


@dataclass(frozen=True)
class AgentMount:
    """The `RouteMount` of agent access (pickled to every replica with its config)."""

    routes: AgentRoutes

    def __call__(self, app: Any, replica: Replica) -> Any:
        from expertmesh.serving.gate import SelectorGate

        if not isinstance(replica.gate, SelectorGate):  # text-to-SQL needs the selector
            return app
        from .sql import SelectorChooser, TextToSql
        from .sql_api import sql_router

        selector = replica.gate.selector
        sql = self.routes.sql
        databases = sql_databases(sql)
        service = TextToSql(
            replica.engine,
            SelectorChooser(selector),
            sql.max_tokens,
            ground_values=sql.ground_values,
        )
        app.include_router(sql_router(service, selector, databases, sql.row_limit, sql.timeout_s))
        if self.routes.mcp is None:
            return app
        from .mcp_server import WithMcp, build_mcp_from_spec

        mcp = build_mcp_from_spec(
            self.routes.mcp,
            replica.engine,
            selector,
            replica.telemetry.tracer,
            sql_service=service,
            databases=databases,
            sql=sql,
        )
        return WithMcp(app, mcp)


def build_app(args: dict[str, Any] | PlatformConfig | None = None) -> serve.Application:
    """The API with agent routes as a Ray Serve application; `args` are `ServingConfig` fields
    plus the `mcp` and `sql` sections."""
    config = args if isinstance(args, PlatformConfig) else parse_platform_config(args or {})
    return build_serving_app(config.serving, mounts=[AgentMount(config.agents)])
