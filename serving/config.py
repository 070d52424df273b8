"""What a user writes to configure serving (YAML, `serveConfigV2` args, CLI flags): validated
at the edge with messages that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .scheduler import SchedulerConfig


class ServingConfigError(ValueError):
    """A serving config is invalid; the message names the field and the fix."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SchedulerSpec(_Spec):
    num_slots: Annotated[int, Field(ge=1, le=1024)] = 16
    """Requests decoding at once (KV-cache rows)."""
    max_waiting: Annotated[int, Field(ge=1)] = 64
    """Queue bound; beyond it requests get 429 with Retry-After."""
    prefill_chunk: Annotated[int, Field(ge=1)] = 64
    """Prompt tokens per prefill step (interleaved with decode steps)."""
    kv_budget_tokens: Annotated[int, Field(ge=1)] | None = None
    """KV positions all running requests may reserve; default num_slots x context window."""
    max_len: Annotated[int, Field(ge=2)] | None = None
    """Context window served (prompt + output); default the model's."""
    stall_after_s: Annotated[float, Field(gt=0)] = 30.0
    """No progress for this long while holding work = stalled (health check fails)."""
    threads: Annotated[int, Field(ge=1)] | None = None
    """torch threads of the engine; default every CPU the replica may run on."""
    pace_delivery_s: Annotated[float, Field(ge=0, le=1)] = 0.005
    """Engine waits up to this long after a step for its outputs to reach the streams
    (the HTTP path's per-token work then runs between forward passes); 0 = no wait."""
    stream_interval: Annotated[int, Field(ge=1)] = 1
    """Tokens per streamed chunk after the first (first token and last chunk go at once);
    k > 1 sends k times fewer SSE events through the proxy."""

    def build(self) -> SchedulerConfig:
        return SchedulerConfig(**self.model_dump())


