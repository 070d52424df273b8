"""Devices on the cluster (`cluster/devices.py`): what each node's actors ask Ray for, read
from Ray's node table, and the embedded cluster offering GPUs only to GPU nodes. The last test
runs the real path on an embedded Ray cluster: `device: cuda` on a Ray node without a GPU fails
in the driver, naming the node, before any shard starts; `auto` there computes on the CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from expertmesh.cluster.devices import (
    SHARD_GPU_SHARE,
    actor_device,
    attention_device,
    embedded_gpus,
    gpu_request,
    gpus_offered,
)
from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.topology import load_topology, parse_topology
from expertmesh.models.device import DeviceError

MIXED = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "mixed.yaml"
NO_CUDA = (
    "node gpu-0: device cuda requested but this Ray node has no CUDA device; "
    "set device: cpu or auto"
)


def _info(resource: str, gpus: float | None = None, alive: bool = True) -> dict:
    resources = {resource: 1.0, "CPU": 1.0}
    if gpus is not None:
        resources["GPU"] = gpus
    return {"Alive": alive, "NodeID": resource, "Resources": resources}


def test_gpus_offered_reads_the_live_ray_node_standing_for_the_topology_node():
    gpu0, cpu = node_resource("gpu-0"), node_resource("cpu-fast")
    infos = [_info(gpu0, 2.0, alive=False), _info(gpu0, 1.0), _info(cpu)]
    assert gpus_offered(gpu0, infos) == 1.0  # the dead node's GPUs do not count
    assert gpus_offered(cpu, infos) == 0.0
    assert gpus_offered(node_resource("absent"), infos) == 0.0


def test_cpu_never_asks_for_a_gpu():
    assert gpu_request("cpu", "gpu-0", 8.0) == 0.0


def test_auto_takes_a_share_of_a_gpu_only_where_there_is_one():
    assert gpu_request("auto", "gpu-0", 1.0) == SHARD_GPU_SHARE
    assert gpu_request("auto", "cpu-fast", 0.0) == 0.0
    assert 0 < SHARD_GPU_SHARE <= 0.5  # shard + standby + attention worker fit on one GPU


def test_cuda_on_a_ray_node_without_a_gpu_names_the_node_and_the_fix():
    with pytest.raises(DeviceError) as err:
        gpu_request("cuda", "gpu-0", 0.0)
    assert str(err.value) == NO_CUDA


def test_an_unknown_device_is_refused_by_name():
    with pytest.raises(DeviceError, match="node gpu-0: device 'gpu' is not one of"):
        gpu_request("gpu", "gpu-0", 1.0)


def test_an_actor_with_a_gpu_share_computes_on_cuda():
    assert actor_device(SHARD_GPU_SHARE) == "cuda"
    assert actor_device(0.0) == "cpu"


def test_the_attention_worker_uses_a_gpu_only_where_its_ray_node_and_process_have_one():
    assert attention_device("auto", "gpu-0", 0.0, cuda_available=True) == torch.device("cpu")
    assert attention_device("auto", "gpu-0", 1.0, cuda_available=False) == torch.device("cpu")
    assert attention_device("auto", "gpu-0", 1.0, cuda_available=True).type == "cuda"
    assert attention_device("cpu", "gpu-0", 1.0, cuda_available=True) == torch.device("cpu")
    with pytest.raises(DeviceError, match=NO_CUDA):
        attention_device("cuda", "gpu-0", 0.0, cuda_available=True)
    with pytest.raises(DeviceError, match=NO_CUDA):  # Ray offers one, this process sees none
        attention_device("cuda", "gpu-0", 1.0, cuda_available=False)


def test_the_embedded_cluster_gives_the_machines_gpus_to_gpu_nodes_only():
    mixed = load_topology(MIXED)
    assert {n.name: embedded_gpus(n, 1) for n in mixed.nodes} == {
        "gpu-0": 1,
        "cpu-fast": 0,
        "cpu-slow": 0,
    }
    assert {n.name: embedded_gpus(n, 0) for n in mixed.nodes} == {
        "gpu-0": 0,
        "cpu-fast": 0,
        "cpu-slow": 0,
    }
    gpu0, cpu_fast = mixed.node("gpu-0"), mixed.node("cpu-fast")
    assert embedded_gpus(dataclasses.replace(gpu0, device="cpu"), 4) == 0
    assert embedded_gpus(dataclasses.replace(cpu_fast, device="cuda"), 4) == 4


@pytest.mark.e2e
def test_embedded_cluster_refuses_cuda_without_a_gpu_and_runs_auto_on_the_cpu(hf_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device (tests/gpu/ covers it)")
    import ray

    from expertmesh.cluster.local import LocalCluster
    from expertmesh.cluster.pool import RayShardPool

    path, _ = hf_checkpoint("mixtral")
    topology = parse_topology(
        {
            "version": 1,
            "name": "two",
            "nodes": [
                {"name": "gpu-0", "kind": "gpu", "speed": 1.0, "memory_gb": 1, "attention": True},
                {"name": "cpu-a", "kind": "cpu", "speed": 1.0, "memory_gb": 1},
            ],
            "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}},
        }
    )
    assignment = {"gpu-0": {0: [0, 1, 2]}, "cpu-a": {0: [3, 4, 5]}}
    with LocalCluster(topology):
        assert all(n["Resources"].get("GPU", 0) == 0 for n in ray.nodes() if n["Alive"])
        with pytest.raises(DeviceError) as err:
            RayShardPool(str(path), assignment, devices={"gpu-0": "cuda", "cpu-a": "cpu"})
        assert str(err.value) == NO_CUDA
        assert not [a for a in ray.util.list_named_actors() if "expertmesh-shard" in a]
        pool = RayShardPool(
            str(path), assignment, standby=False, devices={"gpu-0": "auto", "cpu-a": "auto"}
        )
        statuses = pool.statuses()
        assert {n: s.extra["device"] for n, s in statuses.items()} == {
            "gpu-0": "cpu",
            "cpu-a": "cpu",
        }
        assert {s.extra["dtype"] for s in statuses.values()} == {"float32"}
