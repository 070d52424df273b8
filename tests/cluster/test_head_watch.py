"""The head watch (`cluster/head_watch.py`): detected when a GCS probe goes unanswered,
recovered at the first answer, each once; silent while the GCS answers. The real GCS is
stopped and continued by the chaos suite's hang-head scenario (tests/chaos)."""

from __future__ import annotations

import threading
import time

import pytest

from expertmesh.cluster.head_watch import HeadWatch
from expertmesh.observability.events import HEAD_FAILURE, FaultEvent


class Events:
    def __init__(self) -> None:
        self.got: list[FaultEvent] = []

    def emit(self, event: FaultEvent) -> FaultEvent:
        self.got.append(event)
        return event


class Gcs:
    """A probe that answers, or hangs for the timeout while `hung` is set."""

    def __init__(self) -> None:
        self.hung = threading.Event()

    def __call__(self, timeout_s: float) -> None:
        if self.hung.is_set():
            time.sleep(timeout_s)
            raise TimeoutError("deadline exceeded")


def test_a_hung_gcs_is_detected_once_and_recovered_once():
    events, gcs = Events(), Gcs()
    watch = HeadWatch(events, probe=gcs, probe_every_s=0.02, timeout_s=0.1).start()
    try:
        time.sleep(0.3)
        assert events.got == [] and watch.probes > 3
        gcs.hung.set()
        hung_at = time.time_ns()
        deadline = time.monotonic() + 2
        while not events.got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.kind for e in events.got] == ["detected"]
        detected = events.got[0]
        assert detected.failure_mode == HEAD_FAILURE and detected.source == "cluster.head"
        assert (detected.time_unix_nano - hung_at) / 1e9 < 0.1 + 0.02 + 0.1
        time.sleep(0.4)  # still hung: no second detection
        gcs.hung.clear()
        time.sleep(0.3)
        assert [e.kind for e in events.got] == ["detected", "recovered"]
        assert watch.detections == 1
    finally:
        watch.stop()


def test_a_watch_needs_an_address_or_a_probe():
    with pytest.raises(ValueError, match="gcs_address"):
        HeadWatch(None)
