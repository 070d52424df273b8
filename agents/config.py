"""What a user writes to configure agent access: the `mcp` and `sql` sections of a platform
config file, beside the serving fields (`expertmesh.serving.config.ServingConfig`).

    config = parse_platform_config(yaml.safe_load(text), "platform.yaml")
    config.serving   # ServingConfig: engine, model, policy, scheduler, ...
    config.agents    # AgentRoutes: the mcp and sql sections

The split happens here, at the edge, so serving's schema names no agent field and a bad field
of either part is reported the same way (`field: message`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from expertmesh.serving.config import (
    ServingConfig,
    ServingConfigError,
    config_error,
    parse_serving_config,
    read_config_file,
)

AGENT_SECTIONS = ("mcp", "sql")
"""Top-level keys of a platform config that belong to agents, not to serving."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class McpClientSpec(_Spec):
    """An agent of the built-in issuer's token endpoint (client credentials grant)."""

    secret_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    """sha256 digest of the client secret (`expertmesh policy hash-key SECRET`)."""
    scopes: list[Literal["chat:complete", "sql:query", "cluster:read"]] = Field(min_length=1)
    """Scopes the client may be granted."""


class McpSpec(_Spec):
    """The MCP server beside the API (`agents/mcp_server.py`, docs/agents.md)."""

    resource_url: str = Field(pattern=r"^https?://[^/]+/mcp$")
    """This server's MCP endpoint as clients reach it (the token audience), e.g.
    http://127.0.0.1:8000/mcp."""
    issuer_url: str | None = None
    """Token issuer (`iss`); default: the built-in issuer at resource_url's origin."""
    jwks_url: str | None = None
    """A standard issuer's JWKS; None: the built-in issuer's key in `key_file`."""
    key_file: str = "~/.expertmesh/mcp-issuer.pem"
    """The built-in issuer's Ed25519 key (PEM), created when missing; shared by replicas and
    `python -m expertmesh.agents.agent_auth issue`."""
    agents: dict[str, str] = {}
    """Agent (token client_id) -> selector tenant."""
    default_tenant: str | None = None
    """Tenant of agents not in `agents`; None: unmapped agents are refused. `expertmesh up`
    sets the policy's anonymous tenant, so a token adds no access anonymous HTTP lacks."""
    sql_tables: dict[str, list[str]] = {}
    """Agent -> tables text_to_sql may read (not listed: every table)."""
    clients: dict[str, McpClientSpec] = {}
    """Agents that get tokens from the built-in issuer's `POST /oauth/token` (OAuth client
    credentials); empty: no token endpoint (tokens from `expertmesh mcp token`)."""
    token_ttl_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    """Lifetime of tokens from the token endpoint."""

    @model_validator(mode="after")
    def _clients_need_the_builtin_issuer(self) -> McpSpec:
        if self.clients and self.jwks_url is not None:
            raise ValueError(
                "`clients` configure the built-in issuer's token endpoint, but `jwks_url` names "
                "an external issuer: register the clients there and remove `clients`"
            )
        return self


class SqlSpec(_Spec):
    """Text-to-SQL on `/v1/sql/answer` and the MCP `text_to_sql` tool (docs/agents.md)."""

    databases: dict[str, str] | None = None
    """Name -> SQLite file (or `sqlite:///` URL) clients may ask about; None: the bundled
    sample as "shakespeare". Each file must exist when the server starts."""
    row_limit: Annotated[int, Field(ge=1, le=100_000)] = 100
    """Rows returned at most (the answer says when it was cut)."""
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    """A query running longer is interrupted."""
    max_tokens: Annotated[int, Field(ge=16)] = 128
    """Output cap of each model call (the query and its one repair)."""
    ground_values: bool = True
    """Replace a literal the model got wrong by the one stored value of that column the
    question names (`sql.ground_literals`); every replacement is reported in the answer."""


class AgentRoutes(_Spec):
    """The agent routes an API replica serves: text-to-SQL whenever the serving config has a
    policy (the selector picks the model, task `sql`), MCP on /mcp when `mcp` is set."""

    mcp: McpSpec | None = None
    """Serve MCP on /mcp beside the API (needs a policy: agents map to its tenants)."""
    sql: SqlSpec = SqlSpec()
    """Text-to-SQL (served when a policy is set: the selector picks the model, task `sql`)."""


@dataclass(frozen=True)
class PlatformConfig:
    """A platform config file, split: the serving fields and the agent sections."""

    serving: ServingConfig
    agents: AgentRoutes

    def to_dict(self) -> dict[str, Any]:
        """The one mapping a config file would hold (`parse_platform_config` reads it back)."""
        return {**self.serving.model_dump(), **self.agents.model_dump()}


def parse_platform_config(data: Any, source: str = "platform config") -> PlatformConfig:
    """Validate a mapping of serving fields plus `mcp`/`sql`; ServingConfigError naming every
    bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ServingConfigError(
            f"{source}: expected a mapping of fields, got {type(data).__name__}"
        )
    serving = parse_serving_config(
        {k: v for k, v in data.items() if k not in AGENT_SECTIONS}, source
    )
    try:
        agents = AgentRoutes.model_validate({k: data[k] for k in AGENT_SECTIONS if k in data})
    except ValidationError as e:
        raise config_error(source, e) from None
    if agents.mcp is not None and serving.policy is None:
        raise ServingConfigError(
            f"{source} is invalid:\n  mcp: needs a `policy` (agents map to the policy's "
            "tenants); set `policy` or remove `mcp`"
        )
    return PlatformConfig(serving, agents)


def load_platform_config(path: str | Path) -> PlatformConfig:
    return parse_platform_config(read_config_file(path), str(path))
