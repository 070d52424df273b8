"""The YAML topology: schema validation, error messages, link resolution, derived views."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from expertmesh.cluster.topology import (
    Link,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"


def _node(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "cpu", "speed": 1.0, "memory_gb": 10, **fields}


def _spec(nodes: list[dict[str, Any]] | None = None, **links: Any) -> dict[str, Any]:
    """A valid topology dict: nodes a, b, c on a 10 Gbit/s, 50 us default link."""
    return {
        "version": 1,
        "name": "test",
        "nodes": nodes if nodes is not None else [_node("a"), _node("b"), _node("c")],
        "links": {"default": {"bandwidth_gbps": 10, "latency_us": 50}, **links},
    }


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    return str(info.value)


def _labelled(a: dict[str, str], b: dict[str, str], **links: Any) -> Topology:
    return parse_topology(_spec([_node("a", labels=a), _node("b", labels=b)], **links))


RACK = {"bandwidth_gbps": 25, "latency_us": 20}
ZONE = {"bandwidth_gbps": 15, "latency_us": 100}
REGION = {"bandwidth_gbps": 5, "latency_us": 1000}
ALL_LABELS = {"rack": "r1", "zone": "z1", "region": "eu"}


# --- examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["homogeneous-4", "mixed", "two-racks"])
def test_example_loads(name: str) -> None:
    topology = load_topology(EXAMPLES / f"{name}.yaml")
    assert topology.name == name


def test_homogeneous_example_has_four_identical_cpu_nodes() -> None:
    topology = load_topology(EXAMPLES / "homogeneous-4.yaml")
    assert len(topology.nodes) == 4
    assert {(n.kind, n.speed, n.memory_bytes) for n in topology.nodes} == {
        ("cpu", 1.0, topology.nodes[0].memory_bytes)
    }
    assert topology.link("cpu-0", "cpu-3") == Link(10, 50)


def test_mixed_example_links_gpu_to_fast_cpu_at_25_gbps() -> None:
    topology = load_topology(EXAMPLES / "mixed.yaml")
    assert topology.link("gpu-0", "cpu-fast").bandwidth_gbps == 25
    assert topology.link("gpu-0", "cpu-slow").bandwidth_gbps == 10
    assert [n.name for n in topology.attention_nodes] == ["gpu-0"]


def test_two_racks_example_crosses_racks_on_slow_uplink() -> None:
    topology = load_topology(EXAMPLES / "two-racks.yaml")
    assert topology.racks() == {"r1": ["r1-a", "r1-b", "r1-c"], "r2": ["r2-a", "r2-b", "r2-c"]}
    assert topology.link("r1-a", "r1-c") == Link(25, 20)
    assert topology.link("r1-a", "r2-a") == Link(1, 500)


# --- link resolution ---------------------------------------------------------------------


def test_explicit_pair_beats_same_rack() -> None:
    pair = {"nodes": ["a", "b"], "bandwidth_gbps": 40, "latency_us": 5}
    topology = _labelled(ALL_LABELS, ALL_LABELS, pairs=[pair], same_rack=RACK)
    assert topology.link("a", "b") == Link(40, 5)


def test_same_rack_beats_same_zone() -> None:
    topology = _labelled(ALL_LABELS, ALL_LABELS, same_rack=RACK, same_zone=ZONE)
    assert topology.link("a", "b") == Link(25, 20)


def test_same_zone_beats_same_region() -> None:
    topology = _labelled(ALL_LABELS, ALL_LABELS, same_zone=ZONE, same_region=REGION)
    assert topology.link("a", "b") == Link(15, 100)


def test_same_region_beats_default() -> None:
    topology = _labelled({"region": "eu"}, {"region": "eu"}, same_region=REGION)
    assert topology.link("a", "b") == Link(5, 1000)


def test_different_racks_fall_through_to_shared_zone() -> None:
    a, b = {"rack": "r1", "zone": "z1"}, {"rack": "r2", "zone": "z1"}
    topology = _labelled(a, b, same_rack=RACK, same_zone=ZONE)
    assert topology.link("a", "b") == Link(15, 100)


def test_same_rack_without_same_rack_rule_uses_next_rule() -> None:
    topology = _labelled(ALL_LABELS, ALL_LABELS, same_zone=ZONE)
    assert topology.link("a", "b") == Link(15, 100)


def test_nodes_without_labels_use_default() -> None:
    topology = _labelled({}, {}, same_rack=RACK, same_zone=ZONE, same_region=REGION)
    assert topology.link("a", "b") == Link(10, 50)


def test_explicit_pair_is_symmetric() -> None:
    pair = {"nodes": ["b", "a"], "bandwidth_gbps": 40, "latency_us": 5}
    topology = parse_topology(_spec(pairs=[pair]))
    assert topology.link("a", "b") == topology.link("b", "a") == Link(40, 5)


def test_link_to_self_is_in_process() -> None:
    link = parse_topology(_spec()).link("b", "b")
    assert link.bandwidth_gbps == math.inf
    assert link.latency_us == 0
    assert link.transfer_s(10**12) == 0


def test_link_to_unknown_node_names_known_nodes() -> None:
    with pytest.raises(KeyError, match="unknown node 'z'; known nodes: a, b, c"):
        parse_topology(_spec()).link("a", "z")


# --- nodes ---------------------------------------------------------------------------------


def test_first_node_runs_attention_when_none_chosen() -> None:
    topology = parse_topology(_spec())
    assert [n.name for n in topology.attention_nodes] == ["a"]


def test_chosen_attention_nodes_are_kept() -> None:
    nodes = [_node("a"), _node("b", attention=True), _node("c", attention=True)]
    topology = parse_topology(_spec(nodes))
    assert [n.name for n in topology.attention_nodes] == ["b", "c"]


def test_kv_fraction_splits_memory_into_kv_and_weights() -> None:
    node = parse_topology(_spec([_node("a", memory_gb=10, kv_fraction=0.25)])).node("a")
    assert node.memory_bytes == 10 * 10**9
    assert node.kv_bytes == 2_500_000_000
    assert node.weight_bytes == 7_500_000_000


def test_label_properties_read_well_known_labels() -> None:
    node = parse_topology(_spec([_node("a", labels=ALL_LABELS)])).node("a")
    assert (node.rack, node.zone, node.region) == ("r1", "z1", "eu")


def test_nodes_without_rack_label_go_to_default_rack() -> None:
    nodes = [_node("a", labels={"rack": "r1"}), _node("b"), _node("c")]
    assert parse_topology(_spec(nodes)).racks() == {"r1": ["a"], "default": ["b", "c"]}


def test_measure_speed_is_none_until_filled() -> None:
    topology = parse_topology(_spec([_node("a"), _node("b", speed="measure")]))
    assert topology.node("b").speed is None
    assert topology.nodes_to_measure == ("b",)


# --- with_speeds -----------------------------------------------------------------------------


def test_with_speeds_fills_measured_nodes() -> None:
    topology = parse_topology(_spec([_node("a"), _node("b", speed="measure")]))
    filled = topology.with_speeds({"b": 2.5})
    assert filled.node("b").speed == 2.5
    assert filled.node("a").speed == 1.0
    assert filled.nodes_to_measure == ()
    assert topology.node("b").speed is None  # the original is unchanged


def test_with_speeds_rejects_unknown_node() -> None:
    with pytest.raises(TopologyError, match=r"speeds\['z'\]: unknown node 'z'; known nodes: a, b"):
        parse_topology(_spec([_node("a"), _node("b")])).with_speeds({"z": 1.0})


def test_with_speeds_rejects_non_positive_speed() -> None:
    with pytest.raises(TopologyError, match=r"speeds\['a'\]: speed must be a finite number > 0"):
        parse_topology(_spec()).with_speeds({"a": 0.0})


# --- transfer_s ------------------------------------------------------------------------------


def test_transfer_s_is_latency_plus_bytes_over_bandwidth() -> None:
    # 50 us + 1.25 MB * 8 bit / 10 Gbit/s = 50 us + 1 ms
    assert Link(10, 50).transfer_s(1_250_000) == pytest.approx(0.00105)


def test_transfer_s_of_zero_bytes_is_latency() -> None:
    assert Link(1, 500).transfer_s(0) == pytest.approx(0.0005)


# --- validation errors -------------------------------------------------------------------


def test_duplicate_node_name_names_field() -> None:
    nodes = [_node("a"), _node("cpu-a"), _node("cpu-a")]
    assert (
        "nodes[2].name: duplicate node name 'cpu-a' (also nodes[1]); node names must be unique"
        in _problems(_spec(nodes))
    )


def test_unknown_node_in_pair_names_field_and_known_nodes() -> None:
    pair = {"nodes": ["a", "gpu-z"], "bandwidth_gbps": 1, "latency_us": 1}
    assert "links.pairs[0].nodes: unknown node 'gpu-z'; known nodes: a, b, c" in _problems(
        _spec(pairs=[pair])
    )


def test_node_paired_with_itself_is_rejected() -> None:
    pair = {"nodes": ["a", "a"], "bandwidth_gbps": 1, "latency_us": 1}
    assert "links.pairs[0].nodes: node 'a' paired with itself" in _problems(_spec(pairs=[pair]))


def test_pair_given_twice_is_rejected() -> None:
    pairs = [{"nodes": n, "bandwidth_gbps": 1, "latency_us": 1} for n in (["a", "b"], ["b", "a"])]
    assert "links.pairs[1].nodes: pair 'b'-'a' already given at links.pairs[0]" in _problems(
        _spec(pairs=pairs)
    )


def test_negative_bandwidth_names_field() -> None:
    data = _spec()
    data["links"]["default"]["bandwidth_gbps"] = -1
    assert "links.default.bandwidth_gbps: must be > 0; got -1" in _problems(data)


def test_zero_memory_names_field() -> None:
    nodes = [_node("a"), _node("b"), _node("c", memory_gb=0)]
    assert "nodes[2].memory_gb: must be > 0; got 0" in _problems(_spec(nodes))


def test_unknown_key_names_it_and_allowed_keys() -> None:
    nodes = [_node("a", cpus=4)]
    assert (
        "nodes[0].cpus: unknown key 'cpus'; allowed keys: name, kind, speed, memory_gb, "
        "kv_fraction, labels, attention" in _problems(_spec(nodes))
    )


def test_bad_kind_names_field_and_choices() -> None:
    assert "nodes[0].kind: must be one of 'cpu' or 'gpu'; got 'tpu'" in _problems(
        _spec([_node("a", kind="tpu")])
    )


def test_unsupported_version_names_supported_one() -> None:
    data = {**_spec(), "version": 2}
    assert "version: unsupported version 2; this release reads `version: 1`" in _problems(data)


def test_empty_nodes_list_is_rejected() -> None:
    assert "nodes: needs at least one node" in _problems(_spec([]))


def test_invalid_node_name_suggests_dns_label() -> None:
    assert "e.g. 'gpu-1'" in _problems(_spec([_node("GPU_1")]))


def test_bad_speed_explains_measure() -> None:
    assert (
        "nodes[0].speed: must be a number > 0 (1.0 = reference node) or the string 'measure'"
        in (_problems(_spec([_node("a", speed="fast")])))
    )


def test_kv_fraction_above_limit_names_field() -> None:
    assert "nodes[0].kv_fraction: must be <= 0.9; got 0.95" in _problems(
        _spec([_node("a", kv_fraction=0.95)])
    )


def test_every_problem_is_reported_at_once() -> None:
    data = {**_spec([_node("a", kind="tpu", memory_gb=0)]), "version": 2}
    with pytest.raises(TopologyError) as info:
        parse_topology(data)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "version",
        "nodes[0].kind",
        "nodes[0].memory_gb",
    ]


def test_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "topo.yaml"
    data = _spec([_node("a"), _node("b", memory_gb=0)])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(path) in str(info.value)
    [problem] = info.value.problems
    line = path.read_text().splitlines().index("  memory_gb: 0") + 1
    assert problem == f"nodes[1].memory_gb (line {line}): must be > 0; got 0"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nname: x\nnodes: [a, b\nlinks: {}\n")
    with pytest.raises(TopologyError, match=rf"{path}:\d+:\d+: invalid YAML"):
        load_topology(path)


def test_duplicate_yaml_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\nname: x\nname: y\n")
    with pytest.raises(TopologyError, match=rf"{path}:3:1: invalid YAML: duplicate key 'name'"):
        load_topology(path)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(TopologyError, match="<top level>: must be a mapping"):
        parse_topology([1, 2])  # type: ignore[arg-type]


# --- round trip and properties ----------------------------------------------------------------


def test_to_dict_round_trips_examples() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        topology = load_topology(path)
        assert parse_topology(topology.to_dict()) == topology


NAMES = ["a", "b", "c", "d", "e", "f"]
LINKS = st.fixed_dictionaries(
    {
        "bandwidth_gbps": st.floats(0.01, 400, allow_nan=False),
        "latency_us": st.floats(0, 10_000, allow_nan=False),
    }
)


@st.composite
def topologies(draw: st.DrawFn) -> dict[str, Any]:
    names = NAMES[: draw(st.integers(1, len(NAMES)))]
    nodes = []
    for name in names:
        labels = {
            key: draw(st.sampled_from(values))
            for key, values in (("rack", "12"), ("zone", "xy"), ("region", "pq"))
            if draw(st.booleans())
        }
        nodes.append(
            _node(
                name,
                kind=draw(st.sampled_from(["cpu", "gpu"])),
                speed=draw(st.one_of(st.just("measure"), st.floats(0.1, 10))),
                memory_gb=draw(st.floats(0.5, 512)),
                kv_fraction=draw(st.floats(0, 0.9)),
                labels=labels,
                attention=draw(st.booleans()),
            )
        )
    all_pairs = [[a, b] for i, a in enumerate(names) for b in names[i + 1 :]]
    chosen = draw(st.lists(st.sampled_from(all_pairs), unique_by=tuple)) if all_pairs else []
    links: dict[str, Any] = {
        "pairs": [{"nodes": draw(st.permutations(p)), **draw(LINKS)} for p in chosen]
    }
    for rule in ("same_rack", "same_zone", "same_region"):
        if draw(st.booleans()):
            links[rule] = draw(LINKS)
    return _spec(nodes, **links)


@given(topologies())
def test_link_is_symmetric_for_random_topologies(data: dict[str, Any]) -> None:
    topology = parse_topology(data)
    names = [n.name for n in topology.nodes]
    for a in names:
        for b in names:
            assert topology.link(a, b) == topology.link(b, a)


@given(topologies())
def test_to_dict_round_trips_random_topologies(data: dict[str, Any]) -> None:
    topology = parse_topology(data)
    assert parse_topology(topology.to_dict()) == topology


# --- measured figures ------------------------------------------------------------------------


def test_call_overhead_is_read_and_round_trips() -> None:
    topology = parse_topology({**_spec(), "call_overhead_us": 180.5})
    assert topology.call_overhead_us == 180.5
    assert parse_topology(topology.to_dict()) == topology
    assert parse_topology(_spec()).call_overhead_us is None


def test_negative_call_overhead_names_field() -> None:
    assert "call_overhead_us: must be >= 0; got -3" in _problems(
        {**_spec(), "call_overhead_us": -3}
    )
