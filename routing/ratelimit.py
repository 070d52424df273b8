"""Per-tenant rate limits: two token buckets per tenant (requests, and prompt + max_tokens),
each holding up to one minute's allowance and refilling continuously.

In memory, per process: with N serving replicas a tenant gets up to N times its limit. That is
the usual trade (a shared store would put a network round trip on every request); budgets,
which are money, are exact across processes (`budget.py`).
"""

from __future__ import annotations

import threading
import time

from expertmesh.policies.policy import RateLimit

from .errors import RateLimited


class _Bucket:
    __slots__ = ("level", "updated")

    def __init__(self, level: float, now: float) -> None:
        self.level = level
        self.updated = now


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def admit(self, tenant: str, limit: RateLimit, tokens: int, now: float | None = None) -> None:
        """Take one request and `tokens` from the tenant's buckets, or raise `RateLimited`
        (taking nothing)."""
        if limit.requests_per_minute is None and limit.tokens_per_minute is None:
            return
        now = time.monotonic() if now is None else now
        wanted = (
            ("requests", limit.requests_per_minute, 1),
            ("tokens", limit.tokens_per_minute, tokens),
        )
        with self._lock:
            buckets = []
            for kind, per_minute, amount in wanted:
                if per_minute is None:
                    continue
                bucket = self._buckets.get((tenant, kind))
                if bucket is None:
                    bucket = self._buckets[(tenant, kind)] = _Bucket(float(per_minute), now)
                rate = per_minute / 60.0
                bucket.level = min(float(per_minute), bucket.level + (now - bucket.updated) * rate)
                bucket.updated = now
                if amount > per_minute:
                    raise RateLimited(
                        tenant,
                        f"this request needs {amount} {kind} and the limit is {per_minute} "
                        f"{kind}_per_minute; lower max_tokens",
                        60.0,
                    )
                if bucket.level < amount:
                    raise RateLimited(
                        tenant, f"{per_minute} {kind}_per_minute", (amount - bucket.level) / rate
                    )
                buckets.append((bucket, amount))
            for bucket, amount in buckets:
                bucket.level -= amount
