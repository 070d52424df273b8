"""Which Ray node stands for which topology node, from `ray.nodes()` records."""

from __future__ import annotations

from expertmesh.cluster.ray_nodes import nodes_offered, offering


def info(node_id: str, alive: bool, *names: str) -> dict:
    resources = {"CPU": 1.0, **{f"expertmesh_node_{n}": 1.0 for n in names}}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources if alive else {}}


def test_only_live_ray_nodes_stand_for_a_topology_node():
    infos = [info("a1", True, "gpu-0"), info("b1", False, "cpu-fast"), info("b2", True, "cpu-fast")]
    assert offering(["gpu-0", "cpu-fast", "cpu-slow"], infos) == {
        "gpu-0": {"a1"},
        "cpu-fast": {"b2"},  # the dead one (its pod replaced) does not count
        "cpu-slow": set(),  # none: lost, or not started yet
    }


def test_topology_nodes_are_read_from_the_resources_offered():
    infos = [info("a1", True, "gpu-0"), info("x", True), info("b1", False, "cpu-slow")]
    assert nodes_offered(infos) == ["gpu-0"]
