"""`expertmesh pool status|down`: the shared expert pools (`expert_pool:` in the serving config)
on a Ray cluster. A pool is detached: it outlives every API replica, so removing one is an
operator's act (docs/cluster.md, docs/runbooks/rolling_upgrade.md).

expertmesh pool status                     # every pool: version, replicas, nodes, shards
expertmesh pool status demo --json         # one pool, everything its controller reports
expertmesh pool down demo                  # stop its shards, standbys and controller
expertmesh pool status --rig               # on the rig (`expertmesh rig up`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table


def add_pool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="shared expert pools on a Ray cluster: list them, remove one")
    psub = p.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    status = psub.add_parser("status", help="every pool (or one): version, replicas, shards")
    status.add_argument("name", nargs="?", default=None, help="one pool (default: all)")
    status.add_argument("--json", action="store_true", help="print JSON")
    _connection(status)
    status.set_defaults(func=run_pool_status)
    down = psub.add_parser("down", help="stop a pool's shards, standbys and controller")
    down.add_argument("name", help="the pool (`expertmesh pool status` lists them)")
    down.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="wait this long for the controller; then its actors are killed by name",
    )
    _connection(down)
    down.set_defaults(func=run_pool_down)


def _connection(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        default=None,
        help="Ray cluster (GCS) address; default $RAY_ADDRESS, else the running "
        "`expertmesh up`'s, else this machine's Ray node ('auto')",
    )
    where.add_argument("--rig", action="store_true", help="the rig's Ray (`expertmesh rig up`)")


def expected_errors() -> list[type[BaseException]]:
    from expertmesh.cluster.expert_pool import PoolError

    return [PoolError]


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[None]:
    """This process as a Ray driver of the cluster the arguments name; disconnects after."""
    import ray

    if args.rig:
        from expertmesh.cluster.rig.rig import driver

        with driver(join_cgroups=False):
            yield
        return
    from .cmd_cluster import _connect

    _connect(args)
    try:
        yield
    finally:
        ray.shutdown()


def run_pool_status(args: argparse.Namespace) -> int:
    from expertmesh.cluster.expert_pool import PoolError, pool_status, running_pools

    with connected(args):
        names = [args.name] if args.name else running_pools()
        if args.name and args.name not in running_pools():
            raise PoolError(f"no expert pool named {args.name!r} runs on this Ray cluster")
        statuses = {name: pool_status(name) for name in names}
    if args.json:
        print(json.dumps(statuses, indent=1, default=str))
        return 0
    console = Console()
    if not statuses:
        console.print("no expert pools run on this Ray cluster")
        return 0
    table = Table(title="expert pools")
    for col in (
        "pool",
        "version",
        "replicas",
        "nodes",
        "shard processes",
        "out of service",
        "restarts",
        "controller",
    ):
        table.add_column(col)
    for name, s in statuses.items():
        table.add_row(
            name,
            str(s.get("version", "-")),
            str(len(s.get("replicas", {}))),
            ", ".join(s.get("nodes", [])) or "-",
            str(s.get("shard_processes", s.get("actors", "-"))),
            ", ".join(s.get("out_of_service", [])) or "-",
            str(s.get("restarts", "-")),
            _controller(s),
        )
    console.print(table)
    return 0


def _controller(status: dict[str, Any]) -> str:
    if "error" in status:
        return f"[red]not answering[/red] ({status['error']})"
    return "restarted" if status.get("restarted") else "up"


def run_pool_down(args: argparse.Namespace) -> int:
    from expertmesh.cluster.expert_pool import pool_actors, pool_down

    with connected(args):
        stopped = pool_down(args.name, timeout_s=args.timeout_s)
        left = pool_actors(args.name)
    console = Console()
    console.print(f"pool {args.name}: stopped {stopped} shard actors and its controller")
    if left:
        console.print(f"[red]left behind[/red]: {', '.join(left)}")
        return 1
    return 0
