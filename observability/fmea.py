"""Failure-mode and effects analysis from what a run recorded: spans, metric data points and fault
events (`events.py`) in, one scored row per failure mode out. This file measures (incidents,
times to detect and recover, affected requests, expert load); `fmea_scoring.py` holds the
scales that score them; `fmea_report.py` renders Markdown, HTML and plots.

    inputs = FmeaInputs.load(spans="spans.jsonl", metrics="metrics.jsonl", events="events.jsonl")
    report = build_fmea(inputs)
    for row in report.rows: print(row.failure_mode, row.rpn, row.action_priority)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .events import FAILURE_MODES, FaultEvent, read_events
from .fmea_scoring import (
    MODE_PROFILES,
    ActionPriority,
    action_priority,
    detection_score,
    occurrence_score,
    percentile,
    severity_score,
)
from .jsonl_exporter import Record, read_metrics, read_spans
from .logs import REQUEST_ID_ATTRIBUTE

EXPERT_TOKENS_METRIC = "expertmesh.expert.tokens"
"""Counter of tokens dispatched to each expert, attributes `layer` and `expert`."""
RUNBOOK_DIR = "docs/runbooks"

# --- incidents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Incident:
    """One failure: its fault, detection and recovery times (Unix ns; None when not seen)."""

    failure_mode: str
    target: str
    scenario: str | None
    fault_ns: int | None
    """None for a failure nobody injected: it starts at its detection."""
    detected_ns: int | None
    recovered_ns: int | None
    actions: tuple[str, ...] = ()
    restored_ns: int | None = None
    """When the injector stopped injecting (`restored`), for a transient fault."""
    detected_by: str = ""
    """The `source` of the detection (the platform component that noticed)."""

    @property
    def start_ns(self) -> int:
        start = self.fault_ns if self.fault_ns is not None else self.detected_ns
        assert start is not None  # pair_incidents opens incidents only at a fault or detection
        return start

    @property
    def time_to_detect_s(self) -> float | None:
        if self.fault_ns is None or self.detected_ns is None:
            return None
        return (self.detected_ns - self.fault_ns) / 1e9

    @property
    def time_to_recover_s(self) -> float | None:
        """From the fault (or, for an uninjected failure, its detection) to recovery."""
        if self.recovered_ns is None:
            return None
        return (self.recovered_ns - self.start_ns) / 1e9


@dataclass
class _OpenIncident:
    failure_mode: str
    target: str
    scenario: str | None
    incident: str | None
    fault_ns: int | None
    detected_ns: int | None = None
    recovered_ns: int | None = None
    actions: list[str] = field(default_factory=list)
    restored_ns: int | None = None
    detected_by: str = ""

    def freeze(self) -> Incident:
        return Incident(
            self.failure_mode,
            self.target,
            self.scenario,
            self.fault_ns,
            self.detected_ns,
            self.recovered_ns,
            tuple(self.actions),
            self.restored_ns,
            self.detected_by,
        )


def _match(candidates: list[_OpenIncident], event: FaultEvent) -> _OpenIncident | None:
    """The earliest open incident `event` belongs to: same incident id, else same target, else
    any of its mode (candidates are already filtered to the mode and stage)."""
    if event.incident is not None:
        same_id = [c for c in candidates if c.incident == event.incident]
        if same_id:
            return same_id[0]
        candidates = [c for c in candidates if c.incident is None]
    same_target = [c for c in candidates if c.target == event.target]
    if same_target:
        return same_target[0]
    return candidates[0] if candidates else None


def pair_incidents(events: Iterable[FaultEvent]) -> tuple[list[Incident], int]:
    """Group events into incidents, in time order. A "fault" opens one; "detected", "action",
    "restored" and "recovered" join the earliest open incident of their mode that lacks that
    stage (same incident id first, then same target); "recovered" closes it. A "detected" with
    nothing to join opens an uninjected incident. Only the platform detects: the time to detect
    is the first platform "detected" after the fault (the injector cannot emit one, see
    `events.FaultEvent`). Returns the incidents and the number of "recovered" events that
    matched nothing."""
    open_: list[_OpenIncident] = []
    done: list[_OpenIncident] = []
    unmatched_recoveries = 0
    for event in sorted(events, key=lambda e: e.time_unix_nano):
        t = event.time_unix_nano
        of_mode = [c for c in open_ if c.failure_mode == event.failure_mode]
        if event.kind == "fault":
            open_.append(
                _OpenIncident(event.failure_mode, event.target, event.scenario, event.incident, t)
            )
        elif event.kind == "detected":
            found = _match([c for c in of_mode if c.detected_ns is None], event)
            if found is None:
                found = _OpenIncident(
                    event.failure_mode, event.target, event.scenario, event.incident, None
                )
                open_.append(found)
            found.detected_ns = t
            found.detected_by = event.source
        elif event.kind == "restored":
            found = _match(
                [c for c in of_mode if c.fault_ns is not None and c.restored_ns is None], event
            )
            if found is not None:
                found.restored_ns = t
        elif event.kind == "action":
            found = _match(of_mode, event)
            if found is not None:
                found.actions.append(event.detail or "action")
        elif event.kind == "recovered":
            found = _match(of_mode, event)
            if found is None:
                unmatched_recoveries += 1
            else:
                found.recovered_ns = t
                open_.remove(found)
                done.append(found)
    incidents = [i.freeze() for i in done + open_]
    incidents.sort(key=lambda i: i.start_ns)
    return incidents, unmatched_recoveries


# --- requests from spans ---------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSample:
    """One request: the root span of its trace."""

    trace_id: str
    request_id: str | None
    start_ns: int
    end_ns: int
    duration_ms: float
    error: bool


def request_samples(spans: Iterable[Record]) -> list[RequestSample]:
    """One sample per trace, from its root span (no parent in the trace; the earliest if
    several), ordered by start time. The request id is the root's `expertmesh.request_id`, or
    any span's in the trace."""
    traces: dict[str, list[Record]] = {}
    for span in spans:
        if span.get("start_time_ns") is None or span.get("end_time_ns") is None:
            continue
        traces.setdefault(span["trace_id"], []).append(span)
    samples: list[RequestSample] = []
    for trace_id, trace in traces.items():
        ids = {s["span_id"] for s in trace}
        roots = [s for s in trace if s.get("parent_span_id") not in ids]
        root = min(roots or trace, key=lambda s: s["start_time_ns"])
        request_id = root.get("attributes", {}).get(REQUEST_ID_ATTRIBUTE)
        if request_id is None:
            request_id = next(
                (
                    s["attributes"][REQUEST_ID_ATTRIBUTE]
                    for s in trace
                    if REQUEST_ID_ATTRIBUTE in s.get("attributes", {})
                ),
                None,
            )
        samples.append(
            RequestSample(
                trace_id=trace_id,
                request_id=request_id,
                start_ns=root["start_time_ns"],
                end_ns=root["end_time_ns"],
                duration_ms=(root["end_time_ns"] - root["start_time_ns"]) / 1e6,
                error=(root.get("status") or {}).get("code") == "ERROR",
            )
        )
    samples.sort(key=lambda r: r.start_ns)
    return samples


