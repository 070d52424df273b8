"""The public facade: `build_app(config)` returns the Ray Serve application of the API.

    serve run expertmesh.serving.app:build_app model=demo          # Serve CLI (args -> config)
    serve.run(build_app({"model": "demo"}))                       # Python
    # RayService serveConfigV2: import_path: expertmesh.serving.app:build_app, args: {...}
    expertmesh up                                                 # our CLI (local cluster)

Each replica of the `ApiServer` deployment builds its engine from the config (our MoE engine,
vLLM, or a remote API), the selector gate when a policy is configured, and telemetry, then
serves `api.make_api(...)` (plus text-to-SQL, `sql_api.py`, when a policy is set, and MCP on
`/mcp` when the config has an `mcp` section). Ray Serve calls `check_health` every
`health_check_period_s`: a dead engine or a stalled engine loop (work held, no progress) fails
it and Serve replaces the replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from .api import ApiSettings, Gate, make_api
from .config import ServingConfig, parse_serving_config
from .engine import Engine, EngineDead


def build_engine(config: ServingConfig, telemetry: Any = None) -> Engine:
    """The engine a config names (imports only that engine's dependencies)."""
    from expertmesh.paths import resolve_model

    if config.engine == "expertmesh":
        from .local_engine import ExpertMeshEngine

        return ExpertMeshEngine.load(
            config.model_name,
            resolve_model(config.model),
            config.scheduler.build(),
            config.kv_cache,
            config.topology,
            embedded=config.embedded,
            telemetry=telemetry,
            telemetry_config=config.telemetry,
            supervisor=config.supervisor,
            log_dir=config.log_dir,
        )
    if config.engine == "remote":
        from .remote_engine import RemoteOpenAIEngine

        assert config.remote is not None
        return RemoteOpenAIEngine.from_spec(config.model_name, config.remote)
    from .vllm_engine import VLLMEngine

    return VLLMEngine.load(config.model_name, str(resolve_model(config.model)), config)


def build_gate(config: ServingConfig, engine: Engine) -> Gate | None:
    if config.policy is None:
        return None
    from expertmesh.policies import DEFAULT_POLICY

    from .gate import SelectorGate

    path = DEFAULT_POLICY if config.policy == "default" else Path(config.policy)
    return SelectorGate.from_policy_file(path, engine, config.budget_ledger, config.decision_log)


def sql_databases(config: ServingConfig) -> dict[str, str]:
    """The text-to-SQL databases by name; ServingConfigError naming a missing file (`expertmesh
    up` calls it before starting anything, the replica again when it builds its app)."""
    from .config import ServingConfigError
    from .sql_demo import SAMPLE_DB

    databases = config.sql.databases or {"shakespeare": str(SAMPLE_DB)}
    for name, target in databases.items():
        local = target.removeprefix("sqlite:///")
        if "://" not in local and not Path(local).expanduser().is_file():  # URLs: checked on use
            raise ServingConfigError(
                f"sql.databases.{name}: no SQLite file at {local}; fix the path or remove the entry"
            )
    return dict(databases)


@serve.ingress()
class ApiServer:
    """One API replica: engine + gate + telemetry behind the OpenAI routes."""

    def __init__(self, config: dict[str, Any]) -> None:
        from expertmesh.observability import TelemetryConfig, configure_telemetry
        from expertmesh.observability.logs import configure_json_logging

        self.config = parse_serving_config(config)
        configure_json_logging(self.config.log_dir, "api")
        self.telemetry = configure_telemetry(TelemetryConfig(**self.config.telemetry))
        self.engine = build_engine(self.config, self.telemetry)
        self.gate = build_gate(self.config, self.engine)

    def __serve_build_asgi_app__(self) -> Any:
        app = make_api(
            self.engine,
            ApiSettings(self.config.default_max_tokens, self.config.request_timeout_s),
            self.gate,
            meter=self.telemetry.meter,
            prometheus_registry=self.telemetry.prometheus_registry,
            tracer=self.telemetry.tracer,
        )
        from .gate import SelectorGate

        if isinstance(self.gate, SelectorGate):  # text-to-SQL needs the selector (task sql)
            from .sql import SelectorChooser, TextToSql
            from .sql_api import sql_router

            selector = self.gate.selector
            sql = self.config.sql
            databases = sql_databases(self.config)
            service = TextToSql(
                self.engine,
                SelectorChooser(selector),
                sql.max_tokens,
                ground_values=sql.ground_values,
            )
            app.include_router(
                sql_router(service, selector, databases, sql.row_limit, sql.timeout_s)
            )
            if self.config.mcp is not None:
                from .mcp_server import WithMcp, build_mcp_from_spec

                mcp = build_mcp_from_spec(
                    self.config.mcp,
                    self.engine,
                    selector,
                    self.telemetry.tracer,
                    sql_service=service,
                    databases=databases,
                    sql=sql,
                )
                return WithMcp(app, mcp)
        return app

    def check_health(self) -> None:
        health = self.engine.health()
        if not health.healthy:
            raise EngineDead(health.detail)

    async def __del__(self) -> None:
        await self.engine.shutdown()


def deployment_options(config: ServingConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": "expertmesh-api",
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": 0},
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(args: dict[str, Any] | ServingConfig | None = None) -> serve.Application:
    """The API as a Ray Serve application; `args` are `ServingConfig` fields."""
    config = args if isinstance(args, ServingConfig) else parse_serving_config(args or {})
    deployment: Any = serve.deployment(ApiServer)
    deployment = deployment.options(**deployment_options(config))
    return deployment.bind(config.model_dump())
