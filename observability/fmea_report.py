"""The FMEA table (`fmea.py`) as Markdown and as a self-contained HTML report with plots: request
latency over time with fault, detection and recovery times marked, and the expert-load heatmap.

    report = build_fmea(FmeaInputs.load(spans=..., metrics=..., events=...))
    md_path, html_path = write_report(report, Path("out"))

Plots are drawn with matplotlib's Agg canvas on a `Figure` of their own (no pyplot, no global
backend switch) and embedded as base64 PNG, so the HTML file travels alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .fmea import EXPERT_TOKENS_METRIC, FmeaReport, FmeaRow, Incident

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NO_HEATMAP = (
    f"No `{EXPERT_TOKENS_METRIC}` data points (attributes `layer`, `expert`) in the metrics: "
    "expert-load heatmap not drawn."
)
NO_LATENCY = "No request spans: latency plot not drawn."
SCALES = (
    "S: fixed per mode, +2 and at least 8 when requests were lost. "
    "O: incidents per 1000 requests (per hour of recorded time without spans), 1 = not seen. "
    "D: from p95 time to detect (<=0.5 s: 1 ... >5 min: 9, undetected: 10); "
    "`*` = design rating, not measured. "
    "AP: simplified action priority after the AIAG & VDA FMEA Handbook (2019). "
    "Scales: docs/observability.md."
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _pair(p50: float | None, p95: float | None) -> str:
    return "-" if p50 is None else f"{_seconds(p50)} / {_seconds(p95)}"


def _detection(row: FmeaRow) -> str:
    return f"{row.detection}" if row.detection_measured else f"{row.detection}*"


def _summary(report: FmeaReport) -> str:
    failed = sum(1 for r in report.requests if r.error)
    started = (
        datetime.fromtimestamp(report.start_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if report.start_ns is not None
        else "nothing recorded"
    )
    return (
        f"Recorded {report.recorded_s:.1f} s from {started}: {len(report.requests)} requests "
        f"({failed} failed), {len(report.incidents)} incidents, "
        f"requests lost: {sum(r.requests_lost for r in report.rows)}."
    )


# --- Markdown --------------------------------------------------------------------------------

TABLE_HEADER = (
    "Failure mode",
    "Effect",
    "Cause",
    "Detection signal",
    "S",
    "O",
    "D",
    "RPN",
    "AP",
    "Incidents",
    "TTD p50 / p95",
    "TTR p50 / p95",
    "Lost",
    "Runbook",
)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_cells(row: FmeaRow) -> tuple[str, ...]:
    return (
        row.failure_mode,
        row.effect,
        row.cause,
        row.detection_signal,
        str(row.severity),
        str(row.occurrence),
        _detection(row),
        str(row.rpn),
        row.action_priority,
        str(row.incidents)
        + (f" ({row.undetected} undetected)" if row.undetected else "")
        + (f" ({row.false_positives} false positive)" if row.false_positives else ""),
        _pair(row.time_to_detect_p50_s, row.time_to_detect_p95_s)
        + (f" by {', '.join(row.detected_by)}" if row.detected_by else ""),
        _pair(row.time_to_recover_p50_s, row.time_to_recover_p95_s),
        str(row.requests_lost),
    )


def _incident_cells(incident: Incident, start_ns: int | None) -> tuple[str, ...]:
    at = (incident.start_ns - start_ns) / 1e9 if start_ns is not None else 0.0
    return (
        incident.failure_mode,
        incident.target,
        incident.scenario or "-",
        f"+{at:.2f} s" + ("" if incident.fault_ns is not None else " (not injected)"),
        _seconds(incident.time_to_detect_s)
        + (f" ({incident.detected_by})" if incident.detected_by else ""),
        _seconds(incident.time_to_recover_s),
        "; ".join(incident.actions) or "-",
    )


INCIDENT_HEADER = ("Failure mode", "Target", "Scenario", "Start", "TTD", "TTR", "Actions")


def render_markdown(report: FmeaReport) -> str:
    """The FMEA table, one row per failure mode with its runbook link, then the incidents."""
    lines = ["# Failure-mode and effects analysis", "", _summary(report), ""]
    lines += [f"> {_md_cell(note)}" for note in report.notes]
    if report.notes:
        lines.append("")
    lines.append("| " + " | ".join(TABLE_HEADER) + " |")
    lines.append("|" + "---|" * len(TABLE_HEADER))
    for row in report.rows:
        cells = [_md_cell(c) for c in _row_cells(row)]
        cells[0] = f"`{cells[0]}`"
        cells.append(f"[runbook]({row.runbook})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", SCALES, ""]
    lines += [
        "Plots (latency over time, expert load) are in fmea.html."
        if report.expert_load is not None
        else f"Plots are in fmea.html. {NO_HEATMAP}",
        "",
    ]
    if report.incidents:
        lines += ["## Incidents", ""]
        lines.append("| " + " | ".join(INCIDENT_HEADER) + " |")
        lines.append("|" + "---|" * len(INCIDENT_HEADER))
        for incident in report.incidents:
            cells = [_md_cell(c) for c in _incident_cells(incident, report.start_ns)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def latency_plot_png(report: FmeaReport) -> bytes | None:
    """Request latency (root span duration) against start time, faults as vertical lines; None
    without requests."""
    if not report.requests or report.start_ns is None:
        return None
    from matplotlib.figure import Figure

    t0 = report.start_ns
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ok = [r for r in report.requests if not r.error]
    failed = [r for r in report.requests if r.error]
    ax.scatter(
        [(r.start_ns - t0) / 1e9 for r in ok],
        [r.duration_ms for r in ok],
        s=8,
        color="tab:blue",
        label="request",
    )
    if failed:
        ax.scatter(
            [(r.start_ns - t0) / 1e9 for r in failed],
            [r.duration_ms for r in failed],
            s=24,
            marker="x",
            color="tab:red",
            label="failed request",
        )
    marks = (
        ("fault_ns", "tab:red", "--", "fault"),
        ("detected_ns", "tab:orange", ":", "detected"),
        ("recovered_ns", "tab:green", "-.", "recovered"),
    )
    for attribute, color, style, label in marks:
        times = [t for i in report.incidents if (t := getattr(i, attribute)) is not None]
        for n, t in enumerate(times):
            ax.axvline(
                (t - t0) / 1e9,
                color=color,
                linestyle=style,
                linewidth=1,
                label=None if n else label,
            )
    if len(report.incidents) <= 12:
        for incident in report.incidents:
            ax.annotate(
                incident.failure_mode,
                xy=((incident.start_ns - t0) / 1e9, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
            )
    if report.delay_threshold_ms is not None:
        ax.axhline(report.delay_threshold_ms, color="grey", linewidth=0.8, label="delay threshold")
    ax.set_xlabel("time since start of recording (s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("Request latency over time")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def expert_heatmap_png(report: FmeaReport) -> bytes | None:
    """Tokens per (layer, expert), layers labelled with their max/mean imbalance; None without
    `expertmesh.expert.tokens` data."""
    load = report.expert_load
    if load is None:
        return None
    from matplotlib.figure import Figure

    height = min(12.0, 1.5 + 0.35 * len(load.layers))
    width = min(16.0, 3 + 0.3 * len(load.experts))
    fig = Figure(figsize=(max(width, 6.0), max(height, 3.0)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(load.tokens, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="tokens")
    ax.set_yticks(
        range(len(load.layers)),
        [f"layer {layer} (x{load.imbalance(n):.2f})" for n, layer in enumerate(load.layers)],
        fontsize=8,
    )
    step = max(1, len(load.experts) // 32)
    ax.set_xticks(range(0, len(load.experts), step), list(load.experts)[::step], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title("Expert load (tokens); per layer max/mean in brackets")
    return _png(fig)


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; }
.ap-High { background: #f8d0d0; font-weight: bold; }
.ap-Medium { background: #fbeec4; }
.ap-Low { background: #dcefdc; }
.note { color: #7a4b00; }
img { max-width: 100%; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(rows_cells) + "</tr>" for rows_cells in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: FmeaReport) -> str:
    """The report as one self-contained HTML page (plots inline)."""
    fmea_rows = []
    for row in report.rows:
        cells = _row_cells(row)
        tds = [f"<td><code>{html.escape(cells[0])}</code></td>"]
        tds += [f"<td>{html.escape(c)}</td>" for c in cells[1:4]]
        tds += [f'<td class="num">{html.escape(c)}</td>' for c in cells[4:8]]
        tds.append(f'<td class="ap-{row.action_priority}">{row.action_priority}</td>')
        tds += [f'<td class="num">{html.escape(c)}</td>' for c in cells[9:]]
        tds.append(f'<td><a href="{html.escape(row.runbook)}">runbook</a></td>')
        fmea_rows.append(tds)
    incident_rows = [
        [f"<td>{html.escape(c)}</td>" for c in _incident_cells(i, report.start_ns)]
        for i in report.incidents
    ]
    latency = latency_plot_png(report)
    heatmap = expert_heatmap_png(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>expertmesh FMEA</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Failure-mode and effects analysis</h1>",
        f"<p>{html.escape(_summary(report))}</p>",
        *(f'<p class="note">{html.escape(note)}</p>' for note in report.notes),
        _html_table(TABLE_HEADER, fmea_rows),
        f"<p>{html.escape(SCALES)}</p>",
        "<h2>Latency over time</h2>",
        _img(latency, "request latency over time") if latency else f"<p>{NO_LATENCY}</p>",
        "<h2>Expert load</h2>",
        _img(heatmap, "expert load heatmap")
        if heatmap
        else f'<p class="note">{html.escape(NO_HEATMAP)}</p>',
    ]
    if incident_rows:
        parts += ["<h2>Incidents</h2>", _html_table(INCIDENT_HEADER, incident_rows)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: FmeaReport, out_dir: Path) -> tuple[Path, Path]:
    """Write `fmea.md` and `fmea.html` into `out_dir` (created if needed); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "fmea.md", out_dir / "fmea.html"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return md_path, html_path


__all__ = [
    "NO_HEATMAP",
    "expert_heatmap_png",
    "latency_plot_png",
    "render_html",
    "render_markdown",
    "write_report",
]
