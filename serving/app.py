"""The public facade: `build_app(config)` returns the Ray Serve application of the API.

    serve run expertmesh.serving.app:build_app model=demo          # Serve CLI (args -> config)
    serve.run(build_app({"model": "demo"}))                       # Python
    # RayService serveConfigV2: import_path: expertmesh.serving.app:build_app, args: {...}
    expertmesh up                                                 # our CLI (with agent routes)

Each replica of the `ApiServer` deployment builds its engine from the config (our MoE engine,
vLLM, or a remote API), the selector gate when a policy is configured, and telemetry, then
serves `api.make_api(...)`. Ray Serve calls `check_health` every `health_check_period_s`: a
dead engine or a stalled engine loop (work held, no progress) fails it and Serve replaces the
replica.

Extra routes come in through one hook, `build_app(config, mounts=[...])`: each `RouteMount` is
called once per replica with the OpenAI app and the replica's parts (`Replica`: engine, gate,
telemetry, config) and returns the ASGI app to serve (the same app with routes added, or a
wrapper that routes some paths elsewhere). Mounts must pickle (Ray Serve ships them to the
replicas). This package ships none: text-to-SQL and MCP are mounted by `expertmesh.agents.app`,
which composes them (`serve run expertmesh.agents.app:build_app`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ray import serve

from .api import ApiSettings, Gate, make_api
from .config import ServingConfig, parse_serving_config
from .engine import Engine, EngineDead

if TYPE_CHECKING:
    from fastapi import FastAPI

    from expertmesh.observability import Telemetry


def build_engine(config: ServingConfig, telemetry: Any = None) -> Engine:
    """The engine a config names (imports only that engine's dependencies)."""
    from expertmesh.models.paths import resolve_model

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
            expert_pool=config.expert_pool,
        )
    if config.engine == "remote":
        from .remote_engine import RemoteOpenAIEngine

        assert config.remote is not None
        return RemoteOpenAIEngine.from_spec(config.model_name, config.remote)
    from .vllm_engine import VLLMEngine

    return VLLMEngine.load(config.model_name, str(resolve_model(config.model)), config)


def replica_events(config: ServingConfig, telemetry: Telemetry | None = None) -> Any:
    """Where a replica's detectors report: `<log_dir>/events.jsonl`, beside the supervisor's,
    each detection also counted on `telemetry`'s meter (`observability/fault_metrics.py`)."""
    from expertmesh.observability.events import EventLog
    from expertmesh.observability.fault_metrics import MeteredEvents
    from expertmesh.observability.logs import default_log_dir

    log_dir = Path(config.log_dir) if config.log_dir is not None else default_log_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    events: Any = EventLog(log_dir / "events.jsonl")
    return MeteredEvents(events, telemetry.meter) if telemetry is not None else events


def start_head_watch(events: Any) -> Any:
    """The Ray head's detector (`cluster/head_watch.py`), probing this cluster's GCS; None
    when this process is not on a Ray cluster."""
    import ray

    if not ray.is_initialized():
        return None
    from expertmesh.cluster.head_watch import SOURCE, HeadWatch
    from expertmesh.observability.events import SourcedEvents

    address = ray.get_runtime_context().gcs_address
    return HeadWatch(SourcedEvents(events, SOURCE), address).start()


def build_gate(
    config: ServingConfig,
    engine: Engine,
    telemetry: Telemetry | None = None,
    events: Any = None,
) -> Gate | None:
    """The selector gate of the config's policy (None without one). Its detectors (bad
    policy, budget ledger locked, budget exhausted) report to `events` (default
    `replica_events`)."""
    if config.policy is None:
        return None
    from expertmesh.policies import DEFAULT_POLICY

    from .gate import SelectorGate

    path = DEFAULT_POLICY if config.policy == "default" else Path(config.policy)
    if events is None:
        events = replica_events(config, telemetry)
    return SelectorGate.from_policy_file(
        path,
        engine,
        config.budget_ledger,
        config.decision_log,
        events=events,
    )


@dataclass(frozen=True)
class Replica:
    """What a route mount may use of the API replica it is mounted on."""

    engine: Engine
    gate: Gate | None
    """The selector gate (`gate.SelectorGate`) when the config has a policy, else None."""
    telemetry: Telemetry
    config: ServingConfig


