"""`expertmesh up|status|down`: the whole platform on this machine.

`up` starts the embedded Ray cluster (one Ray node per topology node with `--topology`, else
one node), deploys the API (`serving.app.build_app`) on Ray Serve, waits until it answers,
prints the URL and an example `curl`, and serves until Ctrl-C or `expertmesh down`.
`--direct-ingress` turns on Ray Serve's direct ingress (the replica's own HTTP port, printed,
beside the proxy's). `--detach` runs that in the background and returns once the API is up;
the state file (`~/.expertmesh/up.json`, or `$EXPERTMESH_HOME/up.json`) records its pid and
URLs for `status`, `down`, `sql` and `mcp token`.

MCP is served on `/mcp` beside the API unless `--no-mcp` (or the config has no policy): the
built-in token issuer's key is `$EXPERTMESH_HOME/mcp-issuer.pem` (`expertmesh mcp token`
signs with it), and agents act as the policy's anonymous tenant unless the config's `mcp`
section maps them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

DEFAULT_PORT = 8000


def home_dir() -> Path:
    return Path(os.environ.get("EXPERTMESH_HOME", Path.home() / ".expertmesh"))


def state_file() -> Path:
    return home_dir() / "up.json"


def add_serve(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the local cluster, the selector and the OpenAI API")
    up.add_argument(
        "--config",
        type=Path,
        default=None,
        help="platform config YAML (ServingConfig fields plus mcp, sql)",
    )
    up.add_argument("--model", default=None, help="checkpoint directory or 'demo' (default)")
    up.add_argument("--topology", type=Path, default=None, help="run experts on this topology")
    up.add_argument("--policy", type=Path, default=None, help="selector policy YAML")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument(
        "--rig",
        action="store_true",
        help="serve on the rig `expertmesh rig up` brought up (the API on the head node's "
        "address, experts on the rig's nodes, planned on its measured topology; docs/rig.md)",
    )
    up.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Ray Serve's direct ingress (experimental in Ray Serve): the API replica serves "
        "HTTP itself on a port Serve picks (printed; the proxy's port keeps working), so "
        "streamed tokens skip the proxy actor (docs/serving.md)",
    )
    up.add_argument("--no-mcp", action="store_true", help="do not serve MCP on /mcp")
    up.add_argument(
        "--request",
        metavar="PROMPT",
        default=None,
        help="once up, send this prompt through the API (openai client) and print the reply",
    )
    up.add_argument("--max-tokens", type=int, default=32, help="max_tokens of --request")
    up.add_argument("--exit-after-request", action="store_true", help="shut down after --request")
    up.set_defaults(func=run_up)

    status = sub.add_parser("status", help="show whether the local platform is up")
    status.set_defaults(func=run_status)
    down = sub.add_parser("down", help="stop the local platform started by `expertmesh up`")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=run_down)


def serving_config(args: argparse.Namespace) -> Any:
    """The platform config (`agents.config.PlatformConfig`): `--config`'s file with the
    command line's overrides."""
    from expertmesh.agents.config import load_platform_config, parse_platform_config

    config = load_platform_config(args.config) if args.config else parse_platform_config({})
    serving, updates = config.serving, {}
    if args.model is not None:
        updates["model"] = args.model
    if args.topology is not None:
        updates["topology"] = str(args.topology.resolve())
    if args.policy is not None:
        updates["policy"] = str(args.policy.resolve())
    if updates.get("topology") or serving.topology:
        updates["embedded"] = True  # `up` runs the embedded cluster: emulate speeds and links
    if getattr(args, "rig", False):  # real links and quotas: plan on what the rig measured
        from .cmd_rig import measured_topology_file

        updates.update(topology=str(measured_topology_file()), embedded=False)
    policy = updates.get("policy", serving.policy)
    if config.agents.mcp is None and policy is not None and not args.no_mcp:
        updates["mcp"] = default_mcp(args.host, args.port, policy)
    if updates:
        config = parse_platform_config({**config.to_dict(), **updates}, "command line")
    return config


def default_mcp(host: str, port: int, policy: str) -> dict[str, Any]:
    """The `mcp` section `up` serves when the config has none: this server's /mcp, the
    built-in issuer keyed in $EXPERTMESH_HOME, agents acting as the policy's anonymous tenant."""
    from expertmesh.policies import DEFAULT_POLICY, load_policy

    loaded = load_policy(DEFAULT_POLICY if policy == "default" else Path(policy))
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {
        "resource_url": f"http://{reachable}:{port}/mcp",
        "key_file": str(home_dir() / "mcp-issuer.pem"),
        "default_tenant": loaded.anonymous_tenant,
    }


