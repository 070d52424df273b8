"""FMEA scoring: the fixed knowledge per failure mode (`MODE_PROFILES`) and the 1-10 scales
that turn what a run measured into severity (S), occurrence (O) and detection (D), and those
into an action priority. `fmea.py` measures; this file only scores.

- Severity (S): a fixed rating per mode (`MODE_PROFILES`); a mode that lost requests is raised
  by 2 and to at least 8, losing a request being loss of the service's primary function.
- Occurrence (O): incidents per 1000 requests when the spans hold requests, else incidents per
  hour of recorded time (`OCCURRENCE_PER_1000_REQUESTS`, `OCCURRENCE_PER_HOUR`); 1 when never
  seen. A chaos run's rates are the injection rate, not a field rate: score O from production
  recordings.
- Detection (D): from the p95 time to detect, `detected - fault` (`DETECTION_BY_TIME_TO_DETECT_S`):
  fast automatic detection scores low; a fault never detected scores 10. Until a time to
  detect is measured, the mode's design rating from `MODE_PROFILES` stands (marked so).
- RPN = S x O x D, the classic ranking, and the action priority (AP) that replaced it in the
  AIAG & VDA FMEA Handbook (1st edition, 2019): see `action_priority`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .events import (
    BAD_POLICY,
    BUDGET_DB_LOCKED,
    BUDGET_EXHAUSTED,
    ENGINE_STALLED,
    EXPERT_SHARD_LOST,
    HEAD_FAILURE,
    KV_CACHE_EXHAUSTED,
    LINK_DEGRADED,
    NODE_DRAINED,
    NODE_LOST,
    NODE_SLOW,
    ROUTER_IMBALANCE,
    WEIGHTS_CORRUPT,
)

ActionPriority = Literal["High", "Medium", "Low"]


@dataclass(frozen=True)
class ModeProfile:
    """What is known about a failure mode before any run: the fixed part of its FMEA row."""

    effect: str
    """Expected effect on requests."""
    cause: str
    """Typical causes."""
    detection_signal: str
    """The metric, event or alert that reveals it."""
    severity: int
    """S before requests were lost (1-10)."""
    design_detection: int
    """D until a time to detect is measured (1-10): how the signal is meant to work."""


MODE_PROFILES: Mapping[str, ModeProfile] = {
    EXPERT_SHARD_LOST: ModeProfile(
        effect="tokens routed to the shard's experts fail or wait until a replica or restart",
        cause="actor crash, OOM kill, GPU error",
        detection_signal="Ray actor death; `expertmesh.actor.restarts`",
        severity=7,
        design_detection=3,
    ),
    NODE_LOST: ModeProfile(
        effect="every shard on the node is gone; capacity drops until re-placement",
        cause="power or network loss, kernel panic, preemption",
        detection_signal="Ray node health check (missed heartbeats)",
        severity=8,
        design_detection=5,
    ),
    NODE_DRAINED: ModeProfile(
        effect="planned capacity drop; shards move before the node goes",
        cause="maintenance, scale-down",
        detection_signal="operator drain request (supervisor event)",
        severity=3,
        design_detection=1,
    ),
    LINK_DEGRADED: ModeProfile(
        effect="expert dispatch over the link is late; time per output token rises",
        cause="congestion, failing NIC or cable, misconfigured MTU",
        detection_signal=(
            "dispatch round trip minus shard busy time, per node, against its baseline for the "
            "bytes sent (`cluster/detect.py`); `expertmesh_tpot_spread`"
        ),
        severity=5,
        design_detection=6,
    ),
    NODE_SLOW: ModeProfile(
        effect="tokens routed to the node's experts come back late; time per output token rises",
        cause="thermal throttling, a noisy neighbour, a failing disk or memory",
        detection_signal=(
            "shard busy time per row against the node's own baseline (`cluster/detect.py`)"
        ),
        severity=5,
        design_detection=6,
    ),
    ROUTER_IMBALANCE: ModeProfile(
        effect="hot experts queue tokens; latency tail grows",
        cause="input distribution drift, router collapse",
        detection_signal=(
            "predicted imbalance of the observed load (supervisor's rebalancer); "
            "`expertmesh_router_imbalance`, `expertmesh_router_churn` per layer"
        ),
        severity=4,
        design_detection=5,
    ),
    KV_CACHE_EXHAUSTED: ModeProfile(
        effect="new requests queue, running ones are preempted",
        cause="long contexts, too many concurrent requests, leak",
        detection_signal=(
            "KV reservations near the engine's budget with requests waiting, or queue-full "
            "refusals (429) (`serving.engine`); `expertmesh.kv_cache.bytes_in_use`"
        ),
        severity=6,
        design_detection=3,
    ),
    ENGINE_STALLED: ModeProfile(
        effect="every request on the engine hangs until it is restarted",
        cause="deadlock, hung collective, stuck device",
        detection_signal=(
            "the scheduler's progress heartbeat stale with work held (supervisor's engine "
            "round, `stall_after_s`)"
        ),
        severity=8,
        design_detection=5,
    ),
    BUDGET_EXHAUSTED: ModeProfile(
        effect="the tenant's requests are refused (HTTP 429)",
        cause="spend reached the tenant's budget",
        detection_signal=(
            "the ledger refused a reservation for a spent budget (`routing.budget`, 429 "
            "insufficient_quota); `expertmesh_fault_active`"
        ),
        severity=5,
        design_detection=2,
    ),
    BAD_POLICY: ModeProfile(
        effect="policy reload rejected; the previous policy keeps serving",
        cause="invalid or conflicting policy file",
        detection_signal="policy validation error on load",
        severity=6,
        design_detection=2,
    ),
    HEAD_FAILURE: ModeProfile(
        effect="no scheduling or actor restarts; new deployments and recovery stop",
        cause="head node crash, GCS out of memory",
        detection_signal=(
            "a GCS key read unanswered within 1 s (`cluster/head_watch.py`, cluster.head); "
            "`expertmesh_fault_active`"
        ),
        severity=10,
        design_detection=6,
    ),
    WEIGHTS_CORRUPT: ModeProfile(
        effect="a shard cannot load, or serves wrong outputs if unchecked",
        cause="partial copy, disk error, wrong file",
        detection_signal="checkpoint parse error on a replica load (supervisor)",
        severity=9,
        design_detection=4,
    ),
    BUDGET_DB_LOCKED: ModeProfile(
        effect="budget reservations block or fail; requests wait or are refused",
        cause="another writer holds the database lock",
        detection_signal="ledger write lock not taken within its probe (`routing.budget`)",
        severity=6,
        design_detection=4,
    ),
}

# Scales: (threshold, score) pairs, first match wins.
OCCURRENCE_PER_1000_REQUESTS: tuple[tuple[float, int], ...] = (
    (100, 10),
    (50, 9),
    (20, 8),
    (10, 7),
    (2, 6),
    (0.5, 5),
    (0.1, 4),
    (0.01, 3),
)
"""Incidents per 1000 requests >= threshold -> score; any lower non-zero rate 2; none 1."""
OCCURRENCE_PER_HOUR: tuple[tuple[float, int], ...] = (
    (10, 10),  # every 6 minutes
    (4, 9),  # every 15 minutes
    (1, 8),  # hourly
    (1 / 4, 7),  # every 4 hours
    (1 / 24, 6),  # daily
    (1 / 168, 5),  # weekly
    (1 / 720, 4),  # monthly
    (1 / 8760, 3),  # yearly
)
"""Incidents per hour of recorded time >= threshold -> score; lower non-zero 2; none 1."""
MIN_RECORDED_S = 60.0
"""Recorded time is taken as at least this long, so one event in a blink is not a huge rate."""
DETECTION_BY_TIME_TO_DETECT_S: tuple[tuple[float, int], ...] = (
    (0.5, 1),
    (1, 2),
    (2, 3),
    (5, 4),
    (10, 5),
    (30, 6),
    (60, 7),
    (300, 8),
)
"""p95 time to detect <= bound (seconds) -> score; slower 9; a fault never detected 10."""
UNDETECTED_SCORE = 10
SLOW_DETECTION_SCORE = 9


def severity_score(failure_mode: str, requests_lost: int) -> int:
    """The mode's fixed severity, raised by 2 and to at least 8 (capped at 10) when requests
    were lost."""
    base = MODE_PROFILES[failure_mode].severity
    return min(10, max(base + 2, 8)) if requests_lost > 0 else base


def occurrence_score(incidents: int, *, requests: int, recorded_s: float) -> int:
    """O from the rate of incidents: per 1000 requests when requests were recorded, else per
    hour of recorded time (at least `MIN_RECORDED_S`)."""
    if incidents <= 0:
        return 1
    if requests > 0:
        return _score_at_least(incidents * 1000 / requests, OCCURRENCE_PER_1000_REQUESTS)
    hours = max(recorded_s, MIN_RECORDED_S) / 3600
    return _score_at_least(incidents / hours, OCCURRENCE_PER_HOUR)


def _score_at_least(rate: float, scale: Sequence[tuple[float, int]]) -> int:
    for threshold, score in scale:
        if rate >= threshold:
            return score
    return 2


def detection_score(times_to_detect_s: Sequence[float], undetected: int) -> int:
    """D from measured times to detect: 10 if any fault went undetected, else by the p95."""
    if undetected > 0:
        return UNDETECTED_SCORE
    if not times_to_detect_s:
        raise ValueError("no time to detect measured: use the mode's design detection rating")
    p95 = percentile(times_to_detect_s, 95)
    for bound, score in DETECTION_BY_TIME_TO_DETECT_S:
        if p95 <= bound:
            return score
    return SLOW_DETECTION_SCORE


def _band(value: int, lower_bounds: Sequence[int]) -> int:
    """Index of the band `value` falls in; `lower_bounds` ascending, band 0 below the first."""
    return sum(1 for bound in lower_bounds if value >= bound)


def action_priority(severity: int, occurrence: int, detection: int) -> ActionPriority:
    """High / Medium / Low: how urgently a row needs action.

    A simplified rule after the action-priority (AP) logic of the AIAG & VDA FMEA Handbook
    (2019), which replaced ranking by RPN. The handbook looks the priority up from bands of S,
    O and D, giving severity the most weight, then occurrence, then detection, so that for
    example a severe failure is High even when it is well detected, where RPN would rank it
    low. This is our own approximation of that table, not the table itself:

    - bands: S 1 | 2-3 | 4-6 | 7-8 | 9-10 (0..4), O 1 | 2-3 | 4-5 | 6-7 | 8-10 (0..4),
      D 1 | 2-4 | 5-6 | 7-10 (0..3);
    - S = 1 or O = 1 (no effect, or practically never happens): Low;
    - otherwise score = 3*S_band + 2*O_band + D_band: High at >= 16, Medium at >= 13, else Low.

    The weights and cut-offs were chosen to agree with our reading of the handbook's table on
    96 of its 100 band combinations; the four that differ (severity 9-10 with occurrence 2-5
    and good detection) come out one step higher, never lower. It is monotone: worsening any
    of S, O, D never lowers the priority.
    """
    for name, value in (
        ("severity", severity),
        ("occurrence", occurrence),
        ("detection", detection),
    ):
        if not 1 <= value <= 10:
            raise ValueError(f"{name} must be 1-10, got {value}")
    if severity == 1 or occurrence == 1:
        return "Low"
    s = _band(severity, (2, 4, 7, 9))
    o = _band(occurrence, (2, 4, 6, 8))
    d = _band(detection, (2, 5, 7))
    score = 3 * s + 2 * o + d
    if score >= 16:
        return "High"
    if score >= 13:
        return "Medium"
    return "Low"


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


__all__ = [
    "DETECTION_BY_TIME_TO_DETECT_S",
    "MODE_PROFILES",
    "OCCURRENCE_PER_1000_REQUESTS",
    "OCCURRENCE_PER_HOUR",
    "ActionPriority",
    "ModeProfile",
    "action_priority",
    "detection_score",
    "occurrence_score",
    "percentile",
    "severity_score",
]
