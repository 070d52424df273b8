"""The supervisor on a real embedded Ray cluster under load: killed shards come back, a lost
node's experts are re-placed, a drained node leaves without a request waiting; no request is
lost and greedy outputs equal a fault-free run; every step is a fault event."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.supervisor import Supervisor, SupervisorConfig
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability.events import EventLog, read_events

pytestmark = pytest.mark.e2e
TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "mixed.yaml"
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


class Load:
    """Requests in a loop on another thread; counts them and keeps any wrong output."""

    def __init__(self, gen: Generator, expected: list[str | None]) -> None:
        self.gen, self.expected = gen, expected
        self.done = 0
        self.wrong: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = [c.text for c in self.gen.generate(["ROMEO:"], PARAMS)]
            except Exception as e:  # a lost request
                self.wrong.append(e)
                continue
            if out != self.expected:
                self.wrong.append(out)
            self.done += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def expected() -> list[str | None]:
    gen = Generator(load_model(DEMO_MODEL_DIR), Tokenizer.from_dir(DEMO_MODEL_DIR))
    return [c.text for c in gen.generate(["ROMEO:"], PARAMS)]


@pytest.fixture
def supervised(tmp_path):
    topology = load_topology(TOPOLOGY)
    ep = ExpertParallelModel.launch(DEMO_MODEL_DIR, topology)
    events = EventLog(tmp_path / "events.jsonl")
    sup = Supervisor(ep, topology, SupervisorConfig(), events=events).start()
    yield ep, sup, tmp_path / "events.jsonl"
    sup.stop()
    events.close()
    ep.shutdown()


def wait_for(predicate, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError
        time.sleep(0.01)
    return time.monotonic() - t0


def test_killed_shards_serve_again_within_seconds_without_losing_requests(supervised, expected):
    ep, sup, events_path = supervised
    gen = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR))
    with Load(gen, expected) as load:
        times = []
        for node in ("gpu-0", "cpu-fast", "gpu-0"):
            before = len(sup.stats.recovery_s)
            t0 = time.monotonic()
            ep.pool.kill(node)
            wait_for(lambda before=before: len(sup.stats.recovery_s) > before, 20)
            times.append(time.monotonic() - t0)
        done_before = load.done
        wait_for(lambda: load.done > done_before, 20)  # requests flow after the last kill
    assert load.wrong == []
    assert max(times) < 5.0  # the 2 s p95 target is measured by benchmarks/bench_recovery.py
    kinds = [(e.kind, e.failure_mode) for e in read_events(events_path)]
    assert ("detected", "expert_shard_lost") in kinds
    assert ("recovered", "expert_shard_lost") in kinds


def test_lost_node_is_re_placed_and_rejoins_when_it_comes_back(supervised, expected):
    ep, sup, events_path = supervised
    assert ep.placement.experts_on("cpu-fast")  # a node that serves (the plan may leave one empty)
    gen = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR))
    with Load(gen, expected) as load:
        t0 = time.monotonic()
        ep.cluster.remove_node("cpu-fast")
        took = wait_for(lambda: sup.stats.nodes_replaced == 1, 30)
        done_before = load.done
        wait_for(lambda: load.done > done_before + 1, 30)
        assert "cpu-fast" not in ep.dispatcher.table.nodes
        assert ep.placement.experts_on("cpu-fast") == []
        ep.cluster.add_node("cpu-fast")  # what KubeRay does when it recreates the pod
        wait_for(lambda: sup.stats.rejoins == 1, 90)
        done_before = load.done
        wait_for(lambda: load.done > done_before + 1, 30)
    assert took < 4.0  # Ray's node table says it is dead (0.5 s x 4 health checks), not 5 s
    assert load.wrong == []
    assert "cpu-fast" not in sup.removed and "cpu-fast" not in sup.lost
    assert ray.get(ep.pool.handles["cpu-fast"].ping.remote(), timeout=10) == "cpu-fast"
    events = read_events(events_path)
    assert ("recovered", "node_lost") in {(e.kind, e.failure_mode) for e in events}
    assert any(e.kind == "action" and e.detail.startswith("rejoined") for e in events)
    assert time.monotonic() - t0 < 120


def test_drained_node_leaves_in_under_two_seconds(supervised, expected):
    ep, sup, _ = supervised
    gen = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR))
    with Load(gen, expected) as load:
        took = sup.drain("cpu-fast")
        done_before = load.done
        wait_for(lambda: load.done > done_before + 1, 30)
    assert took < 2.0
    assert load.wrong == []
    assert "cpu-fast" not in ep.dispatcher.table.nodes


def expertmesh_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "expertmesh.cli", *argv], capture_output=True, text=True, timeout=120
    )


def test_a_node_ray_drains_is_emptied_first_then_rejoins_as_a_new_pod(supervised, expected):
    ep, sup, events_path = supervised
    gen = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR))
    address = ep.cluster.cluster.address
    with Load(gen, expected) as load:
        # what an operator runs before maintenance, and the worker pods' preStop hook
        drain = expertmesh_cli("cluster", "drain", "cpu-fast", "--address", address)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        assert ep.cluster.ray_nodes["cpu-fast"].node_id in drain.stdout
        took = wait_for(lambda: sup.stats.drains == 1, 20)
        assert ep.placement.experts_on("cpu-fast") == []
        done_before = load.done
        wait_for(lambda: load.done > done_before + 1, 30)
        ep.cluster.remove_node("cpu-fast")  # the pod goes: nobody waits on it
        ep.cluster.add_node("cpu-fast")  # and comes back as a new Ray node
        wait_for(lambda: sup.stats.rejoins == 1, 90)
        done_before = load.done
        wait_for(lambda: load.done > done_before + 1, 30)
    listing = expertmesh_cli("cluster", "nodes", "--address", address)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "cpu-fast" in listing.stdout and "gpu-0" in listing.stdout
    unknown = expertmesh_cli("cluster", "drain", "gpu-9", "--address", address)
    assert unknown.returncode == 2 and "no live Ray node offers 'gpu-9'" in unknown.stderr
    assert took < 6.0  # from the CLI's return: a supervisor round plus the re-placement
    assert load.wrong == []
    assert sup.stats.nodes_replaced == 1  # the drain's re-placement only: no node loss
    events = read_events(events_path)
    drained = [e for e in events if e.failure_mode == "node_drained" and e.kind == "detected"]
    assert drained and drained[0].detail.startswith("Ray is draining its node (deadline in")
    assert not any(e.failure_mode == "node_lost" for e in events)
    assert any(e.kind == "action" and e.detail.startswith("rejoined") for e in events)
