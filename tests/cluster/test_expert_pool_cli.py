"""`expertmesh pool status|down`, the real CLI in its own process, against a real Ray cluster
that runs a detached pool: status lists it, down removes every actor of it, and a second down
names what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from expertmesh.cluster.expert_pool import (
    PoolSpec,
    controller_actor,
    pool_actors,
    running_pools,
)
from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.supervisor import SupervisorConfig
from expertmesh.cluster.topology import parse_topology
from expertmesh.models.paths import DEMO_MODEL_DIR

pytestmark = pytest.mark.e2e
POOL = "cli-pool"
CLI = str(Path(sys.executable).with_name("expertmesh"))
TOPOLOGY = parse_topology(
    {
        "version": 1,
        "name": "solo",
        "nodes": [{"name": "solo", "kind": "cpu", "speed": 1.0, "memory_gb": 1, "attention": True}],
        "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}},
    }
)


@pytest.fixture
def address():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, resources={node_resource("solo"): 1.0}, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # the table unwrapped
    return subprocess.run(
        [CLI, "pool", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_pool_status_lists_a_running_pool_and_pool_down_removes_all_of_it(address):
    spec = PoolSpec(
        str(Path(DEMO_MODEL_DIR).resolve()),
        TOPOLOGY,
        supervisor=SupervisorConfig(rebalance_every_s=0),
    )
    ray.get(controller_actor(POOL, create=spec).ready.remote(), timeout=300)
    assert len(pool_actors(POOL)) == 3  # the controller, a shard and its standby

    listed = cli("status", "--address", address, "--json")
    assert listed.returncode == 0, listed.stderr
    status = json.loads(listed.stdout)[POOL]
    assert status["version"] == 1 and status["shard_processes"] == 2
    assert status["nodes"] == ["solo"] and status["replicas"] == {}
    table = cli("status", POOL, "--address", address)
    assert table.returncode == 0 and POOL in table.stdout and "up" in table.stdout

    down = cli("down", POOL, "--address", address)
    assert down.returncode == 0, down.stderr
    assert f"pool {POOL}: stopped 2 shard actors" in down.stdout
    assert pool_actors(POOL) == [] and POOL not in running_pools()
    assert json.loads(cli("status", "--address", address, "--json").stdout) == {}

    again = cli("down", POOL, "--address", address)
    assert again.returncode == 2
    assert f"no expert pool named {POOL!r} runs on this Ray cluster" in again.stderr
