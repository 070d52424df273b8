"""`expertmesh fmea` (failure-mode analysis of a recorded run) and `expertmesh logs --request ID`
(one request's path through every process's JSON log).

    expertmesh fmea --spans spans.jsonl --metrics metrics.jsonl --events events.jsonl --out report/
    expertmesh fmea --out report/      # the running platform's fault events (supervisor)
    expertmesh logs --request req-17 --spans spans.jsonl
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def add_fmea(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fmea",
        help="FMEA table and HTML report from recorded spans, metrics and fault events",
        description="Score every failure mode (S, O, D, RPN, action priority) from a run's "
        "JSONL files and write fmea.md and fmea.html. Any file may be left out or missing.",
    )
    p.add_argument("--spans", type=Path, default=None, help="spans JSONL (JsonlSpanExporter)")
    p.add_argument("--metrics", type=Path, default=None, help="metrics JSONL (JsonlMetricExporter)")
    p.add_argument(
        "--events",
        type=Path,
        default=None,
        help="fault events JSONL (EventLog); with no file given at all, the platform's own: "
        "the serving replicas' supervisor writes $EXPERTMESH_HOME/logs/events.jsonl",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="directory for fmea.md and fmea.html (default .)",
    )
    p.set_defaults(func=run_fmea)


def add_logs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logs",
        help="one request's log lines across all processes, in time order",
        description="Gather the JSON log lines of one request from every process's file in the "
        "log directory, by request id or by the trace id the spans file gives it.",
    )
    p.add_argument("--request", required=True, metavar="ID", help="the request id")
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="log directory (default $EXPERTMESH_HOME/logs or ~/.expertmesh/logs)",
    )
    p.add_argument(
        "--spans", type=Path, default=None, help="spans JSONL: also match and show the trace"
    )
    p.set_defaults(func=run_logs)


def run_fmea(args: argparse.Namespace) -> int:
    from expertmesh.observability.fmea import FmeaInputs, build_fmea
    from expertmesh.observability.fmea_report import write_report

    console = Console()
    if args.spans is None and args.metrics is None and args.events is None:
        from expertmesh.observability.logs import default_log_dir

        args.events = default_log_dir() / "events.jsonl"
        console.print(f"reading the platform's fault events: {escape(str(args.events))}")
    inputs = FmeaInputs.load(spans=args.spans, metrics=args.metrics, events=args.events)
    for note in inputs.missing:
        console.print(f"[yellow]note[/yellow]: {escape(note)}", highlight=False)
    report = build_fmea(inputs)
    table = Table(title="Failure-mode and effects analysis")
    for column in ("Failure mode", "S", "O", "D", "RPN", "AP", "Inc.", "TTD p95", "TTR p95"):
        table.add_column(column, justify="left" if column in ("Failure mode", "AP") else "right")
    table.add_column("Lost", justify="right")
    table.add_column("Runbook")
    colors = {"High": "red", "Medium": "yellow", "Low": "green"}
    for row in report.rows:
        color = colors[row.action_priority]
        table.add_row(
            row.failure_mode,
            str(row.severity),
            str(row.occurrence),
            f"{row.detection}" if row.detection_measured else f"{row.detection}*",
            str(row.rpn),
            f"[{color}]{row.action_priority}[/{color}]",
            str(row.incidents),
            _seconds(row.time_to_detect_p95_s),
            _seconds(row.time_to_recover_p95_s),
            str(row.requests_lost),
            row.runbook,
        )
    console.print(table)
    console.print("* design detection rating: no time to detect measured", highlight=False)
    md_path, html_path = write_report(report, args.out)
    console.print(f"wrote {md_path} and {html_path}", highlight=False)
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _clock(time_unix_nano: int | None) -> str:
    if not time_unix_nano:
        return "?"
    return datetime.fromtimestamp(time_unix_nano / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]


def run_logs(args: argparse.Namespace) -> int:
    from expertmesh.observability.jsonl_exporter import read_spans
    from expertmesh.observability.logs import (
        default_log_dir,
        read_request_logs,
        request_trace_ids,
    )

    console = Console()
    log_dir = args.dir if args.dir is not None else default_log_dir()
    lines = read_request_logs(log_dir, args.request, spans_path=args.spans)
    spans = read_spans(args.spans) if args.spans else []
    trace_ids = request_trace_ids(spans, args.request)
    trace_ids |= {line["trace_id"] for line in lines if line.get("trace_id")}
    if not lines and not trace_ids:
        console.print(f"no log lines or spans for request {escape(args.request)} in {log_dir}")
        return 1
    table = Table(title=f"request {escape(args.request)}: {len(lines)} log lines")
    for column in ("time (UTC)", "process", "level", "logger", "message"):
        table.add_column(column)
    for line in lines:
        table.add_row(
            _clock(line.get("time_unix_nano")),
            escape(str(line.get("process", "?"))),
            escape(str(line.get("level", "?"))),
            escape(str(line.get("logger", ""))),
            escape(str(line.get("message", ""))),
        )
    console.print(table)
    if spans:
        _print_trace(console, [s for s in spans if s["trace_id"] in trace_ids])
    return 0


def _print_trace(console: Console, spans: list[dict[str, Any]]) -> None:
    """The request's spans as an indented tree: start, duration, status, name."""
    if not spans:
        console.print("no spans for this request in the spans file")
        return
    spans = sorted(spans, key=lambda s: s["start_time_ns"])
    by_id = {s["span_id"]: s for s in spans}
    table = Table(title=f"trace {', '.join(sorted({s['trace_id'] for s in spans}))}")
    for column in ("start (UTC)", "duration", "status", "span"):
        table.add_column(column, justify="right" if column == "duration" else "left")
    for span in spans:
        depth, parent = 0, span.get("parent_span_id")
        while parent in by_id and depth < 64:
            depth, parent = depth + 1, by_id[parent].get("parent_span_id")
        status = (span.get("status") or {}).get("code", "UNSET")
        duration = span.get("duration_ms")
        table.add_row(
            _clock(span.get("start_time_ns")),
            "-" if duration is None else f"{duration:.1f} ms",
            f"[red]{status}[/red]" if status == "ERROR" else status,
            "  " * depth + escape(span["name"]),
        )
    console.print(table)
