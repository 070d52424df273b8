"""One expert pool behind several attention replicas, on a real embedded Ray cluster: the
replicas (each its own Ray actor) add no expert bytes, a replica's death leaves the shards
alone, a killed shard is one fault for the controller and no replica's output changes, and a
rebalance or a drain reaches every replica between two of its steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from expertmesh.cluster.dispatch import RoutingTable
from expertmesh.cluster.expert_pool import (
    CONTROLLER_NAME,
    PoolSpec,
    controller_actor,
    pool_down,
    pool_namespace,
    running_pools,
)
from expertmesh.cluster.local import LocalCluster
from expertmesh.cluster.supervisor import SupervisorConfig
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.observability.events import NODE_SLOW

pytestmark = pytest.mark.e2e
TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "mixed.yaml"
POOL = "test-pool"
MAX_TOKENS = 8


def replica_class() -> Any:
    """An attention replica as its own Ray actor (defined here so Ray ships it by value)."""

    class AttentionReplica:
        def __init__(self, pool: str, checkpoint: str) -> None:
            from expertmesh.cluster.pool_attachment import attach_pool

            self.checkpoint = checkpoint
            self.ep = attach_pool(pool, checkpoint)

        def generate(self, prompt: str, max_tokens: int) -> str | None:
            from expertmesh.models.generate import Generator, SamplingParams
            from expertmesh.models.tokenizer import Tokenizer

            gen = Generator(self.ep.model, Tokenizer.from_dir(self.checkpoint))
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            return gen.generate([prompt], params)[0].text

        def serve(self, requests: int) -> list[str | None]:
            return [self.generate("ROMEO:", MAX_TOKENS) for _ in range(requests)]

        def serve_until(self, stop: Any, limit_s: float = 240.0) -> list[str | None]:
            """Requests one after another until `stop` (a Flag actor) is set: a load that
            lasts as long as the test needs, however fast the engine got."""
            t0, out = time.monotonic(), []
            while not ray.get(stop.is_set.remote()) and time.monotonic() - t0 < limit_s:
                out.append(self.generate("ROMEO:", MAX_TOKENS))
            return out

        def stats(self) -> dict[str, Any]:
            a = self.ep.attachment
            return {"version": a.version, **vars(a.stats)}

        def out_of_service(self) -> list[str]:
            return list(self.ep.attachment.out_of_service)

        def detections(self) -> int:
            return int(self.ep.attachment.detectors.detections)

        def shutdown(self) -> None:
            self.ep.shutdown()

    remote: Any = ray.remote
    return remote(num_cpus=0, max_restarts=0)(AttentionReplica)


@ray.remote(num_cpus=0)
class Flag:
    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


@pytest.fixture(scope="module")
def expected() -> str | None:
    gen = Generator(load_model(DEMO_MODEL_DIR), Tokenizer.from_dir(DEMO_MODEL_DIR))
    return gen.generate(["ROMEO:"], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].text


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The cluster, the pool, one replica (bytes measured), then two more."""
    topology = load_topology(TOPOLOGY)
    cluster = LocalCluster(topology)
    cluster.start()
    spec = PoolSpec(
        str(Path(DEMO_MODEL_DIR).resolve()),
        topology,
        emulate=True,
        # heartbeats patient enough for a shared 2-core machine (a late ping is a false alarm)
        supervisor=SupervisorConfig(rebalance_every_s=0, ping_timeout_s=3.0),
        events_path=str(tmp_path_factory.mktemp("pool") / "events.jsonl"),
    )
    controller = controller_actor(POOL, create=spec)
    ray.get(controller.ready.remote(), timeout=300)
    Replica = replica_class()
    replicas = [Replica.remote(POOL, str(DEMO_MODEL_DIR))]
    ray.get(replicas[0].stats.remote(), timeout=300)
    with_one = {
        "bytes": sum(ray.get(controller.expert_bytes.remote()).values()),
        "actors": shard_actors(),
    }
    replicas += [Replica.remote(POOL, str(DEMO_MODEL_DIR)) for _ in range(2)]
    ray.get([r.stats.remote() for r in replicas], timeout=300)
    try:
        yield controller, replicas, with_one, Replica
        assert pool_down(POOL) >= 6  # three nodes, a shard and a standby each
        assert POOL not in running_pools()
    finally:
        cluster.stop()  # a failed test must not leave the next module a running cluster


def shard_actors() -> list[str]:
    return sorted(
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == pool_namespace(POOL) and e["name"] != CONTROLLER_NAME
    )


def events(controller: Any, mode: str, kind: str) -> list[Any]:
    return [
        e for e in ray.get(controller.events.remote()) if e.failure_mode == mode and e.kind == kind
    ]


