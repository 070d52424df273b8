"""The embedded expert-parallel cluster on real Ray nodes (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from expertmesh.cluster.rebalance import Rebalancer
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.topology import load_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

pytestmark = pytest.mark.e2e

TOPOLOGY = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "mixed.yaml"
PROMPTS = ["ROMEO:", "What light through yonder window", "To be"]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def single_process_texts() -> list[str | None]:
    model = load_model(DEMO_MODEL_DIR)
    out = Generator(model, Tokenizer.from_dir(DEMO_MODEL_DIR)).generate(PROMPTS, PARAMS)
    return [c.text for c in out]


@pytest.fixture(scope="module")
def cluster():
    ep = ExpertParallelModel.launch(DEMO_MODEL_DIR, load_topology(TOPOLOGY), min_replicas=1)
    yield ep
    ep.shutdown()


def _texts(ep) -> list[str | None]:
    out = Generator(ep.model, Tokenizer.from_dir(DEMO_MODEL_DIR)).generate(PROMPTS, PARAMS)
    return [c.text for c in out]


def test_every_topology_node_runs_a_shard_on_its_own_ray_node(cluster):
    import ray

    statuses = cluster.pool.statuses()
    # the nodes the plan leaves empty too: failover and rebalancing load experts there at once
    assert set(statuses) == {n.name for n in load_topology(TOPOLOGY).nodes}
    assert len({s.pid for s in statuses.values()}) == len(statuses)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3


def test_cluster_output_equals_single_process(cluster, single_process_texts):
    assert _texts(cluster) == single_process_texts


def test_killed_shard_is_restarted_and_reloaded_without_changing_output(
    cluster, single_process_texts
):
    node = next(n for n in cluster.pool.handles if cluster.placement.experts_on(n))
    cluster.pool.kill(node)
    start = time.perf_counter()
    assert _texts(cluster) == single_process_texts
    assert time.perf_counter() - start < 60
    assert cluster.dispatcher.stats.recoveries + cluster.dispatcher.stats.failovers >= 1


def test_rebalance_under_skewed_load_moves_experts_and_keeps_output(cluster, single_process_texts):
    rebalancer = Rebalancer(cluster, load_topology(TOPOLOGY), threshold=1.0, min_tokens=1)
    cluster.dispatcher.stats.tokens.clear()
    Generator(cluster.model).generate(
        [[7] * 40, [7, 8] * 20], SamplingParams(max_tokens=8, ignore_eos=True)
    )
    report = rebalancer.check()
    assert report.triggered and report.applied
    assert report.step_time_after_s < report.step_time_before_s
    assert report.moves > 0
    assert report.pause_s < 0.5  # requests wait only for the routing-table swap
    assert _texts(cluster) == single_process_texts
