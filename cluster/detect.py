"""The cluster's own failure detectors, fed by the dispatcher (`DispatchObserver`): every shard
reply tells them the node, the rows and bytes it carried, the round trip measured here and the
time the shard says it was busy.

- **link degraded** (`link_degraded`): per node, the time a reply spent on the wire and in the
  transport (round trip minus busy time) against that node's own baseline for calls of the
  same size (bytes, binned by powers of two). A link that got slower or lossier adds time
  there and nowhere else.
- **node slow** (`node_slow`): per node, the shard's busy time against its own baseline for
  calls of the same row count. The baseline is the node's measured speed in this run, so a
  slow node of a heterogeneous topology is not "slow"; one that got slower than itself is.

    detectors = DispatchDetectors(events.bind("cluster.dispatch"))
    dispatcher.observers.append(detectors)

Each emits `detected` when its watch turns on and `recovered` when the signal is back under
its baseline (`observability/detectors.py`), with the measured ratio in the attributes. The
thresholds sit well above what a loaded 2-core machine shows without a fault (the chaos suite
counts false positives over fault-free runs); `DetectorConfig` sets them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from expertmesh.observability.detectors import BaselineWatch, Condition
from expertmesh.observability.events import LINK_DEGRADED, NODE_SLOW, EventSink

SOURCE = "cluster.dispatch"


@dataclass(frozen=True)
class DetectorConfig:
    link_ratio: float = 3.5
    """Wire time at least this many times its baseline..."""
    link_min_excess_s: float = 0.0035
    """...and at least this much more (seconds), over the window, to call the link degraded."""
    slow_ratio: float = 2.5
    """Busy time at least this many times the node's baseline..."""
    slow_min_excess_s: float = 0.0005
    """...and at least this much more, to call the node slow."""
    window_s: float = 1.0
    baseline_s: float = 30.0
    evaluate_every_s: float = 0.1
    warmup: int = 5
    """Replies per node ignored at the start (first calls: cold caches, channels opening)."""
    min_samples: int = 10
    """Replies in the window before it is judged (fewer: a few stalls decide the median)."""
    min_baseline: int = 10
    """Baseline replies a size bin needs before calls of that size are judged."""


class DispatchDetectors:
    """Link and node-slowness detectors for every node the dispatcher talks to. Called on the
    attention worker's thread; each reply costs a few appends, the judging runs at most every
    `evaluate_every_s`."""

    def __init__(
        self,
        events: EventSink | None,
        config: DetectorConfig | None = None,
    ) -> None:
        self.events = events
        self.config = config or DetectorConfig()
        self._link: dict[str, tuple[BaselineWatch, Condition]] = {}
        self._slow: dict[str, tuple[BaselineWatch, Condition]] = {}
        self._next_evaluation = 0.0
        self.last: dict[tuple[str, str], float] = {}
        """(signal, node) -> the last ratio judged (for tests and /health)."""

    def _watches(self, node: str) -> tuple[tuple[BaselineWatch, Condition], ...]:
        c = self.config
        if node not in self._link:
            self._link[node] = (
                BaselineWatch(
                    ratio_on=c.link_ratio,
                    min_excess=c.link_min_excess_s,
                    window_s=c.window_s,
                    baseline_s=c.baseline_s,
                    warmup=c.warmup,
                    min_baseline=c.min_baseline,
                    min_samples=c.min_samples,
                ),
                Condition(self.events, LINK_DEGRADED, node, SOURCE),
            )
            self._slow[node] = (
                BaselineWatch(
                    ratio_on=c.slow_ratio,
                    min_excess=c.slow_min_excess_s,
                    window_s=c.window_s,
                    baseline_s=c.baseline_s,
                    warmup=c.warmup,
                    min_baseline=c.min_baseline,
                    min_samples=c.min_samples,
                ),
                Condition(self.events, NODE_SLOW, node, SOURCE),
            )
        return self._link[node], self._slow[node]

    @property
    def detections(self) -> int:
        """Times any detector turned on."""
        return sum(c.detections for _, c in [*self._link.values(), *self._slow.values()])

    # ----------------------------------------------------------------- DispatchObserver

    def on_reply(
        self, node: str, layer: int, rows: int, nbytes: int, round_trip_s: float, busy_s: float
    ) -> None:
        now = time.monotonic()
        (link, _), (slow, _) = self._watches(node)
        link.add(now, nbytes, max(0.0, round_trip_s - busy_s))
        slow.add(now, rows, busy_s)
        if now >= self._next_evaluation:
            self._next_evaluation = now + self.config.evaluate_every_s
            self.evaluate(now)

    def on_step(self, layer: int, counts: np.ndarray) -> None:
        pass

    def evaluate(self, now: float) -> None:
        """Judge every node; each against its own baseline, divided by how much the other
        nodes' signal and its own other signal rose at the same time (what all signals see at
        once is the machine or the attention worker, not one node's link or compute). A node's replies are read
        when the attention worker gets to them: while a node computes slowly, every reply of
        the step (and of the micro-batch after it) is read late, so no link is judged
        degraded then (the slow node explains it)."""
        busy = {node: w.measure(now) for node, (w, _) in self._slow.items()}
        wire = {node: w.measure(now) for node, (w, _) in self._link.items()}
        slow_now = {
            n for n, m in busy.items() if m is not None and m.ratio >= self.config.slow_ratio
        }
        thresholds = {"busy": self.config.slow_ratio, "wire": self.config.link_ratio}
        for signal, watches, measured, unit in (
            ("busy", self._slow, busy, "busy time"),
            ("wire", self._link, wire, "wire time"),
        ):
            for node, (watch, condition) in watches.items():
                m = measured[node]
                if m is None:
                    continue
                others = [n for n in measured if n != node]
                peers = [v.ratio for n, v in measured.items() if n != node and v is not None]
                if others and not peers:
                    continue  # peers exist but none can be judged yet: no reference
                if signal == "wire" and slow_now and not watch.active:
                    continue
                # One node's link or compute fails at a time; several nodes' crossing at once
                # (of three or more) is the attention worker reading late, or the machine.
                rising = [
                    n
                    for n, v in measured.items()
                    if v is not None and v.ratio >= thresholds[signal]
                ]
                if len(measured) >= 3 and len(rising) > 1 and not watch.active:
                    continue
                # What the machine did meanwhile: the other nodes' same signal, and this
                # node's other signal (contention stretches compute and transport alike; a
                # slow link stretches only the wire, a slow node only its compute).
                own_other = (wire if signal == "busy" else busy).get(node)
                if own_other is not None:
                    peers.append(own_other.ratio)
                reference = float(np.median(peers)) if peers else 1.0
                verdict = watch.judge(m, reference)
                self.last[(signal, node)] = verdict.ratio
                detail = (
                    f"{unit} {m.ratio:.1f}x its baseline, {verdict.ratio:.1f}x the other "
                    f"nodes' change (+{verdict.excess * 1e3:.1f} ms, {verdict.samples} replies)"
                )
                condition.update(
                    verdict.active,
                    detail,
                    {
                        "signal": signal,
                        "ratio": round(m.ratio, 3),
                        "ratio_vs_peers": round(verdict.ratio, 3),
                        "excess_s": round(verdict.excess, 6),
                    },
                )


__all__ = ["SOURCE", "DetectorConfig", "DispatchDetectors"]