def mcp_issuer(mcp: Any) -> str:
    from expertmesh.agents.agent_auth import origin_of

    return str(mcp.issuer_url or origin_of(mcp.resource_url))


def run_up(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if getattr(args, "direct_ingress", False) and getattr(args, "rig", False):
        from expertmesh.serving.app import DIRECT_INGRESS_ENV

        console.print(
            "--direct-ingress: not with --rig (the rig's Ray nodes started without "
            f"{', '.join(DIRECT_INGRESS_ENV)}=1 in their environment)"
        )
        return 2
    config = serving_config(args)  # bad config: fail before starting anything
    _check_config(config)
    if args.topology is not None:
        from expertmesh.cluster.topology import load_topology

        load_topology(args.topology)
    existing = read_state()
    if existing is not None and _alive(existing["pid"]):
        console.print(
            f"already up at {existing['url']} (pid {existing['pid']}); `expertmesh down` first"
        )
        return 1
    if args.detach:
        return _detach(args, console)
    return _serve_foreground(args, config, console)


def _check_config(config: Any) -> None:
    """What the replica would refuse, refused here, before anything starts: the policy, the
    text-to-SQL database files, agents mapped to tenants the policy lacks."""
    from expertmesh.agents.app import sql_databases

    sql_databases(config.agents.sql)
    if config.serving.policy is None:
        return
    from expertmesh.policies import DEFAULT_POLICY, load_policy

    policy_path = config.serving.policy
    policy = load_policy(DEFAULT_POLICY if policy_path == "default" else policy_path)
    if config.agents.mcp is not None:
        from expertmesh.agents.mcp_server import check_agent_tenants

        check_agent_tenants(config.agents.mcp, [t.name for t in policy.tenants])


def _detach(args: argparse.Namespace, console: Console) -> int:
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log = state_file().with_name("up.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = read_state()
        if state is not None and state.get("pid") == proc.pid and state.get("ready"):
            console.print(f"expertmesh is up at {state['url']} (pid {proc.pid}, log {log})")
            return 0
        if proc.poll() is not None:
            console.print(f"expertmesh up failed (exit {proc.returncode}); see {log}")
            return 1
        time.sleep(0.5)
    console.print(f"expertmesh up did not become ready in 300 s; see {log}")
    return 1


def _serve_foreground(args: argparse.Namespace, platform: Any, console: Console) -> int:
    import ray
    from ray import serve

    from expertmesh.agents.app import build_app

    config = platform.serving

    cluster = None
    rig = contextlib.ExitStack()
    direct = getattr(args, "direct_ingress", False)
    if direct:
        from expertmesh.serving.app import DIRECT_INGRESS_ENV

        os.environ.update(DIRECT_INGRESS_ENV)  # read by Serve's controller and replicas
    if getattr(args, "rig", False):
        from .cmd_rig import enter_rig_for_serving

        args.host = enter_rig_for_serving(rig, args.host, console)
    elif config.topology is not None:
        from expertmesh.cluster.local import LocalCluster
        from expertmesh.cluster.topology import load_topology

        cluster = LocalCluster(load_topology(config.topology))
        console.print(f"starting the embedded cluster ({len(cluster.topology.nodes)} Ray nodes)...")
        cluster.start()
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    url = f"http://{args.host}:{args.port}"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        console.print("deploying the API on Ray Serve...")
        app = build_app(platform)
        if getattr(args, "rig", False):
            from .cmd_rig import pin_to_attention_node

            app = pin_to_attention_node(app)
        serve.run(app, name="expertmesh", route_prefix=config.route_prefix)
        direct_urls: list[str] = []
        if direct:
            from expertmesh.serving.app import ingress_urls

            direct_urls = ingress_urls("expertmesh")
            if not direct_urls:
                raise RuntimeError("--direct-ingress: Ray Serve reported no replica HTTP port")
        mcp = platform.agents.mcp
        _write_state(
            {
                "pid": os.getpid(),
                "url": url,
                "ready": True,
                "model": config.model_name,
                "mcp": mcp.resource_url if mcp else None,
                "mcp_issuer": mcp_issuer(mcp) if mcp and not mcp.jwks_url else None,
                "mcp_key_file": mcp.key_file if mcp and not mcp.jwks_url else None,
                "ray_address": ray.get_runtime_context().gcs_address,
                "direct_urls": direct_urls,
            }
        )
        console.print(f"[bold]expertmesh is up[/bold]: {url}/v1  (model {config.model_name!r})")
        if direct_urls:
            console.print(
                "direct ingress (no proxy hop): "
                + ", ".join(f"{u}/v1" for u in direct_urls)
                + "  (one URL a replica; a load balancer spreads clients over them)"
            )
        if mcp is not None:
            console.print(
                f"MCP: {mcp.resource_url}  (token: expertmesh mcp token --agent NAME "
                "--scope sql:query)"
            )
        _print_placement(url, console)
        console.print(
            f"try:  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{config.model_name}", "messages": [{{"role": "user", "content": "ROMEO:"}}], "max_tokens": 32}}'""",
            soft_wrap=True,
            highlight=False,
        )
        if args.request is not None:
            print(
                _one_request(
                    direct_urls[0] if direct_urls else url,
                    config.model_name,
                    args.request,
                    args.max_tokens,
                    _dev_key(config),
                )
            )
            if args.exit_after_request:
                return 0
        console.print("serving; Ctrl-C or `expertmesh down` stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
        return 0
    finally:
        _clear_state(os.getpid())
        with contextlib.suppress(Exception):
            serve.shutdown()
        if cluster is not None:
            cluster.stop()
        else:
            ray.shutdown()
        rig.close()


def _print_placement(url: str, console: Console) -> None:
    import httpx

    with contextlib.suppress(httpx.HTTPError, ValueError):
        health = httpx.get(f"{url}/health", timeout=10).json()
        experts = health.get("experts_per_node")
        if experts:
            held = ", ".join(f"{node}: {n}" for node, n in experts.items())
            console.print(f"expert shards (experts held per node): {held}")
        if health.get("supervisor") is not None:
            console.print(
                "supervisor: on (shard restarts, node loss and rejoin, rebalancing; "
                "fault events in the log directory's events.jsonl)"
            )


def _dev_key(config: Any) -> str:
    """The key the example request sends: $EXPERTMESH_API_KEY, else the dev key of the
    example policies (documented in examples/policies/README.md)."""
    return os.environ.get("EXPERTMESH_API_KEY", "sk-expertmesh-dev")


def _one_request(url: str, model: str, prompt: str, max_tokens: int, key: str) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    usage = reply.usage
    text = reply.choices[0].message.content or ""
    tokens = (
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
        if usage
        else ""
    )
    return f"{prompt}{text}\n[{reply.choices[0].finish_reason}; {tokens}]"


def run_status(args: argparse.Namespace) -> int:
    import httpx

    console = Console()
    state = read_state()
    if state is None or not _alive(state["pid"]):
        console.print("expertmesh is not up (no running `expertmesh up`)")
        return 1
    try:
        health = httpx.get(f"{state['url']}/health", timeout=5).json()
        models = httpx.get(f"{state['url']}/v1/models", timeout=5).json()
    except httpx.HTTPError as e:
        console.print(f"expertmesh (pid {state['pid']}) does not answer at {state['url']}: {e}")
        return 1
    console.print(f"expertmesh is up at {state['url']}/v1 (pid {state['pid']})")
    if state.get("direct_urls"):
        console.print(f"direct ingress: {', '.join(u + '/v1' for u in state['direct_urls'])}")
    console.print(f"models: {', '.join(m['id'] for m in models['data'])}")
    if state.get("mcp"):
        console.print(f"MCP: {state['mcp']}")
    console.print(f"health: {json.dumps(health)}")
    return 0 if health.get("status") == "ok" else 1


def run_down(args: argparse.Namespace) -> int:
    console = Console()
    state = read_state()
    if state is None or not _alive(state["pid"]):
        console.print("expertmesh is not up")
        _clear_state(None)
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and _alive(state["pid"]):
        time.sleep(0.2)
    if _alive(state["pid"]):
        console.print(f"pid {state['pid']} did not stop in {args.timeout:.0f} s; killing it")
        os.kill(state["pid"], signal.SIGKILL)
    _clear_state(None)
    console.print("expertmesh is down")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (detached by us, not yet reaped) counts as gone.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return "\nState:\tZ" not in status
    except OSError:
        return True


def read_state() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_file().read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(state: dict[str, Any]) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _clear_state(pid: int | None) -> None:
    state = read_state()
    if state is not None and (pid is None or state.get("pid") == pid):
        with contextlib.suppress(OSError):
            state_file().unlink()
