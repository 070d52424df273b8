"""The `device` option of topology nodes: its values, its default, the error for a bad value
(field path, YAML line, the fix), and that it survives `to_dict`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args

import pytest

from expertmesh.cluster.topology import (
    NodeDevice,
    TopologyError,
    load_topology,
    parse_topology,
)
from expertmesh.models.device import DeviceSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"
UNSET = object()


def _spec(*devices: Any) -> dict[str, Any]:
    nodes = []
    for i, device in enumerate(devices):
        node = {"name": f"n{i}", "kind": "gpu", "speed": 1.0, "memory_gb": 10}
        if device is not UNSET:
            node["device"] = device
        nodes.append(node)
    return {
        "version": 1,
        "name": "t",
        "nodes": nodes,
        "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}},
    }


def test_the_topology_offers_exactly_the_devices_the_model_core_resolves():
    assert get_args(NodeDevice) == get_args(DeviceSpec)


def test_device_defaults_to_auto():
    assert [n.device for n in parse_topology(_spec(UNSET, UNSET)).nodes] == ["auto", "auto"]


def test_each_device_is_kept_per_node():
    topology = parse_topology(_spec("auto", "cuda", "cpu"))
    assert [n.device for n in topology.nodes] == ["auto", "cuda", "cpu"]


def test_examples_run_on_auto():
    mixed = load_topology(EXAMPLES / "mixed.yaml")
    assert mixed.node("gpu-0").device == "auto"


@pytest.mark.parametrize("bad", ["CUDA", "cuda:0", "", 1, None, True])
def test_a_bad_device_names_the_field_and_the_choices(bad):
    with pytest.raises(TopologyError) as err:
        parse_topology(_spec("cpu", bad))
    assert err.value.problems == (
        "nodes[1].device: must be auto (CUDA when this node's Ray node has a GPU), cuda or "
        f"cpu; got {bad!r}",
    )


def test_gpu_as_a_device_points_at_cuda():
    with pytest.raises(TopologyError) as err:
        parse_topology(_spec("gpu"))
    assert err.value.problems[0].endswith("got 'gpu' (a GPU is cuda)")


def test_a_bad_device_in_a_file_gives_its_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "version: 1\n"
        "name: t\n"
        "nodes:\n"
        "  - name: gpu-0\n"
        "    kind: gpu\n"
        "    speed: 4\n"
        "    memory_gb: 24\n"
        "    device: gpu\n"
        "links:\n"
        "  default: {bandwidth_gbps: 10, latency_us: 50}\n"
    )
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert err.value.problems[0].startswith("nodes[0].device (line 8): must be auto")


def test_device_round_trips_through_to_dict():
    topology = parse_topology(_spec("cuda", "cpu", UNSET))
    assert [n["device"] for n in topology.to_dict()["nodes"]] == ["cuda", "cpu", "auto"]
    assert parse_topology(topology.to_dict()) == topology


def test_the_node_dataclass_refuses_an_unknown_device():
    node = parse_topology(_spec("cpu")).nodes[0]
    with pytest.raises(ValueError, match="device must be auto, cuda or cpu"):
        dataclasses.replace(node, device="gpu")  # type: ignore[arg-type]