def routed_bytes(controller: Any) -> dict[str, int]:
    """node -> bytes of the experts the pool's current table routes to it (float32)."""
    from expertmesh.models.checkpoint import read_config

    snapshot = ray.get(controller.attach.remote("test-reader"))
    ray.get(controller.detach.remote("test-reader"))
    config = read_config(DEMO_MODEL_DIR)
    per_expert = 3 * config.hidden_size * config.moe.expert_intermediate * 4
    held = RoutingTable(snapshot.routes).node_experts()  # what a resumed shard `ensure`s
    return {
        n: sum(len(ids) for ids in held.get(n, {}).values()) * per_expert for n in snapshot.shards
    }


def wait_for(predicate, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError
        time.sleep(0.05)


def test_three_replicas_hold_the_expert_bytes_of_one(pool, expected):
    controller, replicas, with_one, _ = pool
    assert with_one["bytes"] > 0
    assert sum(ray.get(controller.expert_bytes.remote()).values()) == with_one["bytes"]
    assert shard_actors() == with_one["actors"]  # replicas attached, none started a shard
    assert ray.get([r.generate.remote("ROMEO:", MAX_TOKENS) for r in replicas]) == [expected] * 3
    assert len(ray.get(controller.status.remote())["replicas"]) == 3


def test_killing_a_replica_mid_stream_leaves_the_shards_untouched(pool, expected):
    controller, replicas, with_one, Replica = pool
    before = ray.get(controller.status.remote())
    shards = ray.get(controller.shards_now.remote())
    streaming = replicas[2].generate.remote("ROMEO:", 400)
    time.sleep(1.0)  # mid-stream: its layer calls are going to the shards
    ray.kill(replicas[2], no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(streaming, timeout=60)
    assert (
        ray.get([r.generate.remote("ROMEO:", MAX_TOKENS) for r in replicas[:2]]) == [expected] * 2
    )
    after = ray.get(controller.status.remote())
    assert ray.get(controller.shards_now.remote()) == shards  # the same actors serve
    assert after["generations"] == before["generations"]
    assert sum(ray.get(controller.expert_bytes.remote()).values()) == with_one["bytes"]
    assert ray.get(controller.events.remote()) == []  # nothing the controller had to act on
    replicas[2] = Replica.remote(POOL, str(DEMO_MODEL_DIR))  # Serve would start a new one
    assert ray.get(replicas[2].generate.remote("ROMEO:", MAX_TOKENS), timeout=300) == expected
    assert shard_actors() == with_one["actors"]


def test_a_killed_shard_is_one_controller_event_and_no_output_changes(pool, expected):
    controller, replicas, _, _ = pool
    placement_nodes = ray.get(controller.status.remote())["nodes"]
    node = next(n for n in ("cpu-fast", "gpu-0") if n in placement_nodes)
    generation = ray.get(controller.status.remote())["generations"][node]
    loads = [r.serve.remote(6) for r in replicas]
    time.sleep(1.0)
    ray.kill(ray.get(controller.shards_now.remote())[node], no_restart=True)
    outputs = ray.get(loads, timeout=300)
    assert outputs == [[expected] * 6] * 3  # nothing lost, nothing changed
    wait_for(lambda: ray.get(controller.status.remote())["generations"][node] > generation, 60)
    wait_for(lambda: events(controller, "expert_shard_lost", "recovered"), 60)
    detected = events(controller, "expert_shard_lost", "detected")
    assert [e.target for e in detected] == [node]  # one fault, one event, three replicas
    assert ray.get([r.generate.remote("ROMEO:", MAX_TOKENS) for r in replicas]) == [expected] * 3
    for stats in ray.get([r.stats.remote() for r in replicas]):
        assert stats["mixed_steps"] == 0


def test_a_slowed_shard_is_one_dispatch_detection_in_the_pool_log(pool, expected):
    """The replicas' own detectors see the node slow down (their replies' busy time); the
    controller's log gets one detected and, once it is back, one recovered."""
    from expertmesh.cluster.local import emulation_for

    controller, replicas, _, _ = pool
    status = ray.get(controller.status.remote())
    node = next(n for n in ("cpu-fast", "cpu-slow") if n in status["nodes"])
    shard = ray.get(controller.shards_now.remote())[node]
    base = emulation_for(load_topology(TOPOLOGY))[node]
    slow = type(base)(base.slowdown * 20, base.link_gbps, base.link_latency_us)
    before = [ray.get(r.detections.remote()) for r in replicas]
    stop = Flag.remote()
    loads = [r.serve_until.remote(stop) for r in replicas]
    try:
        time.sleep(4.0)  # the detectors' baselines (warm-up, 10 replies a size)
        ray.get(shard.set_emulation.remote(slow))
        try:
            wait_for(lambda: events(controller, NODE_SLOW, "detected"), 60)
        finally:
            ray.get(shard.set_emulation.remote(base))
        wait_for(lambda: events(controller, NODE_SLOW, "recovered"), 60)
    finally:
        ray.get(stop.set.remote())
    outputs = ray.get(loads, timeout=300)
    assert all(outputs) and all(o == [expected] * len(o) for o in outputs)  # slow, not wrong
    detected = events(controller, NODE_SLOW, "detected")
    seen = sum(a > b for a, b in zip(ray.get([r.detections.remote() for r in replicas]), before))
    print(f"node_slow on {node}: {seen} of 3 replicas detected it; pool log: 1 detected")
    assert [e.target for e in detected] == [node]  # one incident, however many replicas saw it
    assert detected[0].source == "cluster.dispatch" and seen >= 1
    assert len(events(controller, NODE_SLOW, "recovered")) == 1
    assert ray.get(controller.status.remote())["dispatch_conditions"] == {}


def test_a_rebalance_and_a_drain_reach_every_replica_between_steps(pool, expected):
    controller, replicas, _, _ = pool
    loads = [r.serve.remote(10) for r in replicas]
    time.sleep(1.0)
    status = ray.get(controller.status.remote())
    layers, experts = 3, 8  # the demo model's MoE layers and experts; experts 0-1 hot
    load = np.ones((layers, experts))
    load[:, :2] = 5000.0
    report = ray.get(controller.rebalance.remote(load=load, threshold=1.0), timeout=120)
    drained = ray.get(controller.drain.remote("cpu-fast"), timeout=120)
    outputs = ray.get(loads, timeout=300)
    after = ray.get(controller.status.remote())
    assert outputs == [[expected] * 10] * 3
    assert report["applied"] and report["moves"] > 0
    assert drained < 30
    assert after["version"] > status["version"]
    assert "cpu-fast" not in after["nodes"]

    # what each replica's /health and out-of-service gauge read (the controller's view): a
    # replica whose requests ended before the drain's version takes it on its poll thread
    def took_the_drain() -> bool:
        seen = ray.get([r.out_of_service.remote() for r in replicas])
        versions = [s["version"] for s in ray.get([r.stats.remote() for r in replicas])]
        return seen == [["cpu-fast"]] * 3 and versions == [after["version"]] * 3

    wait_for(took_the_drain, 60)
    for stats in ray.get([r.stats.remote() for r in replicas]):
        assert stats["version"] == after["version"]  # every replica took the last version
        assert stats["swaps"] >= 2  # the rebalance's table, then the drain's
        assert stats["mixed_steps"] == 0  # and never inside a step
    ray.get(controller.rejoin.remote("cpu-fast"), timeout=120)
    wait_for(lambda: ray.get([r.out_of_service.remote() for r in replicas]) == [[]] * 3, 60)
    assert ray.get([r.generate.remote("ROMEO:", MAX_TOKENS) for r in replicas]) == [expected] * 3


def test_a_restarted_controller_resumes_the_pool_and_replicas_keep_serving(pool, expected):
    controller, replicas, with_one, _ = pool
    before = ray.get(controller.status.remote())
    shards = ray.get(controller.shards_now.remote())
    held = ray.get(controller.expert_bytes.remote())  # the rebalance before added replicas
    loads = [r.serve.remote(6) for r in replicas]
    time.sleep(1.0)
    ray.kill(controller, no_restart=False)  # Ray restarts it (max_restarts=-1)

    def resumed() -> bool:
        try:
            return bool(ray.get(controller.status.remote(), timeout=5)["restarted"])
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    assert ray.get(loads, timeout=300) == [[expected] * 6] * 3  # serving never needed it
    wait_for(resumed, 120)
    after = ray.get(controller.status.remote())
    assert after["version"] > before["version"]
    assert after["nodes"] == before["nodes"]
    assert ray.get(controller.shards_now.remote()) == shards  # found again, not restarted
    # Resumed shards hold what the table routes to them (`ensure`): no more than before the
    # restart (a rejoin's re-placement leaves copies it moved away loaded until then).
    resumed_bytes = ray.get(controller.expert_bytes.remote())
    assert resumed_bytes == routed_bytes(controller)
    assert all(resumed_bytes[n] <= held[n] for n in held)
    assert len(shard_actors()) == len(with_one["actors"])  # (cpu-fast's are new since its rejoin)
    wait_for(
        lambda: all(
            s["version"] == after["version"] for s in ray.get([r.stats.remote() for r in replicas])
        ),
        60,
    )
    assert ray.get([r.generate.remote("ROMEO:", MAX_TOKENS) for r in replicas]) == [expected] * 3


def test_serving_config_names_the_pool_field_and_its_fix():
    from expertmesh.serving.config import ServingConfigError, parse_serving_config

    assert parse_serving_config({"topology": "t.yaml", "expert_pool": "demo"}).expert_pool == "demo"
    with pytest.raises(ServingConfigError, match="`expert_pool` needs a `topology`"):
        parse_serving_config({"expert_pool": "demo"})
    with pytest.raises(ServingConfigError, match="expert_pool: String should match pattern"):
        parse_serving_config({"topology": "t.yaml", "expert_pool": "no spaces"})
    with pytest.raises(ValueError, match="expert_pool: 'a b' is not a pool name"):
        pool_namespace("a b")