class RemoteSpec(_Spec):
    base_url: str = Field(pattern=r"^https?://")
    """OpenAI-compatible endpoint, e.g. http://host:8000/v1."""
    model: str
    """The model name at the remote endpoint."""
    api_key_env: str | None = None
    """Environment variable holding the remote API key (never the key itself)."""
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class AutoscalingSpec(_Spec):
    """Ray Serve autoscaling of the API deployment (`autoscaling_config`)."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 16.0
    upscale_delay_s: Annotated[float, Field(ge=0)] = 10.0
    downscale_delay_s: Annotated[float, Field(ge=0)] = 120.0

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class SupervisorSpec(_Spec):
    """The supervisor of the expert-parallel cluster (engine expertmesh with a topology):
    restarts lost shards, re-places a lost node's experts, takes a returning node back and
    rebalances when routing drifts (docs/observability.md). Its fault events go to
    `<log_dir>/events.jsonl` for `expertmesh fmea`."""

    enabled: bool = True
    check_interval_s: Annotated[float, Field(gt=0)] = 0.2
    """Heartbeat round (a failed dispatch wakes it at once)."""
    ping_timeout_s: Annotated[float, Field(gt=0)] = 0.5
    node_lost_after_s: Annotated[float, Field(gt=0)] = 5.0
    """A shard down this long has lost its node even if Ray still lists the node alive."""
    drain_when_ray_drains: bool = True
    """Move a node's experts off when Ray marks its node draining (`ray drain-node`, KubeRay's
    autoscaler before a scale-down or a preemption)."""
    rejoin_lost_nodes: bool = True
    """Take a lost or Ray-drained node back when a new Ray node offers its resource (KubeRay
    recreated the pod)."""
    rebalance_every_s: Annotated[float, Field(ge=0)] = 30.0
    """How often observed expert load is checked for drift; 0 turns rebalancing off."""
    rebalance_threshold: Annotated[float, Field(ge=1.0)] = 1.2
    """Rebalance when predicted balancedness (max/mean node time) passes this."""
    rebalance_min_tokens: Annotated[int, Field(ge=1)] = 512
    """Token assignments observed before the load is trusted."""


class ServingConfig(_Spec):
    engine: Literal["expertmesh", "vllm", "remote"] = "expertmesh"
    """Which engine serves: our MoE engine, vLLM (extra `expertmesh[vllm]`), or a remote
    OpenAI-compatible API."""
    model: str = "demo"
    """Checkpoint directory, or "demo" for the bundled demo model (engines expertmesh, vllm)."""
    model_name: str = "expertmesh-demo"
    """The name clients put in `model`."""
    topology: str | None = None
    """Topology YAML: run the experts on the expert-parallel cluster (engine expertmesh)."""
    embedded: bool = False
    """The Ray cluster is the embedded one `expertmesh up` started: emulate the topology's node
    speeds and links (set by `expertmesh up`; leave False on a real cluster)."""
    kv_cache: Literal["full", "int8", "latent", "latent-int8"] | None = None
    scheduler: SchedulerSpec = SchedulerSpec()
    remote: RemoteSpec | None = None
    policy: str | None = "default"
    """Selector policy YAML (API keys, budgets, model choice), reloaded when the file changes
    (a bad version is rejected, the old one stays). "default": the bundled policy
    (`policies/default.yaml`: the demo model, anonymous local access, the dev key
    `sk-expertmesh-dev`); None: no selector (open access, the model named is served)."""
    budget_ledger: str | None = None
    """SQLite budget ledger; default next to the policy (`<policy>.budget.sqlite`)."""
    decision_log: str | None = None
    """JSONL file every selector decision is appended to (for `expertmesh policy replay`)."""
    default_max_tokens: Annotated[int, Field(ge=1)] = 256
    request_timeout_s: Annotated[float, Field(gt=0)] | None = 120.0
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 256
    """Ray Serve: concurrent requests per replica (our own queue bounds the engine)."""
    num_replicas: Annotated[int, Field(ge=1)] = 1
    autoscaling: AutoscalingSpec | None = None
    """Set to autoscale the API deployment instead of a fixed num_replicas."""
    health_check_period_s: Annotated[float, Field(gt=0)] = 5.0
    health_check_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    telemetry: dict[str, Any] = {"metrics_exporter": "prometheus"}
    """observability.TelemetryConfig fields."""
    route_prefix: str = "/"
    supervisor: SupervisorSpec = SupervisorSpec()
    """Recovery of the expert-parallel cluster (only with a `topology`)."""
    expert_pool: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """Attach to the shared expert pool of this name instead of starting this replica's own
    shards: one set of shards and one supervisor per model however many replicas run
    (`num_replicas`, autoscaling); the first replica starts it from `topology` and
    `supervisor`, restarted and added replicas attach, and it outlives them all (stop it with
    `expertmesh.cluster.expert_pool.pool_down`). Needs `topology` and a running Ray cluster
    (docs/cluster.md, "One expert pool, many API replicas")."""
    log_dir: str | None = None
    """Directory of the JSON log files every process writes (`expertmesh logs --request ID`
    reads them); default `$EXPERTMESH_HOME/logs`, else `~/.expertmesh/logs`."""

    @model_validator(mode="after")
    def _engine_fields(self) -> ServingConfig:
        if self.engine == "remote" and self.remote is None:
            raise ValueError("engine 'remote' needs a `remote` section (base_url, model)")
        if self.engine != "remote" and self.remote is not None:
            raise ValueError(
                f"`remote` is only used with engine 'remote' (engine is {self.engine!r})"
            )
        if self.topology is not None and self.engine != "expertmesh":
            raise ValueError("`topology` is only used with engine 'expertmesh'")
        if self.expert_pool is not None and self.topology is None:
            raise ValueError(
                "`expert_pool` needs a `topology` (the pool's experts are placed on it)"
            )
        return self


def config_error(source: str, error: ValidationError, prefix: str = "") -> ServingConfigError:
    """A ServingConfigError naming every bad field of `error` (under `prefix`, e.g. "mcp.")."""
    lines = []
    for err in error.errors():
        loc = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        lines.append(f"  {loc}: {msg}")
    return ServingConfigError(f"{source} is invalid:\n" + "\n".join(lines))


def parse_serving_config(data: Any, source: str = "serving config") -> ServingConfig:
    """Validate a mapping; ServingConfigError naming every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ServingConfigError(
            f"{source}: expected a mapping of fields, got {type(data).__name__}"
        )
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(source, e) from None


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file; ServingConfigError when it cannot be read or parsed."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ServingConfigError(f"cannot read serving config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ServingConfigError(f"serving config {path} is not valid YAML: {e}") from e


def load_serving_config(path: str | Path) -> ServingConfig:
    return parse_serving_config(read_config_file(path), str(path))