# --- expert load from metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLoad:
    """Tokens per (layer, expert) from the `expertmesh.expert.tokens` counter."""

    layers: tuple[str, ...]
    experts: tuple[str, ...]
    tokens: tuple[tuple[float, ...], ...]
    """(layers, experts)"""

    def imbalance(self, layer_index: int) -> float:
        """max / mean tokens over the experts of one layer (1.0 is perfectly balanced)."""
        row = self.tokens[layer_index]
        mean = sum(row) / len(row)
        return max(row) / mean if mean > 0 else 0.0


def _label_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def expert_load(metrics: Iterable[Record]) -> ExpertLoad | None:
    """Sum the counter over processes and other attributes; None when there are no points.

    Cumulative series (the SDK default) repeat their running total at each collection, so each
    series (resource + scope + attributes) contributes its latest value; delta series
    contribute the sum of their points."""
    latest: dict[str, tuple[int, float, str, str]] = {}
    totals: dict[tuple[str, str], float] = {}
    for record in metrics:
        if record.get("name") != EXPERT_TOKENS_METRIC:
            continue
        attributes = record.get("attributes") or {}
        if "layer" not in attributes or "expert" not in attributes or "value" not in record:
            continue
        layer, expert = str(attributes["layer"]), str(attributes["expert"])
        if record.get("temporality") == "DELTA":
            totals[(layer, expert)] = totals.get((layer, expert), 0.0) + float(record["value"])
            continue
        series = json.dumps(
            [record.get("resource"), record.get("scope"), attributes], sort_keys=True, default=str
        )
        t = int(record.get("time_unix_nano") or 0)
        if series not in latest or t >= latest[series][0]:
            latest[series] = (t, float(record["value"]), layer, expert)
    for _, value, layer, expert in latest.values():
        totals[(layer, expert)] = totals.get((layer, expert), 0.0) + value
    if not totals:
        return None
    layers = tuple(sorted({k[0] for k in totals}, key=_label_key))
    experts = tuple(sorted({k[1] for k in totals}, key=_label_key))
    tokens = tuple(tuple(totals.get((lay, e), 0.0) for e in experts) for lay in layers)
    return ExpertLoad(layers, experts, tokens)


# --- inputs and the table --------------------------------------------------------------------


