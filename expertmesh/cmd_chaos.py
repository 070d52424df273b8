"""`expertmesh chaos run SCENARIO`: fault injection under load (see chaos/runner.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table


def add_chaos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="inject faults into the embedded platform under load")
    csub = p.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")
    run = csub.add_parser("run", help="run scenarios (examples/chaos/*.yaml) and check them")
    run.add_argument("scenarios", nargs="+", type=Path, help="scenario YAML files")
    run.add_argument("--short", action="store_true", help="the short version the tests run")
    run.add_argument("--out", type=Path, default=Path("chaos-out"), help="spans, metrics, events")
    run.add_argument(
        "--control",
        action="store_true",
        help="the same load for the same length with no fault: every detection is a false positive",
    )
    run.set_defaults(func=run_chaos)


def run_chaos(args: argparse.Namespace) -> int:
    from expertmesh.chaos.runner import Runner, load_scenario

    console = Console()
    scenarios = [load_scenario(p) for p in args.scenarios]  # all valid before any starts
    table = Table(title="Chaos scenarios")
    columns = ("scenario", "requests", "ok", "429", "lost", "wrong", "detect s (max)")
    for col in (*columns, "false pos.", "recovery s (max)", "result"):
        table.add_column(col)
    failed = 0
    for scenario in scenarios:
        if args.short:
            scenario = scenario.shortened()
        console.print(f"running {scenario.name}: {scenario.description}")
        out = args.out / (scenario.name + ("-control" if args.control else ""))
        report = Runner(scenario, out, control=args.control).run()
        worst = max((max(v) for v in report.recovery_s.values()), default=0.0)
        detect = max((max(v) for v in report.time_to_detect_s.values()), default=0.0)
        table.add_row(
            scenario.name,
            str(report.requests),
            str(report.ok),
            str(report.rejected),
            str(report.lost),
            str(report.wrong_outputs),
            f"{detect:.2f}",
            str(len(report.false_positives)),
            f"{worst:.2f}",
            "pass" if report.passed else "FAIL: " + "; ".join(report.failures),
        )
        failed += not report.passed
    console.print(table)
    console.print(f"spans, metrics and fault events in {args.out}/<scenario>/ (expertmesh fmea)")
    return 1 if failed else 0
