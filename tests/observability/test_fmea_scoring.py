"""FMEA scoring: severity, occurrence from rates, detection from time to detect, action priority,
and pairing events into incidents."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from expertmesh.observability.events import (
    EXPERT_SHARD_LOST,
    NODE_DRAINED,
    NODE_LOST,
    FaultEvent,
)
from expertmesh.observability.fmea import FmeaInputs, build_fmea, pair_incidents
from expertmesh.observability.fmea_scoring import (
    action_priority,
    detection_score,
    occurrence_score,
    percentile,
    severity_score,
)

S = 10**9
scores = st.integers(min_value=1, max_value=10)


@pytest.mark.parametrize(
    ("times_s", "expected"),
    [
        ([0.2], 1),
        ([0.8, 0.9], 2),
        ([1.5], 3),
        ([4.0], 4),
        ([6.0], 5),
        ([20.0], 6),
        ([45.0], 7),
        ([200.0], 8),
        ([1000.0], 9),
    ],
)
def test_detection_scores_fast_automatic_detection_low(times_s: list[float], expected: int) -> None:
    assert detection_score(times_s, undetected=0) == expected


def test_detection_uses_the_p95_so_slow_detections_count() -> None:
    # The median (0.1 s) would score 1; the p95 (40 s) scores 7.
    assert detection_score([0.1] * 10 + [40.0] * 2, undetected=0) == 7


def test_an_undetected_fault_scores_detection_10() -> None:
    assert detection_score([0.1, 0.1], undetected=1) == 10


def test_detection_without_measurement_is_an_error() -> None:
    with pytest.raises(ValueError, match="design detection"):
        detection_score([], undetected=0)


def test_occurrence_per_1000_requests_when_requests_were_recorded() -> None:
    assert occurrence_score(0, requests=500, recorded_s=60) == 1
    assert occurrence_score(10, requests=100, recorded_s=60) == 10  # 100 per 1000
    assert occurrence_score(1, requests=1000, recorded_s=60) == 5  # 1 per 1000
    assert occurrence_score(1, requests=1_000_000, recorded_s=60) == 2  # 0.001 per 1000


def test_occurrence_per_hour_without_requests() -> None:
    assert occurrence_score(1, requests=0, recorded_s=3600) == 8  # hourly
    assert occurrence_score(1, requests=0, recorded_s=86_400) == 6  # daily
    # A blink of recorded time counts as a minute: 1 per minute is 60 per hour.
    assert occurrence_score(1, requests=0, recorded_s=0.01) == 10


def test_severity_is_raised_when_requests_were_lost() -> None:
    assert severity_score(NODE_DRAINED, requests_lost=0) == 3
    assert severity_score(NODE_DRAINED, requests_lost=1) == 8
    assert severity_score(EXPERT_SHARD_LOST, requests_lost=0) == 7
    assert severity_score(EXPERT_SHARD_LOST, requests_lost=2) == 9
    assert severity_score("head_failure", requests_lost=5) == 10


@pytest.mark.parametrize(
    ("s", "o", "d", "expected"),
    [
        (10, 10, 10, "High"),
        (9, 4, 2, "High"),  # severe and not rare: High even though well detected
        (7, 6, 3, "High"),
        (7, 4, 7, "High"),
        (7, 4, 4, "Medium"),
        (5, 8, 6, "High"),
        (5, 6, 3, "Medium"),
        (4, 4, 4, "Low"),
        (3, 3, 3, "Low"),
        (1, 10, 10, "Low"),  # no effect
        (10, 1, 10, "Low"),  # practically never happens
    ],
)
def test_action_priority_weights_severity_then_occurrence_then_detection(
    s: int, o: int, d: int, expected: str
) -> None:
    assert action_priority(s, o, d) == expected


def test_action_priority_differs_from_rpn_ranking() -> None:
    # Same RPN (160), different priority: severity dominates.
    assert 10 * 4 * 4 == 4 * 10 * 4
    assert action_priority(10, 4, 4) == "High"
    assert action_priority(4, 10, 4) == "Medium"


_RANK = {"Low": 0, "Medium": 1, "High": 2}


@given(scores, scores, scores, st.sampled_from(["s", "o", "d"]))
def test_action_priority_never_drops_when_a_score_worsens(
    s: int, o: int, d: int, which: str
) -> None:
    worse = {"s": s, "o": o, "d": d}
    worse[which] = min(10, worse[which] + 1)
    assert (
        _RANK[action_priority(worse["s"], worse["o"], worse["d"])]
        >= _RANK[action_priority(s, o, d)]
    )


def test_action_priority_rejects_out_of_range_scores() -> None:
    with pytest.raises(ValueError, match="detection must be 1-10"):
        action_priority(5, 5, 11)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0


def _event(kind: str, mode: str, target: str, seconds: float, **kw) -> FaultEvent:
    return FaultEvent(kind, mode, target, time_unix_nano=int(seconds * S), **kw)  # type: ignore[arg-type]


def test_concurrent_faults_pair_with_their_own_target() -> None:
    incidents, unmatched = pair_incidents(
        [
            _event("fault", EXPERT_SHARD_LOST, "shard-1", 1.0),
            _event("fault", EXPERT_SHARD_LOST, "shard-2", 1.1),
            _event("detected", EXPERT_SHARD_LOST, "shard-2", 1.3),
            _event("detected", EXPERT_SHARD_LOST, "shard-1", 1.5),
            _event("recovered", EXPERT_SHARD_LOST, "shard-1", 2.0),
            _event("recovered", EXPERT_SHARD_LOST, "shard-2", 3.1),
        ]
    )
    assert unmatched == 0
    by_target = {i.target: i for i in incidents}
    assert by_target["shard-1"].time_to_detect_s == pytest.approx(0.5)
    assert by_target["shard-2"].time_to_detect_s == pytest.approx(0.2)
    assert by_target["shard-1"].time_to_recover_s == pytest.approx(1.0)
    assert by_target["shard-2"].time_to_recover_s == pytest.approx(2.0)


def test_detection_of_another_target_joins_by_incident_id_or_mode() -> None:
    incidents, _ = pair_incidents(
        [
            _event("fault", NODE_LOST, "node-b", 1.0, incident="x"),
            _event("detected", NODE_LOST, "raylet@10.0.0.2", 4.0, incident="x"),
            _event("action", NODE_LOST, "raylet@10.0.0.2", 4.1, detail="re-place shards"),
            _event("recovered", NODE_LOST, "cluster", 6.0),
        ]
    )
    [incident] = incidents
    assert incident.time_to_detect_s == pytest.approx(3.0)
    assert incident.time_to_recover_s == pytest.approx(5.0)
    assert incident.actions == ("re-place shards",)


def test_detection_without_fault_is_an_uninjected_incident() -> None:
    incidents, _ = pair_incidents([_event("detected", NODE_LOST, "node-c", 2.0)])
    [incident] = incidents
    assert incident.fault_ns is None and incident.time_to_detect_s is None


def test_undetected_fault_scores_detection_10_in_the_table() -> None:
    report = build_fmea(FmeaInputs(events=[_event("fault", NODE_LOST, "node-b", 1.0)]))
    row = next(r for r in report.rows if r.failure_mode == NODE_LOST)
    assert (row.incidents, row.undetected, row.detection, row.detection_measured) == (
        1,
        1,
        10,
        True,
    )


def test_unobserved_mode_keeps_its_design_detection_rating() -> None:
    report = build_fmea(FmeaInputs())
    row = next(r for r in report.rows if r.failure_mode == NODE_LOST)
    assert not row.observed and not row.detection_measured
    assert (row.occurrence, row.action_priority) == (1, "Low")
    assert row.rpn == row.severity * row.occurrence * row.detection
