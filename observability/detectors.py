"""Detector building blocks: turn a component's own measurements into `detected` / `recovered`
fault events, once per incident. The components that own the signals feed them
(`cluster/detect.py`: dispatch round trips and shard busy time; `serving/local_engine.py`: KV
reservations and queue-full refusals; `routing/budget.py`: the ledger's write lock).

    condition = Condition(events, KV_CACHE_EXHAUSTED, target="engine", source="serving.engine")
    condition.update(True, "KV 97% reserved, 3 waiting")    # -> one `detected` event
    condition.update(True, "...")                            # still on: nothing
    condition.update(False, "KV 20% reserved")               # -> one `recovered` event

    watch = BaselineWatch(ratio_on=2.5, min_excess=0.002)    # y against its own past, per x bin
    watch.add(t, x=nbytes, y=wire_s)                         # per sample, cheap
    verdict = watch.evaluate(t)                              # every ~0.1 s: on/off/None

`BaselineWatch` compares the last `window_s` of samples with the key's own baseline (the
`baseline_s` before them, frozen while the watch is on), bin by bin of `x` (powers of two), so
a change in the mix of work (a burst of long prompts: more bytes per call) is not mistaken
for a slower link or node. It fires when the median of `y / baseline median of its bin` over
the window is at least `ratio_on` and the median excess at least `min_excess` (an absolute
floor, so a tiny baseline's noise does not read as a large ratio), and clears when the ratio
falls under `ratio_off`. Keys that share a machine (the nodes of one cluster) can divide out
what they all see at once: `judge(measured, reference)` with the median of the peers' ratios,
so a machine-wide slowdown (CPU contention) is not a fault of each. Nothing here imports the
rest of expertmesh.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .events import EventKind, EventSink, FaultEvent


class Condition:
    """An on/off condition of one target that emits `detected` when it turns on and
    `recovered` when it turns off (each incident once). Thread-safe."""

    def __init__(
        self,
        events: EventSink | None,
        failure_mode: str,
        target: str,
        source: str,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.events = events
        self.failure_mode = failure_mode
        self.target = target
        self.source = source
        self.clock = clock
        self.active = False
        self.detections = 0
        """How many times it turned on (false positives, in a fault-free run)."""
        self._lock = threading.Lock()

    def update(
        self, active: bool, detail: str = "", attributes: Mapping[str, Any] | None = None
    ) -> bool:
        """Set the condition; True when this call changed it (and emitted an event)."""
        with self._lock:
            if active == self.active:
                return False
            self.active = active
            if active:
                self.detections += 1
        kind: EventKind = "detected" if active else "recovered"
        if self.events is not None:
            self.events.emit(
                FaultEvent(
                    kind,
                    self.failure_mode,
                    target=self.target,
                    time_unix_nano=self.clock(),
                    detail=detail,
                    attributes=dict(attributes or {}),
                    source=self.source,
                )
            )
        return True


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class Verdict:
    """What one evaluation of a `BaselineWatch` found."""

    active: bool
    ratio: float
    """Median of y / its bin's baseline median over the window."""
    excess: float
    """Median of y - its bin's baseline median (y's unit)."""
    samples: int


class BaselineWatch:
    """One signal (y against x) of one key against its own baseline; see the module doc.

    Not thread-safe: one feeder (the dispatcher's thread) per watch."""

    def __init__(
        self,
        *,
        ratio_on: float,
        min_excess: float,
        ratio_off: float | None = None,
        window_s: float = 0.5,
        baseline_s: float = 30.0,
        min_samples: int = 6,
        min_baseline: int = 20,
        per_bin: int = 400,
        warmup: int = 20,
    ) -> None:
        if ratio_on <= 1:
            raise ValueError(f"ratio_on must be > 1, got {ratio_on}")
        self.ratio_on = ratio_on
        self.ratio_off = ratio_off if ratio_off is not None else 1 + (ratio_on - 1) / 2
        self.min_excess = min_excess
        self.window_s = window_s
        self.baseline_s = baseline_s
        self.min_samples = min_samples
        self.min_baseline = min_baseline
        self.per_bin = per_bin
        self.warmup = warmup
        """Samples skipped at the start (first calls: caches cold, threads starting)."""
        self.active = False
        self._seen = 0
        self._recent: deque[tuple[float, int, float]] = deque()
        self._baseline: dict[int, deque[tuple[float, float]]] = {}

    @staticmethod
    def bin_of(x: float) -> int:
        return int(math.log2(x + 1)) if x > 0 else 0

    def add(self, t: float, x: float, y: float) -> None:
        """One sample at time `t` (seconds, any monotonic clock)."""
        self._seen += 1
        if self._seen <= self.warmup:
            return
        self._recent.append((t, self.bin_of(x), y))

    def measure(self, now: float) -> Verdict | None:
        """The last `window_s` against the baseline, without judging (`active` is the state
        so far); None when there is not enough window or baseline."""
        cutoff = now - self.window_s
        while self._recent and self._recent[0][0] < cutoff:
            t, b, y = self._recent.popleft()
            if not self.active:  # a fault's samples never become the baseline
                self._baseline.setdefault(b, deque(maxlen=self.per_bin)).append((t, y))
        oldest = now - self.window_s - self.baseline_s
        medians: dict[int, float] = {}
        for b, samples in self._baseline.items():
            while samples and samples[0][0] < oldest and not self.active:
                samples.popleft()
            if len(samples) >= self.min_baseline:
                medians[b] = _median([y for _, y in samples])
        ratios, excess = [], []
        for _, b, y in self._recent:
            base = medians.get(b)
            if base is None:
                continue
            ratios.append(y / base if base > 0 else math.inf)
            excess.append(y - base)
        if len(ratios) < self.min_samples:
            return None
        return Verdict(self.active, _median(ratios), _median(excess), len(ratios))

    def judge(self, measured: Verdict, reference: float = 1.0) -> Verdict:
        """Turn on or off from a measurement. `reference`: how much every peer's signal rose
        at the same time (the median of the other keys' ratios, at least 1): a machine-wide
        slowdown raises all of them and is divided out, a fault of one key raises only its."""
        ratio = measured.ratio / max(reference, 1.0)
        over = measured.excess
        if not self.active and ratio >= self.ratio_on and over >= self.min_excess:
            self.active = True
        elif self.active and (ratio < self.ratio_off or over < self.min_excess / 2):
            self.active = False
        return Verdict(self.active, ratio, over, measured.samples)

    def evaluate(self, now: float, reference: float = 1.0) -> Verdict | None:
        """`measure` then `judge`: None when there is not enough to judge."""
        measured = self.measure(now)
        return None if measured is None else self.judge(measured, reference)


def spread(values: list[float], high: float = 99, low: float = 50) -> float:
    """p`high` / p`low` of `values` (nearest rank); 1.0 for fewer than two values or a zero
    low percentile."""
    if len(values) < 2:
        return 1.0
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    lo = rank(low)
    return rank(high) / lo if lo > 0 else 1.0


__all__ = ["BaselineWatch", "Condition", "Verdict", "spread"]
