"""Devices on the cluster: what each node's actors ask Ray for, so they compute on the device
their topology node names (`device: auto|cuda|cpu`, see `cluster/topology.py`).

Ray decides which GPU a process may use: an actor started with `num_gpus > 0` gets
`CUDA_VISIBLE_DEVICES` set to its GPU, one started with `num_gpus=0` gets it emptied and sees
none. So a node's device is settled *before* its actors start, from Ray's node table (does the
Ray node standing for this topology node offer GPUs?), and the actor then asks for a share of
one:

    share = gpu_request("auto", "gpu-0", gpus_offered(node_resource("gpu-0"), ray.nodes()))
    # 0.25 where that Ray node has a GPU (the shard computes on it), else 0.0 (on its CPU)

`cuda` on a node whose Ray node offers no GPU is an error naming the node and the fix, raised
in the driver before any actor starts. The embedded cluster decides what each emulated node
offers (`embedded_gpus`): the machine's GPUs go to `kind: gpu` nodes (and to nodes that say
`device: cuda`), never to the emulated CPU nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from expertmesh.models.device import (
    DeviceError,
    check_device_spec,
    cuda_missing_message,
    resolve_device,
)

from .topology import Node

SHARD_GPU_SHARE = 0.25
"""The fraction of its node's GPU each shard actor claims (Ray's `num_gpus`). A fraction, so a
node's shard, its standby and an attention worker share one GPU; Ray still sets
`CUDA_VISIBLE_DEVICES` to that GPU for each of them."""


def gpus_offered(resource: str, infos: Sequence[Mapping[str, Any]]) -> float:
    """GPUs of the live Ray node offering `resource` (a topology node's pinning resource,
    `pool.node_resource`) in Ray's node table (`ray.nodes()`); 0 when no live node offers it."""
    found = [
        float(info.get("Resources", {}).get("GPU", 0.0))
        for info in infos
        if info.get("Alive") and resource in info.get("Resources", {})
    ]
    return max(found, default=0.0)


def gpu_request(spec: str, node: str, gpus_on_node: float) -> float:
    """Ray `num_gpus` for an actor of `node` with `device: spec` on a Ray node with
    `gpus_on_node` GPUs: a share of one GPU, or 0 (computes on the CPU)."""
    checked = check_device_spec(spec, node)
    if checked == "cpu":
        return 0.0
    if gpus_on_node <= 0:
        if checked == "cuda":
            raise DeviceError(cuda_missing_message(node))
        return 0.0
    return SHARD_GPU_SHARE


def actor_device(share: float) -> str:
    """What an actor started with `num_gpus=share` is told to compute on."""
    return "cuda" if share > 0 else "cpu"


def attention_device(
    spec: str, node: str, gpus_on_node: float, cuda_available: bool | None = None
) -> torch.device:
    """The device this process (the attention worker, not a Ray actor) computes on for the
    attention node `node`: a GPU only where its Ray node offers one and this process sees it."""
    if gpu_request(spec, node, gpus_on_node) == 0:
        return torch.device("cpu")
    return resolve_device(spec, node, cuda_available)


def embedded_gpus(node: Node, gpus_here: int) -> int:
    """GPUs the embedded cluster's Ray node for `node` offers, on a machine with `gpus_here`:
    all of them for `kind: gpu` (device auto or cuda) and for `device: cuda`; none for the
    emulated CPU nodes and for `device: cpu`, whatever the machine has."""
    if node.device == "cpu":
        return 0
    if node.device == "cuda" or node.kind == "gpu":
        return gpus_here
    return 0
