"""Detector building blocks: a condition reports each incident once; a baseline watch fires on
a real shift of its signal, not on noise or on a change in the mix of work."""

from __future__ import annotations

import random

import pytest

from expertmesh.observability.detectors import BaselineWatch, Condition, spread
from expertmesh.observability.events import CHAOS, LINK_DEGRADED, FaultEvent


class ListSink:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.events.append(event)
        return event


def test_condition_emits_detected_once_then_recovered_with_its_source():
    sink = ListSink()
    c = Condition(sink, LINK_DEGRADED, "node-a", "cluster.dispatch")
    assert c.update(True, "slow") and not c.update(True, "still slow")
    assert c.update(False, "fine") and not c.update(False)
    assert [(e.kind, e.source, e.target) for e in sink.events] == [
        ("detected", "cluster.dispatch", "node-a"),
        ("recovered", "cluster.dispatch", "node-a"),
    ]
    assert c.detections == 1


def test_the_injector_cannot_emit_a_detection():
    with pytest.raises(ValueError, match="emits only fault and restored"):
        FaultEvent("detected", LINK_DEGRADED, "node-a", source=CHAOS)
    assert not FaultEvent("restored", LINK_DEGRADED, "node-a", source=CHAOS).from_platform


def _run(watch: BaselineWatch, seconds: float, y, rng, t0=0.0, rate_hz=100, x=lambda r: 4096):
    """Feed `seconds` of samples; returns the times the watch was on."""
    on = []
    t = t0
    while t < t0 + seconds:
        watch.add(t, x(rng), y(rng))
        verdict = watch.evaluate(t)
        if verdict is not None and verdict.active:
            on.append(t)
        t += 1 / rate_hz
    return on, t


def noisy(base: float):
    # lognormal jitter with rare 10x stalls: what a loaded 2-core machine's timings look like
    return lambda r: base * r.lognormvariate(0, 0.4) * (10 if r.random() < 0.03 else 1)


def test_watch_stays_silent_over_a_noisy_fault_free_run():
    rng = random.Random(0)
    watch = BaselineWatch(ratio_on=3, min_excess=0.002)
    on, _ = _run(watch, 60, noisy(0.001), rng)
    assert on == []


def test_watch_fires_within_a_window_of_a_shift_and_clears_after():
    rng = random.Random(1)
    watch = BaselineWatch(ratio_on=3, min_excess=0.002)
    _, t = _run(watch, 10, noisy(0.001), rng)
    on, t2 = _run(watch, 3, noisy(0.006), rng, t0=t)
    assert on and on[0] - t <= 0.6  # detected within about one window
    after, _ = _run(watch, 3, noisy(0.001), rng, t0=t2)
    assert not watch.active and (not after or after[-1] - t2 < 0.6)


def test_more_bytes_per_call_is_not_a_slower_link():
    rng = random.Random(2)
    watch = BaselineWatch(ratio_on=3, min_excess=0.002)
    # baseline: a mix of small (decode) and large (prefill) calls, time growing with size
    mix = lambda r: 2048 if r.random() < 0.8 else 1 << 20  # noqa: E731

    def timed(r, big_share):
        x = 2048 if r.random() > big_share else 1 << 20
        return x, (0.001 if x == 2048 else 0.008) * r.lognormvariate(0, 0.3)

    t = 0.0
    for _ in range(1000):
        x, y = timed(rng, 0.2)
        watch.add(t, x, y)
        watch.evaluate(t)
        t += 0.01
    fired = False
    for _ in range(300):  # a burst of long prompts: most calls large, none slower than usual
        x, y = timed(rng, 0.95)
        watch.add(t, x, y)
        v = watch.evaluate(t)
        fired |= bool(v and v.active)
        t += 0.01
    assert mix(rng) in (2048, 1 << 20) and not fired


def test_spread_is_p99_over_p50():
    assert spread([1.0] * 99 + [5.0]) == pytest.approx(1.0)
    assert spread([1.0] * 90 + [4.0] * 10) == pytest.approx(4.0)
    assert spread([]) == 1.0