@dataclass(frozen=True)
class FmeaInputs:
    """What a run recorded. Each source may be absent; `missing` says which, for the report."""

    spans: list[Record] = field(default_factory=list)
    metrics: list[Record] = field(default_factory=list)
    events: list[FaultEvent] = field(default_factory=list)
    missing: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        spans: Path | str | None = None,
        metrics: Path | str | None = None,
        events: Path | str | None = None,
    ) -> FmeaInputs:
        """Read the three JSONL files; a path that is None or does not exist is noted as
        missing. A file that exists but is malformed raises (`TelemetryFileError`,
        `EventFileError`)."""
        missing: list[str] = []

        def present(what: str, path: Path | str | None) -> Path | None:
            if path is None:
                missing.append(f"no {what} file given")
                return None
            if not Path(path).exists():
                missing.append(f"{what} file {path} does not exist")
                return None
            return Path(path)

        spans_path = present("spans", spans)
        metrics_path = present("metrics", metrics)
        events_path = present("events", events)
        return cls(
            spans=read_spans(spans_path) if spans_path else [],
            metrics=read_metrics(metrics_path) if metrics_path else [],
            events=read_events(events_path) if events_path else [],
            missing=tuple(missing),
        )


@dataclass(frozen=True)
class FmeaRow:
    failure_mode: str
    effect: str
    cause: str
    detection_signal: str
    severity: int
    occurrence: int
    detection: int
    detection_measured: bool
    """False: D is the mode's design rating, no time to detect was measured."""
    rpn: int
    action_priority: ActionPriority
    runbook: str
    incidents: int
    undetected: int
    requests_lost: int
    requests_failed: int
    """Requests with error status that overlapped one of this mode's incidents."""
    requests_delayed: int
    """Requests without error, slower than the delay threshold, overlapping an incident."""
    time_to_detect_p50_s: float | None
    time_to_detect_p95_s: float | None
    time_to_recover_p50_s: float | None
    time_to_recover_p95_s: float | None
    false_positives: int = 0
    """In a recording with injected faults (a chaos run): detections that matched no fault."""
    detected_by: tuple[str, ...] = ()
    """The platform components whose detections were counted."""

    @property
    def observed(self) -> bool:
        return self.incidents > 0 or self.requests_lost > 0


@dataclass(frozen=True)
class FmeaReport:
    rows: tuple[FmeaRow, ...]
    """Observed modes first (by AP, then RPN), then the rest in `FAILURE_MODES` order."""
    incidents: tuple[Incident, ...]
    requests: tuple[RequestSample, ...]
    expert_load: ExpertLoad | None
    start_ns: int | None
    """Earliest time in any input (None when all are empty)."""
    recorded_s: float
    delay_threshold_ms: float | None
    notes: tuple[str, ...]


def _time_range(inputs: FmeaInputs) -> tuple[int | None, int | None]:
    """First and last time in the spans and events; in the metrics only when those are empty
    (a metric reader's last collection, at shutdown, can come long after the run)."""
    times: list[int] = []
    for span in inputs.spans:
        times += [t for t in (span.get("start_time_ns"), span.get("end_time_ns")) if t is not None]
    times += [e.time_unix_nano for e in inputs.events]
    if not times:
        for point in inputs.metrics:
            times += [
                t for t in (point.get("start_time_unix_nano"), point.get("time_unix_nano")) if t
            ]
    return (min(times), max(times)) if times else (None, None)


def _delay_threshold_ms(
    requests: Sequence[RequestSample], windows: Sequence[tuple[int, int]]
) -> float | None:
    """Slower than this is "delayed": max(p95, 2 x p50) of requests outside every incident
    window (of all requests when fewer than 5 are outside)."""
    if not requests:
        return None
    baseline = [r for r in requests if not any(_overlaps(r, w) for w in windows)]
    if len(baseline) < 5:
        baseline = list(requests)
    durations = [r.duration_ms for r in baseline]
    return max(percentile(durations, 95), 2 * percentile(durations, 50))


def _overlaps(request: RequestSample, window: tuple[int, int]) -> bool:
    return request.start_ns <= window[1] and request.end_ns >= window[0]


def _quantiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return percentile(values, 50), percentile(values, 95)


