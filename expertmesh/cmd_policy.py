"""`expertmesh policy check|replay|hash-key`: validate a policy, dry-run one against logged
decisions, and hash an API key for a policy file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="check, replay and manage selection policies")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    check = psub.add_parser(
        "check", help="validate a policy and find unreachable or conflicting rules"
    )
    check.add_argument("file", type=Path, help="policy YAML (examples/policies/)")
    check.add_argument("--json", action="store_true", help="print findings as JSON")
    check.set_defaults(func=run_check)

    replay = psub.add_parser(
        "replay", help="re-decide logged requests under a new policy and report changes"
    )
    replay.add_argument("--log", required=True, type=Path, help="decision log (JSONL)")
    replay.add_argument("--policy", required=True, type=Path, help="the new policy YAML")
    replay.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    replay.add_argument(
        "--show", type=int, default=20, help="changed requests to list (default 20)"
    )
    replay.set_defaults(func=run_replay)

    hash_key = psub.add_parser("hash-key", help="print the sha256 digest of an API key")
    hash_key.add_argument("key", nargs="?", help="the key; read from stdin when left out")
    hash_key.add_argument("--new", action="store_true", help="generate a new key and print both")
    hash_key.set_defaults(func=run_hash_key)


def run_check(args: argparse.Namespace) -> int:
    from expertmesh.policies import check_policy, load_policy

    policy = load_policy(args.file)
    findings = check_policy(policy)
    errors = sum(1 for f in findings if f.severity == "error")
    if args.json:
        print(
            json.dumps(
                {
                    "policy": policy.label,
                    "findings": [
                        {"severity": f.severity, "where": f.where, "message": f.message}
                        for f in findings
                    ],
                },
                indent=2,
            )
        )
        return 1 if errors else 0
    console = Console()
    console.print(
        f"{args.file}: policy {policy.label}: {len(policy.models)} models, "
        f"{len(policy.tenants)} tenants, {len(policy.rules)} rules"
    )
    for f in findings:
        style = "red" if f.severity == "error" else "yellow"
        console.print(f"[{style}]{f.severity}[/{style}]: {f.where}: {f.message}", highlight=False)
    warnings = len(findings) - errors
    console.print(
        f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}"
    )
    return 1 if errors else 0


def run_replay(args: argparse.Namespace) -> int:
    from expertmesh.policies import load_policy
    from expertmesh.routing import replay_file

    policy = load_policy(args.policy)
    report = replay_file(args.log, policy)
    console = Console()
    totals = report.totals()
    summary = Table(title=f"Replay of {args.log} under {report.policy}", title_justify="left")
    summary.add_column("what")
    summary.add_column("count", justify="right")
    for key in (
        "requests",
        "model_changed",
        "newly_refused",
        "newly_served",
        "violations",
        "skipped",
    ):
        summary.add_row(key.replace("_", " "), str(totals[key]))
    summary.add_row("estimated cost, logged", f"${totals['old_estimated_cost_usd']:.6f}")
    summary.add_row("estimated cost, new policy", f"${totals['new_estimated_cost_usd']:.6f}")
    console.print(summary)
    changed = report.changed
    if changed:
        table = Table(
            title=f"Changed requests ({min(len(changed), args.show)} of {len(changed)})",
            title_justify="left",
        )
        for col in (
            "decision",
            "tenant",
            "before",
            "after",
            "cost before",
            "cost after",
            "violation",
        ):
            table.add_column(col, justify="right" if col.startswith("cost") else "left")
        for row in changed[: args.show]:
            table.add_row(
                row.decision_id,
                row.tenant,
                row.old_model or row.old_outcome,
                row.new_model or row.new_outcome,
                f"${row.old_cost_usd:.6f}",
                f"${row.new_cost_usd:.6f}",
                row.violation or "",
            )
        console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        console.print(f"report written to {args.json}")
    return 0


def run_hash_key(args: argparse.Namespace) -> int:
    from expertmesh.policies import hash_api_key, new_api_key

    if args.new:
        key = new_api_key()
        print(f"key:  {key}")
        print(f"hash: {hash_api_key(key)}")
        return 0
    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print(
            "expertmesh policy: error: no key given; pass it as an argument or on stdin, "
            "or use --new",
            file=sys.stderr,
        )
        return 2
    print(hash_api_key(key))
    return 0
