"""The head watch every API replica starts (`serving/app.py` `start_head_watch`) on a real Ray
cluster: silent while the GCS answers, `detected head_failure` (cluster.head) within its
deadline when the GCS process is stopped, `recovered` when it continues, and counted in
`expertmesh_fault_*` on the replica's Prometheus registry."""

from __future__ import annotations

import os
import signal
import time

import pytest

from expertmesh.chaos.control_faults import gcs_pid
from expertmesh.observability import TelemetryConfig, configure_telemetry
from expertmesh.observability.events import HEAD_FAILURE, read_events
from expertmesh.serving.app import replica_events, start_head_watch
from expertmesh.serving.config import parse_serving_config

pytestmark = [pytest.mark.e2e]


def active(registry) -> float | None:
    from prometheus_client import generate_latest

    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("expertmesh_fault_active{") and HEAD_FAILURE in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_replicas_head_watch_sees_the_gcs_stop_and_continue(tmp_path):
    import ray

    assert start_head_watch(None) is None  # not on a Ray cluster: nothing to watch
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    config = parse_serving_config({"log_dir": str(tmp_path)})
    watch = start_head_watch(replica_events(config, telemetry))
    pid = gcs_pid()
    try:
        time.sleep(2.0)  # fault-free: as long as the stop below
        assert read_events(tmp_path / "events.jsonl") == [] and watch.probes > 4
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time_ns()
        try:
            time.sleep(2.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while len(read_events(tmp_path / "events.jsonl")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        events = read_events(tmp_path / "events.jsonl")
        assert [(e.kind, e.failure_mode, e.source) for e in events] == [
            ("detected", HEAD_FAILURE, "cluster.head"),
            ("recovered", HEAD_FAILURE, "cluster.head"),
        ]
        took = (events[0].time_unix_nano - stopped) / 1e9
        print(f"head watch: detected {took:.2f} s after the GCS stopped")
        assert took < watch.timeout_s + watch.probe_every_s + 0.5
        assert active(telemetry.prometheus_registry) == 0
    finally:
        watch.stop()
        telemetry.shutdown()
        ray.shutdown()
