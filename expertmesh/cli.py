"""The `expertmesh` command line. Each subcommand lives with its concern; this file only
parses arguments and turns expected errors into one clear line (exit code 2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from .cmd_agents import add_agents
    from .cmd_chaos import add_chaos
    from .cmd_cluster import add_cluster
    from .cmd_jobs import add_jobs
    from .cmd_manifests import add_manifests
    from .cmd_models import add_generate, add_inspect
    from .cmd_observe import add_fmea, add_logs
    from .cmd_policy import add_policy
    from .cmd_pool import add_pool
    from .cmd_rig import add_rig
    from .cmd_serve import add_serve
    from .cmd_train import add_train

    parser = argparse.ArgumentParser(
        prog="expertmesh", description="Serve and train MoE models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"expertmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    add_inspect(sub)
    add_cluster(sub)
    add_manifests(sub)
    add_chaos(sub)
    add_policy(sub)
    add_serve(sub)
    add_train(sub)
    add_jobs(sub)
    add_fmea(sub)
    add_logs(sub)
    add_agents(sub)
    add_rig(sub)
    add_pool(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from expertmesh.models.errors import ModelError
    from expertmesh.models.tokenizer import TokenizerError

    errors: list[type[BaseException]] = [ModelError, TokenizerError, FileNotFoundError]
    from expertmesh.cluster.dispatch import ShardLost
    from expertmesh.cluster.placement import PlacementError
    from expertmesh.cluster.planning import TraceError
    from expertmesh.cluster.ray_nodes import DrainRefused
    from expertmesh.cluster.topology import TopologyError

    errors += [TopologyError, PlacementError, TraceError, ShardLost, DrainRefused]
    from expertmesh.policies import PolicyError
    from expertmesh.routing import DecisionLogError

    errors += [PolicyError, DecisionLogError]
    from expertmesh.serving.config import ServingConfigError

    errors.append(ServingConfigError)
    from expertmesh.chaos.runner import ChaosError

    errors.append(ChaosError)
    from .cmd_agents import expected_errors
    from .cmd_pool import expected_errors as pool_errors
    from .cmd_rig import expected_errors as rig_errors

    errors += [*expected_errors(), *rig_errors(), *pool_errors()]
    try:
        from expertmesh.observability import TelemetryError

        errors.append(TelemetryError)
    except ImportError:  # pragma: no cover - observability is part of the package
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _expected_errors() as e:
        print(f"expertmesh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
