"""What tokens-per-second hides, as OpenTelemetry metrics of one engine (exported for
Prometheus on /metrics when telemetry.metrics_exporter is "prometheus"):

| metric | kind | attributes | meaning |
|---|---|---|---|
| `expertmesh.expert.tokens` | counter | layer, expert | token-to-expert assignments |
| `expertmesh.router.imbalance` | gauge | layer | max / mean tokens per expert since the last collection |
| `expertmesh.router.entropy` | gauge | layer | entropy of the expert load, normalised to [0, 1] (1 = uniform) |
| `expertmesh.router.flip_rate` | gauge | layer | share of decode tokens whose top-1 expert differs from the same request's previous step |
| `expertmesh.router.churn` | gauge | layer | share of the layer's k hottest experts (k = experts per token) in this collection window that were not among the k hottest of the previous window |
| `expertmesh.tpot.spread` | gauge | | p99 / p50 time per output token of the requests finished in the last `TPOT_WINDOW_S` |
| `expertmesh.kv_cache.bytes_in_use` | gauge | | KV bytes holding live tokens |
| `expertmesh.kv_cache.compression_ratio` | gauge | mode | bytes per token of a full-precision cache / of the mode in use |
| `expertmesh.engine.steps` | counter | kind | scheduler steps that ran prefill or decode |
| `expertmesh.link.bytes` | counter | node | bytes sent to and from each expert node (expert-parallel) |
| `expertmesh.actor.restarts` | counter | node | expert shards restarted and reloaded |
| `expertmesh.nodes.out_of_service` | gauge | | topology nodes the supervisor moved experts away from (lost or drained, not rejoined) |

Gauges are computed when the reader collects (a Prometheus scrape), over the window since
the previous collection.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from expertmesh.models.kv_cache import kv_bytes_per_token
from expertmesh.models.router_stats import RouterStats
from expertmesh.observability.detectors import spread

TPOT_WINDOW_S = 60.0
"""Requests finished this long ago or less make the TPOT spread."""


class EngineMetrics:
    """Observes each scheduler step (router choices, KV use) and exposes the metrics above."""

    def __init__(
        self,
        meter: Any,
        batcher: Any,
        dispatcher: Any = None,
        out_of_service: Callable[[], int] | None = None,
    ) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        self.batcher = batcher
        self.dispatcher = dispatcher
        config = batcher.model.config
        self.stats = RouterStats(config, keep_last=True)
        self.top_k = config.moe.top_k
        self._lock = threading.Lock()
        self._window = torch.zeros_like(self.stats.tokens)
        self._flips = dict.fromkeys(config.moe_layer_ids, 0)
        self._flip_total = dict.fromkeys(config.moe_layer_ids, 0)
        self._prev_hot: dict[int, frozenset[int]] = {}
        """layer -> its k hottest experts in the previous collection window."""
        self._prev_top1: dict[str, dict[int, int]] = {}
        self._decode_times: dict[str, tuple[float, float, int]] = {}
        """request id -> (first decode step, last decode step, decode steps) monotonic."""
        self.tpot: deque[tuple[float, float]] = deque(maxlen=1024)
        """(finished at, time per output token) of recent requests."""
        self._link_seen: dict[str, int] = {}
        self._restarts_seen = 0
        self._expert_total = torch.zeros_like(self.stats.tokens)
        """Token-to-expert assignments since start (layer, expert), reported when the reader
        collects: one tensor add per step instead of a counter update per (layer, expert)
        (hundreds of OpenTelemetry calls per step, ~6% of the engine thread at batch 32)."""

        def expert_tokens(_: CallbackOptions) -> Any:
            with self._lock:
                total = self._expert_total.clone()
            return [
                Observation(int(total[layer, expert]), {"layer": layer, "expert": expert})
                for layer, expert in torch.nonzero(total).tolist()
            ]

        meter.create_observable_counter(
            "expertmesh.expert.tokens",
            callbacks=[expert_tokens],
            unit="{token}",
            description="Token-to-expert assignments",
        )
        self.steps = meter.create_counter("expertmesh.engine.steps", unit="{step}")
        self.link_bytes = meter.create_counter("expertmesh.link.bytes", unit="By")
        self.restarts = meter.create_counter("expertmesh.actor.restarts", unit="{restart}")
        full = kv_bytes_per_token(config, "full", 4)
        used = kv_bytes_per_token(config, batcher.cache.mode, 4)
        self.compression = full / max(used, 1)

        def router(_: CallbackOptions) -> Any:
            imbalance, entropy, flips, churn = self._collect()
            out = []
            for layer in config.moe_layer_ids:
                out.append(("imbalance", Observation(imbalance[layer], {"layer": layer})))
                out.append(("entropy", Observation(entropy[layer], {"layer": layer})))
                out.append(("flip", Observation(flips[layer], {"layer": layer})))
                out.append(("churn", Observation(churn[layer], {"layer": layer})))
            return out

        cache: dict[str, Any] = {}

        def pick(kind: str) -> Any:
            def callback(options: CallbackOptions) -> Any:
                if kind == "imbalance" or "rows" not in cache:
                    cache["rows"] = router(options)
                return [obs for k, obs in cache["rows"] if k == kind]

            return callback

        meter.create_observable_gauge("expertmesh.router.imbalance", callbacks=[pick("imbalance")])
        meter.create_observable_gauge("expertmesh.router.entropy", callbacks=[pick("entropy")])
        meter.create_observable_gauge("expertmesh.router.flip_rate", callbacks=[pick("flip")])
        meter.create_observable_gauge(
            "expertmesh.router.churn",
            description="Share of a layer's k hottest experts that were not hot the window before",
            callbacks=[pick("churn")],
        )
        meter.create_observable_gauge(
            "expertmesh.tpot.spread",
            description="p99 / p50 time per output token of recently finished requests",
            callbacks=[lambda _: [Observation(self.tpot_spread())]],
        )
        meter.create_observable_gauge(
            "expertmesh.kv_cache.bytes_in_use",
            unit="By",
            callbacks=[lambda _: [Observation(batcher.kv_bytes_in_use())]],
        )
        meter.create_observable_gauge(
            "expertmesh.kv_cache.compression_ratio",
            callbacks=[lambda _: [Observation(self.compression, {"mode": batcher.cache.mode})]],
        )
        meter.create_observable_gauge(
            "expertmesh.nodes.out_of_service",
            unit="{node}",
            description="Topology nodes whose experts were moved away (lost or drained)",
            callbacks=[lambda _: [Observation(out_of_service() if out_of_service else 0)]],
        )

    # ----------------------------------------------------------------- engine thread

    def after_step(self, decode_request_ids: list[str], prefill: bool, decode: bool) -> None:
        """Called by the scheduler after each step with the ids of the decode batch, in row
        order (router_stats.last holds that batch's choices)."""
        if prefill:
            self.steps.add(1, {"kind": "prefill"})
        if decode:
            self.steps.add(1, {"kind": "decode"})
        tokens = self.stats.tokens
        with self._lock:
            self._expert_total += tokens
            self._window += tokens
            if decode:
                now = time.monotonic()
                for rid in decode_request_ids:
                    first, _, n = self._decode_times.get(rid, (now, now, 0))
                    self._decode_times[rid] = (first, now, n + 1)
                for layer, (ids, _) in self.stats.last.items():
                    if ids.shape[0] != len(decode_request_ids):
                        continue
                    top1 = ids[:, 0].tolist()
                    for rid, e in zip(decode_request_ids, top1):
                        prev = self._prev_top1.setdefault(rid, {})
                        if layer in prev:
                            self._flip_total[layer] += 1
                            self._flips[layer] += int(prev[layer] != e)
                        prev[layer] = e
        self.stats.reset()
        self._link_and_restarts()

    def forget(self, request_id: str) -> None:
        """The request ended: its time per output token joins the spread's window."""
        self._prev_top1.pop(request_id, None)
        times = self._decode_times.pop(request_id, None)
        if times is not None and times[2] >= 2:
            first, last, n = times
            self.tpot.append((last, (last - first) / (n - 1)))

    def tpot_spread(self, now: float | None = None) -> float:
        """p99 / p50 time per output token over the requests finished in the last
        `TPOT_WINDOW_S` (1.0 with fewer than two)."""
        cutoff = (time.monotonic() if now is None else now) - TPOT_WINDOW_S
        return spread([t for at, t in list(self.tpot) if at >= cutoff])

    def _link_and_restarts(self) -> None:
        d = self.dispatcher
        if d is None:
            return
        for node, sent in d.stats.bytes_by_node.items():
            delta = sent - self._link_seen.get(node, 0)
            if delta:
                self.link_bytes.add(delta, {"node": node})
                self._link_seen[node] = sent
        if d.stats.recoveries > self._restarts_seen:
            self.restarts.add(d.stats.recoveries - self._restarts_seen)
            self._restarts_seen = d.stats.recoveries

    # ----------------------------------------------------------------- collection

    def _collect(
        self,
    ) -> tuple[dict[int, float], dict[int, float], dict[int, float], dict[int, float]]:
        with self._lock:
            window = self._window.clone()
            self._window.zero_()
            flips = {
                k: (self._flips[k] / self._flip_total[k]) if self._flip_total[k] else 0.0
                for k in self._flips
            }
            self._flips = dict.fromkeys(self._flips, 0)
            self._flip_total = dict.fromkeys(self._flip_total, 0)
        imbalance, entropy, churn = {}, {}, {}
        E = window.shape[1]
        k = min(self.top_k, E)
        for layer in flips:
            t = window[layer].double()
            total = float(t.sum())
            churn[layer] = 0.0
            if total <= 0:
                imbalance[layer], entropy[layer] = 1.0, 1.0
                continue
            hot = frozenset(torch.topk(t, k).indices.tolist())
            prev = self._prev_hot.get(layer)
            churn[layer] = len(hot - prev) / k if prev is not None else 0.0
            self._prev_hot[layer] = hot
            imbalance[layer] = float(t.max() / t.mean())
            p = t / total
            h = -float((p[p > 0] * p[p > 0].log()).sum())
            entropy[layer] = h / math.log(E) if E > 1 else 1.0
        return imbalance, entropy, flips, churn
