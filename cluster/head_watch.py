"""The Ray head's failure detector (`head_failure`): a probe of the GCS on its own thread.

The GCS (Ray's global control service, on the head node) schedules actors, restarts them and
keeps the node table; without it nothing can be recovered, though the expert shards keep
serving (their channels do not go through Ray, `cluster/transport_channel.py`). Its callers
see it die or hang only when a call of theirs times out, which for Ray's own clients is
`gcs_server_request_timeout_seconds` (60 s), so the supervisor's node-table read cannot be the
detector: it would hang its thread for that long. This watch asks the GCS for one key with a
short timeout every `probe_every_s`:

- **detected** when a probe goes unanswered for `timeout_s` (the GCS hung, crashed, or the
  head unreachable);
- **recovered** at the first probe answered again.

    watch = HeadWatch(events.bind("cluster.head"), ray.get_runtime_context().gcs_address)
    watch.start()   # ...  watch.stop()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from expertmesh.observability.detectors import Condition
from expertmesh.observability.events import HEAD_FAILURE, EventSink

SOURCE = "cluster.head"
PROBE_KEY = b"expertmesh-head-probe"


def gcs_probe(address: str) -> Callable[[float], None]:
    """A probe of the GCS at `address` ("host:port"): raises when it is not answered within
    the timeout it is given."""
    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    client = GcsClient(address=address)

    def probe(timeout_s: float) -> None:
        client.internal_kv_get(PROBE_KEY, namespace=b"expertmesh", timeout=timeout_s)

    return probe


class HeadWatch:
    def __init__(
        self,
        events: EventSink | None,
        gcs_address: str | None = None,
        probe: Callable[[float], None] | None = None,
        probe_every_s: float = 0.25,
        timeout_s: float = 1.0,
    ) -> None:
        if probe is None:
            if gcs_address is None:
                raise ValueError("HeadWatch: give gcs_address (host:port) or a probe")
            probe = gcs_probe(gcs_address)
        self.probe = probe
        self.probe_every_s = probe_every_s
        self.timeout_s = timeout_s
        self.condition = Condition(events, HEAD_FAILURE, "ray-head", SOURCE)
        self.probes = 0
        self.failures = 0
        self.last_latency_s: float | None = None
        """The last answered probe's round trip (None until one is answered)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def detections(self) -> int:
        return self.condition.detections

    def check(self) -> bool:
        """One probe; True when the GCS answered in time."""
        t0 = time.monotonic()
        self.probes += 1
        try:
            self.probe(self.timeout_s)
        except Exception as e:  # a timeout, a refused connection, a closed channel
            self.failures += 1
            waited = time.monotonic() - t0
            self.condition.update(
                True,
                f"GCS did not answer a probe within {self.timeout_s:g} s "
                f"(after {waited:.2f} s: {type(e).__name__})",
                {"timeout_s": self.timeout_s},
            )
            return False
        self.last_latency_s = time.monotonic() - t0
        self.condition.update(False, f"GCS answers again ({self.last_latency_s * 1e3:.1f} ms)")
        return True

    def start(self) -> HeadWatch:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="expertmesh-head", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.check()
            self._stop.wait(max(0.0, self.probe_every_s - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 2)
            self._thread = None


__all__ = ["SOURCE", "HeadWatch", "gcs_probe"]