def build_fmea(inputs: FmeaInputs) -> FmeaReport:
    """Score every failure mode from what `inputs` recorded."""
    incidents, unmatched = pair_incidents(inputs.events)
    requests = request_samples(inputs.spans)
    start_ns, end_ns = _time_range(inputs)
    recorded_s = (end_ns - start_ns) / 1e9 if start_ns is not None and end_ns is not None else 0.0
    end = end_ns if end_ns is not None else 0
    # An incident affects requests from its start until it recovered (or the recording ended).
    windows = {
        i: (i.start_ns, i.recovered_ns if i.recovered_ns is not None else end) for i in incidents
    }
    threshold_ms = _delay_threshold_ms(requests, list(windows.values()))
    lost: dict[str, int] = {}
    for event in inputs.events:
        lost[event.failure_mode] = lost.get(event.failure_mode, 0) + event.lost_count
    chaos_run = any(e.kind == "fault" and not e.from_platform for e in inputs.events)

    rows = [
        _row(
            mode,
            [i for i in incidents if i.failure_mode == mode],
            windows,
            requests,
            threshold_ms,
            lost.get(mode, 0),
            recorded_s,
            chaos_run,
        )
        for mode in FAILURE_MODES
    ]
    ap_rank = {"High": 0, "Medium": 1, "Low": 2}
    observed = sorted(
        (r for r in rows if r.observed), key=lambda r: (ap_rank[r.action_priority], -r.rpn)
    )
    rows = observed + [r for r in rows if not r.observed]

    notes = list(inputs.missing)
    if unmatched:
        notes.append(f"{unmatched} recovered event(s) matched no open incident")
    in_no_window = [
        r for r in requests if r.error and not any(_overlaps(r, w) for w in windows.values())
    ]
    if in_no_window:
        notes.append(
            f"{len(in_no_window)} failed request(s) outside every incident window "
            "(a failure no event recorded?)"
        )
    return FmeaReport(
        rows=tuple(rows),
        incidents=tuple(incidents),
        requests=tuple(requests),
        expert_load=expert_load(inputs.metrics),
        start_ns=start_ns,
        recorded_s=recorded_s,
        delay_threshold_ms=threshold_ms,
        notes=tuple(notes),
    )


def _row(
    mode: str,
    incidents: Sequence[Incident],
    windows: Mapping[Incident, tuple[int, int]],
    requests: Sequence[RequestSample],
    threshold_ms: float | None,
    requests_lost: int,
    recorded_s: float,
    chaos_run: bool = False,
) -> FmeaRow:
    profile = MODE_PROFILES[mode]
    injected = [i for i in incidents if i.fault_ns is not None]
    ttd = [t for i in injected if (t := i.time_to_detect_s) is not None]
    ttr = [t for i in incidents if (t := i.time_to_recover_s) is not None]
    undetected = sum(1 for i in injected if i.detected_ns is None)
    measured = bool(ttd) or undetected > 0
    detection = detection_score(ttd, undetected) if measured else profile.design_detection
    severity = severity_score(mode, requests_lost)
    occurrence = occurrence_score(len(incidents), requests=len(requests), recorded_s=recorded_s)

    affected = [r for r in requests if any(_overlaps(r, windows[i]) for i in incidents)]
    failed = sum(1 for r in affected if r.error)
    delayed = sum(
        1 for r in affected if not r.error and threshold_ms and r.duration_ms > threshold_ms
    )
    effect = profile.effect
    if incidents and requests:
        effect += f"; observed: {failed} failed, {delayed} delayed of {len(affected)} requests"
        if affected:
            p95 = percentile([r.duration_ms for r in affected], 95)
            effect += f" in incident windows (p95 {p95:.0f} ms)"
    if requests_lost:
        effect += f"; {requests_lost} lost"
    cause = profile.cause
    scenarios = sorted({i.scenario for i in injected if i.scenario})
    if scenarios:
        cause += f"; injected by scenario {', '.join(scenarios)}"

    ttd50, ttd95 = _quantiles(ttd)
    ttr50, ttr95 = _quantiles(ttr)
    return FmeaRow(
        failure_mode=mode,
        effect=effect,
        cause=cause,
        detection_signal=profile.detection_signal,
        severity=severity,
        occurrence=occurrence,
        detection=detection,
        detection_measured=measured,
        rpn=severity * occurrence * detection,
        action_priority=action_priority(severity, occurrence, detection),
        runbook=f"{RUNBOOK_DIR}/{mode}.md",
        incidents=len(incidents),
        undetected=undetected,
        requests_lost=requests_lost,
        requests_failed=failed,
        requests_delayed=delayed,
        time_to_detect_p50_s=ttd50,
        time_to_detect_p95_s=ttd95,
        time_to_recover_p50_s=ttr50,
        time_to_recover_p95_s=ttr95,
        false_positives=sum(1 for i in incidents if i.fault_ns is None) if chaos_run else 0,
        detected_by=tuple(sorted({i.detected_by for i in injected if i.detected_by})),
    )


__all__ = [
    "EXPERT_TOKENS_METRIC",
    "RUNBOOK_DIR",
    "ExpertLoad",
    "FmeaInputs",
    "FmeaReport",
    "FmeaRow",
    "Incident",
    "RequestSample",
    "build_fmea",
    "expert_load",
    "pair_incidents",
    "request_samples",
]