class RouteMount(Protocol):
    """The hook for routes beyond the OpenAI API: called once per replica, after the OpenAI
    routes are built, with that app and the replica's parts; returns the ASGI app to serve."""

    def __call__(self, app: FastAPI, replica: Replica) -> Any: ...


@serve.ingress()
class ApiServer:
    """One API replica: engine + gate + telemetry behind the OpenAI routes."""

    def __init__(self, config: dict[str, Any], mounts: Sequence[RouteMount] = ()) -> None:
        from expertmesh.observability import TelemetryConfig, configure_telemetry
        from expertmesh.observability.logs import configure_json_logging

        self.config = parse_serving_config(config)
        self.mounts = tuple(mounts)
        configure_json_logging(self.config.log_dir, "api")
        self.telemetry = configure_telemetry(TelemetryConfig(**self.config.telemetry))
        self.engine = build_engine(self.config, self.telemetry)
        self.events = replica_events(self.config, self.telemetry)
        self.gate = build_gate(self.config, self.engine, self.telemetry, self.events)
        self.head_watch = start_head_watch(self.events)

    def __serve_build_asgi_app__(self) -> Any:
        app: Any = make_api(
            self.engine,
            ApiSettings(self.config.default_max_tokens, self.config.request_timeout_s),
            self.gate,
            meter=self.telemetry.meter,
            prometheus_registry=self.telemetry.prometheus_registry,
            tracer=self.telemetry.tracer,
        )
        replica = Replica(self.engine, self.gate, self.telemetry, self.config)
        for mount in self.mounts:
            app = mount(app, replica)
        return app

    def check_health(self) -> None:
        health = self.engine.health()
        if not health.healthy:
            raise EngineDead(health.detail)

    async def __del__(self) -> None:
        if self.head_watch is not None:
            self.head_watch.stop()
        await self.engine.shutdown()


DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
"""The environment that makes Ray Serve's ingress replicas serve HTTP themselves (Ray Serve's
experimental direct ingress): set where Ray starts (`ray start`, `ray.init`, the RayService
pods), since Serve's controller and replicas read it at import. Each API replica then runs its
own HTTP server on a port Serve allocates (30000-31000 by default; `ingress_urls` names them)
and the streamed tokens no longer cross the Serve proxy actor (one Ray object per batch of ASGI
messages and a second process's event loop per chunk). Serve's proxy keeps serving every route
on its usual port too."""


def ingress_urls(app_name: str, timeout_s: float = 60.0) -> list[str]:
    """The base URLs (route prefix included) of `app_name`'s replicas' own HTTP servers when
    Serve runs with direct ingress (`DIRECT_INGRESS_ENV`); [] when it routes through its proxy
    only. Waits up to `timeout_s` for a running replica. Reads the Serve controller's instance
    details (the target groups the REST API's GET /api/serve/applications/ reports)."""
    import time

    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Ray Serve is not running in this Ray cluster")
    controller = client._controller
    deadline = time.monotonic() + timeout_s
    while True:
        details = ray.get(controller.get_serve_instance_details.remote())
        host = (details.get("http_options") or {}).get("host") or "127.0.0.1"
        urls = []
        for group in details.get("target_groups") or []:
            protocol = group.get("protocol")
            if group.get("app_name") != app_name or getattr(protocol, "value", protocol) != "HTTP":
                continue
            prefix = (group.get("route_prefix") or "/").rstrip("/")
            for target in group.get("targets") or []:
                if "REPLICA" not in target.get("name", ""):  # the proxy, while none runs
                    continue
                # The replica binds Serve's http_options.host; on all interfaces, its node's IP.
                address = target["ip"] if host in ("0.0.0.0", "::") else host
                urls.append(f"http://{address}:{target['port']}{prefix}")
        if urls or time.monotonic() > deadline:
            return urls
        time.sleep(0.5)


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


def build_app(
    args: dict[str, Any] | ServingConfig | None = None, mounts: Sequence[RouteMount] = ()
) -> serve.Application:
    """The API as a Ray Serve application; `args` are `ServingConfig` fields, `mounts` the
    extra routes each replica serves (see `RouteMount`)."""
    config = args if isinstance(args, ServingConfig) else parse_serving_config(args or {})
    deployment: Any = serve.deployment(ApiServer)
    deployment = deployment.options(**deployment_options(config))
    return deployment.bind(config.model_dump(), tuple(mounts))
