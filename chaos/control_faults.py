"""Faults of the platform's control parts, for the embedded platform of `chaos/runner.py`:

- `stall_engine` (engine_stalled): the attention worker's receive of expert replies hangs
  for `duration_s` (a hung collective, a stuck device: the shards answered, their replies sit
  in the socket buffers unread), so the engine loop holds work and makes no progress. The
  platform detects it from the scheduler's progress heartbeat (the supervisor's engine round,
  `stall_after_s` of the chaos platform's scheduler).
- `spend_budget` (budget_exhausted): another writer of the budget ledger (a second gateway, a
  runaway batch job of the same tenant) spends the target tenant's budget for `duration_s`:
  `factor` million US dollars added to its day's spend, taken back after. The ledger's own
  detector (`routing/budget_watch.py`) reports the refusals it makes.
- `hang_head` (head_failure): the Ray head's GCS process is stopped (SIGSTOP) for
  `duration_s`, then continued: the GCS hung (swapping, a stop-the-world pause, a partition
  that drops its packets); the head watch (`cluster/head_watch.py`) probes it.

Why not kill the GCS: the embedded cluster runs the GCS without external storage (no Redis),
so a killed GCS cannot come back with the cluster's state: the raylets exit after
`gcs_rpc_server_reconnect_timeout_s` and nothing could be restored or recovered in the run. A
killed GCS refuses the probe's connection at once, so its detection is no slower than a hung
one's (the probe's timeout bounds both).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from expertmesh.observability.events import BUDGET_EXHAUSTED, ENGINE_STALLED, HEAD_FAILURE

CONTROL_FAULT_MODES = {
    "stall_engine": ENGINE_STALLED,
    "spend_budget": BUDGET_EXHAUSTED,
    "hang_head": HEAD_FAILURE,
}
CONTROL_FAULTS = tuple(CONTROL_FAULT_MODES)


class HungReplies:
    """A transport whose `replies` block until `release` is set (then answer as `inner`)."""

    def __init__(self, inner: Any, release: threading.Event) -> None:
        self.inner = inner
        self.release = release
        self.name = f"hung-{inner.name}"

    def send(self, requests: Mapping[str, Any], trace: dict[str, str] | None = None) -> Any:
        return self.inner.send(requests, trace)

    def replies(self, sent: Any) -> Iterator[Any]:
        self.release.wait()
        yield from self.inner.replies(sent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def gcs_pid() -> int:
    """The process id of this Ray cluster's GCS: the gcs_server listening on its port (its
    command line may say port 0, the port then being picked at start)."""
    import psutil
    import ray

    port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    for proc in psutil.process_iter(["name"]):
        if "gcs_server" not in (proc.info.get("name") or ""):
            continue
        try:
            listening = proc.net_connections(kind="tcp")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in listening):
            return int(proc.pid)
    raise RuntimeError(f"no gcs_server process listens on this cluster's GCS port {port}")


def inject(platform: Any, fault: Any) -> str:
    """Run one control fault (blocks for its duration); returns the `restored` detail."""
    if fault.kind == "stall_engine":
        dispatcher = platform.ep.dispatcher
        release = threading.Event()
        original = dispatcher.transport
        dispatcher.transport = HungReplies(original, release)
        try:
            time.sleep(fault.duration_s)
        finally:
            dispatcher.transport = original
            release.set()
        return "replies read again"
    if fault.kind == "spend_budget":
        from expertmesh.routing.budget import period_keys

        tenant = fault.target or "dev"
        amount = int(fault.factor * 1e12)  # factor million USD, in micro-USD
        day, _ = period_keys(time.time())
        _add_spend(platform.ledger, tenant, day, amount)
        try:
            time.sleep(fault.duration_s)
        finally:
            _add_spend(platform.ledger, tenant, day, -amount)
        return f"tenant {tenant}'s foreign spend taken back"
    if fault.kind == "hang_head":
        pid = gcs_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(fault.duration_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"GCS (pid {pid}) continued"
    raise ValueError(f"not a control fault: {fault.kind}")


def _add_spend(ledger: Any, tenant: str, day: str, amount: int) -> None:
    conn = sqlite3.connect(ledger, timeout=10)
    try:
        with conn:
            conn.execute(
                "INSERT INTO periods (tenant, period, spent) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, period) DO UPDATE SET spent = spent + excluded.spent",
                (tenant, day, amount),
            )
    finally:
        conn.close()
