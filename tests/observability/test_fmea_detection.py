"""The FMEA's detection column comes from the platform: time to detect is the first platform
`detected` after an injected `fault`, a fault no platform component detected scores 10, and in
a chaos recording detections that matched no fault are counted as false positives."""

from __future__ import annotations

from expertmesh.observability.events import CHAOS, LINK_DEGRADED, NODE_SLOW, FaultEvent
from expertmesh.observability.fmea import FmeaInputs, build_fmea, pair_incidents

S = 1_000_000_000


def ev(kind, mode, seconds, source, target="cpu-fast"):
    return FaultEvent(kind, mode, target, time_unix_nano=int(seconds * S), source=source)


def row(report, mode):
    return next(r for r in report.rows if r.failure_mode == mode)


def test_time_to_detect_is_measured_from_the_platform_detection():
    events = [
        ev("fault", LINK_DEGRADED, 10.0, CHAOS),
        ev("detected", LINK_DEGRADED, 10.8, "cluster.dispatch"),
        ev("restored", LINK_DEGRADED, 13.0, CHAOS),
        ev("recovered", LINK_DEGRADED, 14.2, "cluster.dispatch"),
    ]
    (incident,), _ = pair_incidents(events)
    assert abs(incident.time_to_detect_s - 0.8) < 1e-9
    assert incident.detected_by == "cluster.dispatch"
    assert incident.restored_ns == 13 * S
    r = row(build_fmea(FmeaInputs(events=events)), LINK_DEGRADED)
    assert r.detection_measured and r.detection == 2  # p95 0.8 s: <= 1 s
    assert r.detected_by == ("cluster.dispatch",) and r.false_positives == 0


def test_a_fault_the_platform_never_detects_scores_ten_even_if_restored():
    events = [
        ev("fault", NODE_SLOW, 1.0, CHAOS),
        ev("restored", NODE_SLOW, 4.0, CHAOS),
    ]
    r = row(build_fmea(FmeaInputs(events=events)), NODE_SLOW)
    assert r.undetected == 1 and r.detection == 10


def test_detections_matching_no_fault_are_false_positives_in_a_chaos_recording():
    events = [
        ev("detected", NODE_SLOW, 0.5, "cluster.dispatch", target="cpu-slow"),
        ev("fault", LINK_DEGRADED, 1.0, CHAOS),
        ev("detected", LINK_DEGRADED, 1.5, "cluster.dispatch"),
    ]
    report = build_fmea(FmeaInputs(events=events))
    assert row(report, NODE_SLOW).false_positives == 1
    assert row(report, LINK_DEGRADED).false_positives == 0
    # the same detection in a production recording (no injected fault) is a real incident
    real = build_fmea(FmeaInputs(events=events[:1]))
    assert row(real, NODE_SLOW).false_positives == 0 and row(real, NODE_SLOW).incidents == 1
