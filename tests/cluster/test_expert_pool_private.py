"""Private pools (no `expert_pool`): two API replicas in one Ray namespace, as Ray Serve runs
them, each launching its own shards. Their shard actors must not ask for the same names (they
did: `expertmesh-shard-<node>-1`, and the second replica failed to start)."""

from __future__ import annotations

import pytest
import ray

from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.runtime import ExpertParallelModel
from expertmesh.cluster.topology import parse_topology
from expertmesh.models.checkpoint import load_model
from expertmesh.models.generate import Generator, SamplingParams
from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer

pytestmark = pytest.mark.e2e
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
TOPOLOGY = parse_topology(
    {
        "version": 1,
        "name": "solo",
        "nodes": [{"name": "solo", "kind": "cpu", "speed": 1.0, "memory_gb": 1, "attention": True}],
        "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}},
    }
)


@pytest.fixture
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, resources={node_resource("solo"): 1.0}, include_dashboard=False)
    yield
    ray.shutdown()


def shard_names() -> list[str]:
    return [a for a in ray.util.list_named_actors() if a.startswith("expertmesh-shard")]


def test_two_private_pools_in_one_namespace_start_and_serve(ray_cluster):
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    expected = Generator(load_model(DEMO_MODEL_DIR), tokenizer).generate(["ROMEO:"], PARAMS)
    first = ExpertParallelModel.launch(DEMO_MODEL_DIR, TOPOLOGY, local=False, emulate=False)
    names_first = set(shard_names())
    second = ExpertParallelModel.launch(DEMO_MODEL_DIR, TOPOLOGY, local=False, emulate=False)
    names_second = set(shard_names()) - names_first
    assert len(names_first) == len(names_second) == 2  # a shard and a standby each, apart
    for ep in (first, second):
        assert Generator(ep.model, tokenizer).generate(["ROMEO:"], PARAMS)[0].text == (
            expected[0].text
        )
    first.shutdown()
    second.shutdown()
