"""The cluster topology: which nodes exist, how fast they are, how much memory they offer, and
what a link between any two of them costs.

Users write it as YAML (see `examples/topologies/`); `load_topology(path)` validates it with
the pydantic schema below and returns a frozen `Topology`. Everything inside expertmesh takes
the `Topology` and trusts it; every problem with the file surfaces here, at once, as one
`TopologyError` whose lines read `<field path>: <what is wrong>; <how to fix it>`.

    version: 1
    name: mixed
    nodes:
      - {name: gpu-0, kind: gpu, speed: 4, memory_gb: 24, attention: true, device: auto}
      - {name: cpu-fast, kind: cpu, speed: measure, memory_gb: 32, labels: {rack: r1}}
    links:
      default: {bandwidth_gbps: 10, latency_us: 50}
      same_rack: {bandwidth_gbps: 25, latency_us: 20}
      pairs:
        - {nodes: [gpu-0, cpu-fast], bandwidth_gbps: 25, latency_us: 30}

Link resolution for a pair of nodes, first match wins: an explicit `pairs` entry, then
`same_rack` (both nodes carry the same `rack` label), `same_zone`, `same_region`, `default`.
A node's link to itself is in-process: infinite bandwidth, zero latency.

Units: `memory_gb` is decimal gigabytes (10**9 bytes), `bandwidth_gbps` gigabits per second
(10**9 bits), `latency_us` microseconds one way.

`device` (auto, cuda or cpu; default auto) is where a node's shards and attention worker
compute: auto is CUDA when that node's Ray node has a GPU, cuda insists on one (a clear error
naming the node where there is none), cpu never uses one. `kind` describes the machine (the
rendered manifests request `nvidia.com/gpu` for `kind: gpu`); `device` is what runs on it.

Two optional top-level figures are usually measured rather than written: `reference_tflops`
(expert-GEMM TFLOP/s of a speed-1.0 node) and `call_overhead_us` (the fixed cost of one expert
dispatch call, beyond link latency and bytes); `expertmesh rig up`'s calibration fills both in.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from expertmesh.observability.validation import Loc, Problem, describe_error, problem_lines

__all__ = [
    "SCHEMA_VERSION",
    "Link",
    "LinkRules",
    "Node",
    "NodeDevice",
    "NodeKind",
    "PairLink",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_topology",
]

SCHEMA_VERSION = 1
BYTES_PER_GB = 10**9
MAX_KV_FRACTION = 0.9
DEFAULT_RACK = "default"
"""The rack that `Topology.racks()` puts nodes without a `rack` label in."""

NodeKind = Literal["cpu", "gpu"]
NodeDevice = Literal["auto", "cuda", "cpu"]

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class TopologyError(ValueError):
    """A topology file or dict is invalid. `problems` holds one `<field path>: <message>` line
    per problem; `source` is the file it came from (None for a dict)."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f"invalid topology {source}" if source else "invalid topology"
        count = len(self.problems)
        header = f"{where} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n  ".join([header, *self.problems]))


# ---------------------------------------------------------------------------------------------
# Internal model: frozen dataclasses, trusted by the rest of expertmesh.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """The cost of moving bytes between two nodes."""

    bandwidth_gbps: float
    """Gigabits per second; `math.inf` for a node's link to itself."""
    latency_us: float
    """One-way latency in microseconds."""

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        if not (self.latency_us >= 0 and math.isfinite(self.latency_us)):
            raise ValueError(f"latency_us must be finite and >= 0, got {self.latency_us}")

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to move `nbytes` one way: latency plus serialisation at the bandwidth."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return self.latency_us * 1e-6 + nbytes * 8 / (self.bandwidth_gbps * 1e9)


IN_PROCESS = Link(bandwidth_gbps=math.inf, latency_us=0.0)
"""A node's link to itself."""


@dataclass(frozen=True)
class Node:
    name: str
    kind: NodeKind
    speed: float | None
    """Compute speed relative to the reference node (1.0); None until measured at start-up."""
    memory_bytes: int
    """Memory for expert weights and KV cache."""
    kv_bytes: int
    """The part of `memory_bytes` reserved for KV cache."""
    weight_bytes: int
    """The part of `memory_bytes` left for expert weights: memory_bytes - kv_bytes."""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    attention: bool = False
    """Whether this node runs attention workers."""
    device: NodeDevice = "auto"
    """Where this node computes: auto (CUDA when its Ray node has a GPU), cuda, or cpu."""

    def __post_init__(self) -> None:
        if self.speed is not None and not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"node {self.name!r}: speed must be finite and > 0 or None")
        if self.memory_bytes <= 0 or not 0 <= self.kv_bytes <= self.memory_bytes:
            raise ValueError(f"node {self.name!r}: need memory_bytes > 0 and 0 <= kv_bytes <= it")
        if self.weight_bytes != self.memory_bytes - self.kv_bytes:
            raise ValueError(f"node {self.name!r}: weight_bytes must be memory_bytes - kv_bytes")
        if self.device not in get_args(NodeDevice):
            raise ValueError(f"node {self.name!r}: device must be auto, cuda or cpu")
        object.__setattr__(self, "labels", types.MappingProxyType(dict(self.labels)))

    @property
    def rack(self) -> str | None:
        return self.labels.get("rack")

    @property
    def zone(self) -> str | None:
        return self.labels.get("zone")

    @property
    def region(self) -> str | None:
        return self.labels.get("region")


@dataclass(frozen=True)
class PairLink:
    """An explicit link between two named nodes (order does not matter)."""

    nodes: tuple[str, str]
    link: Link


@dataclass(frozen=True)
class LinkRules:
    """How `Topology.link` resolves a pair: pairs > same_rack > same_zone > same_region > default."""

    default: Link
    same_rack: Link | None = None
    same_zone: Link | None = None
    same_region: Link | None = None
    pairs: tuple[PairLink, ...] = ()


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: tuple[Node, ...]
    links: LinkRules
    reference_tflops: float | None = None
    """Effective expert-GEMM TFLOP/s of a speed-1.0 node (None: the planner's default, or
    measured on this machine for the embedded cluster)."""
    call_overhead_us: float | None = None
    """Fixed cost of one expert dispatch call (pack, send, wake the shard, collect the reply)
    beyond link latency and bytes, which the attention side pays once per node it calls in a
    layer: measured by the rig's calibration (`expertmesh rig up`); None: the planner counts
    none."""
    _by_name: Mapping[str, Node] = field(init=False, repr=False, compare=False, hash=False)
    _pairs: Mapping[frozenset[str], Link] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_name = {n.name: n for n in self.nodes}
        if not self.nodes or len(by_name) != len(self.nodes):
            raise ValueError("a topology needs at least one node and unique node names")
        if not any(n.attention for n in self.nodes):
            raise ValueError("a topology needs at least one node with attention=True")
        pairs = {}
        for pair in self.links.pairs:
            unknown = [n for n in pair.nodes if n not in by_name]
            if unknown or pair.nodes[0] == pair.nodes[1]:
                raise ValueError(f"pair link {pair.nodes} must join two distinct known nodes")
            pairs[frozenset(pair.nodes)] = pair.link
        object.__setattr__(self, "_by_name", types.MappingProxyType(by_name))
        object.__setattr__(self, "_pairs", types.MappingProxyType(pairs))

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"unknown node {name!r}; known nodes: {', '.join(self._by_name)}"
            ) from None

    def link(self, a: str, b: str) -> Link:
        """The link between nodes `a` and `b` (symmetric)."""
        node_a, node_b = self.node(a), self.node(b)
        if a == b:
            return IN_PROCESS
        explicit = self._pairs.get(frozenset((a, b)))
        if explicit is not None:
            return explicit
        rules = self.links
        for label, link in (
            ("rack", rules.same_rack),
            ("zone", rules.same_zone),
            ("region", rules.same_region),
        ):
            shared = node_a.labels.get(label)
            if link is not None and shared is not None and shared == node_b.labels.get(label):
                return link
        return rules.default

    @property
    def attention_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.attention)

    @property
    def nodes_to_measure(self) -> tuple[str, ...]:
        """Names of the nodes whose speed is "measure" (None) and not yet filled in."""
        return tuple(n.name for n in self.nodes if n.speed is None)

    def racks(self) -> dict[str, list[str]]:
        """Rack label -> node names, in node order; unlabelled nodes go to rack "default"."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            out.setdefault(n.rack or DEFAULT_RACK, []).append(n.name)
        return out

    def with_speeds(self, speeds_by_node: Mapping[str, float]) -> Topology:
        """A copy with the given speeds (typically measured at start-up) filled in."""
        problems = []
        for name, speed in speeds_by_node.items():
            if name not in self._by_name:
                problems.append(
                    f"speeds[{name!r}]: unknown node {name!r}; known nodes: "
                    f"{', '.join(self._by_name)}"
                )
            elif isinstance(speed, bool) or not (
                isinstance(speed, int | float) and speed > 0 and math.isfinite(speed)
            ):
                problems.append(
                    f"speeds[{name!r}]: speed must be a finite number > 0; got {speed!r}"
                )
        if problems:
            raise TopologyError(problems)
        nodes = tuple(
            replace(n, speed=float(speeds_by_node[n.name])) if n.name in speeds_by_node else n
            for n in self.nodes
        )
        return replace(self, nodes=nodes)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (version 1); `parse_topology(t.to_dict()) == t`."""

        def link_dict(link: Link) -> dict[str, float]:
            return {"bandwidth_gbps": link.bandwidth_gbps, "latency_us": link.latency_us}

        links: dict[str, Any] = {"default": link_dict(self.links.default)}
        for key in ("same_rack", "same_zone", "same_region"):
            link = getattr(self.links, key)
            if link is not None:
                links[key] = link_dict(link)
        if self.links.pairs:
            links["pairs"] = [
                {"nodes": list(p.nodes), **link_dict(p.link)} for p in self.links.pairs
            ]
        out: dict[str, Any] = {"version": SCHEMA_VERSION, "name": self.name}
        if self.reference_tflops is not None:
            out["reference_tflops"] = self.reference_tflops
        if self.call_overhead_us is not None:
            out["call_overhead_us"] = self.call_overhead_us
        return out | {
            "nodes": [
                {
                    "name": n.name,
                    "kind": n.kind,
                    "speed": "measure" if n.speed is None else n.speed,
                    "memory_gb": n.memory_bytes / BYTES_PER_GB,
                    # Clamped: kv_bytes was rounded, so the ratio can exceed the limit by an ulp.
                    "kv_fraction": min(n.kv_bytes / n.memory_bytes, MAX_KV_FRACTION),
                    "labels": dict(n.labels),
                    "attention": n.attention,
                    "device": n.device,
                }
                for n in self.nodes
            ],
            "links": links,
        }


# ---------------------------------------------------------------------------------------------
# Edge schema: pydantic models for what the user writes.
# ---------------------------------------------------------------------------------------------


def _speed(value: object) -> float | Literal["measure"]:
    if value == "measure":
        return "measure"
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    ):
        return float(value)
    raise ValueError(
        f"must be a number > 0 (1.0 = reference node) or the string 'measure'; got {value!r}"
    )


def _node_name(value: object) -> str:
    if isinstance(value, str) and _DNS_LABEL.match(value):
        return value
    hint = ""
    if isinstance(value, str):
        suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63].strip("-")
        hint = f", e.g. {suggestion!r}" if suggestion else ""
    raise ValueError(
        f"invalid node name {value!r}; use a DNS label: lowercase letters, digits and '-', "
        f"starting and ending with a letter or digit, at most 63 characters{hint}"
    )


Speed = Annotated[float | Literal["measure"], PlainValidator(_speed)]
NodeName = Annotated[str, PlainValidator(_node_name)]
Gbps = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Microseconds = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkSpec(_Spec):
    bandwidth_gbps: Gbps
    latency_us: Microseconds


class PairSpec(_Spec):
    nodes: list[Annotated[str, Field(strict=True)]] = Field(min_length=2, max_length=2)
    bandwidth_gbps: Gbps
    latency_us: Microseconds


class LinksSpec(_Spec):
    default: LinkSpec
    same_rack: LinkSpec | None = None
    same_zone: LinkSpec | None = None
    same_region: LinkSpec | None = None
    pairs: list[PairSpec] = []


class NodeSpec(_Spec):
    name: NodeName
    kind: NodeKind
    speed: Speed
    memory_gb: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
    kv_fraction: Annotated[
        float, Field(ge=0, le=MAX_KV_FRACTION, allow_inf_nan=False, strict=True)
    ] = 0.3
    labels: dict[
        Annotated[str, Field(strict=True)], Annotated[str, Field(min_length=1, strict=True)]
    ] = {}
    attention: Annotated[bool, Field(strict=True)] = False
    device: NodeDevice = "auto"


class TopologySpec(_Spec):
    version: Literal[1]
    name: Annotated[str, Field(min_length=1, strict=True)]
    reference_tflops: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = None
    call_overhead_us: Microseconds | None = None
    nodes: list[NodeSpec] = Field(min_length=1)
    links: LinksSpec


# ---------------------------------------------------------------------------------------------
# Validation errors -> `<field path>: <message>` lines.
# ---------------------------------------------------------------------------------------------


def _override(kind: str, loc: Loc, value: Any) -> str | None:
    """Topology wording where the shared messages would be vaguer."""
    if kind == "too_short" and loc == ("nodes",):
        return "needs at least one node; add an entry under `nodes:`"
    if kind in ("too_short", "too_long") and loc[-1:] == ("nodes",):
        return f"must name exactly two nodes, e.g. [a, b]; got {value!r}"
    if kind == "int_type":
        return f"must be a finite number; got {value!r}"
    if kind == "literal_error" and loc[-1:] == ("device",):
        hint = " (a GPU is cuda)" if value == "gpu" else ""
        return (
            "must be auto (CUDA when this node's Ray node has a GPU), cuda or cpu; "
            f"got {value!r}{hint}"
        )
    return None


def _cross_check(spec: TopologySpec) -> list[Problem]:
    """Problems that span fields: duplicate names, pairs naming unknown or repeated nodes."""
    problems: list[Problem] = []
    first_use: dict[str, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.name in first_use:
            problems.append(
                (
                    ("nodes", i, "name"),
                    f"duplicate node name {node.name!r} (also nodes[{first_use[node.name]}]); "
                    "node names must be unique",
                )
            )
        else:
            first_use[node.name] = i
    known = ", ".join(first_use)
    seen_pairs: dict[frozenset[str], int] = {}
    for i, pair in enumerate(spec.links.pairs):
        loc: tuple[int | str, ...] = ("links", "pairs", i, "nodes")
        unknown = [n for n in pair.nodes if n not in first_use]
        for name in unknown:
            problems.append((loc, f"unknown node {name!r}; known nodes: {known}"))
        if unknown:
            continue
        a, b = pair.nodes
        key = frozenset(pair.nodes)
        if a == b:
            problems.append(
                (
                    loc,
                    f"node {a!r} paired with itself; a node's link to itself is in-process, "
                    "remove this pair",
                )
            )
        elif key in seen_pairs:
            problems.append(
                (
                    loc,
                    f"pair {a!r}-{b!r} already given at links.pairs[{seen_pairs[key]}]; "
                    "give each pair once",
                )
            )
        else:
            seen_pairs[key] = i
    return problems


def _link(spec: LinkSpec | PairSpec) -> Link:
    return Link(bandwidth_gbps=float(spec.bandwidth_gbps), latency_us=float(spec.latency_us))


def _build(spec: TopologySpec) -> Topology:
    # If no node asks for attention, the first node runs it (documented default).
    any_attention = any(n.attention for n in spec.nodes)
    nodes = []
    for i, n in enumerate(spec.nodes):
        memory_bytes = round(n.memory_gb * BYTES_PER_GB)
        kv_bytes = round(memory_bytes * n.kv_fraction)
        nodes.append(
            Node(
                name=n.name,
                kind=n.kind,
                speed=None if n.speed == "measure" else float(n.speed),
                memory_bytes=memory_bytes,
                kv_bytes=kv_bytes,
                weight_bytes=memory_bytes - kv_bytes,
                labels=dict(n.labels),
                attention=n.attention or (not any_attention and i == 0),
                device=n.device,
            )
        )
    links = spec.links
    rules = LinkRules(
        default=_link(links.default),
        same_rack=_link(links.same_rack) if links.same_rack else None,
        same_zone=_link(links.same_zone) if links.same_zone else None,
        same_region=_link(links.same_region) if links.same_region else None,
        pairs=tuple(PairLink((p.nodes[0], p.nodes[1]), _link(p)) for p in links.pairs),
    )
    return Topology(
        name=spec.name,
        nodes=tuple(nodes),
        links=rules,
        reference_tflops=spec.reference_tflops,
        call_overhead_us=None if spec.call_overhead_us is None else float(spec.call_overhead_us),
    )


def _validate(data: object, source: str | None, root: yaml.Node | None = None) -> Topology:
    problems: list[Problem]
    if not isinstance(data, Mapping):
        keys = ", ".join(TopologySpec.model_fields)
        problems = [((), f"must be a mapping with keys: {keys}; got {type(data).__name__}")]
    else:
        try:
            spec = TopologySpec.model_validate(data)
        except ValidationError as exc:
            problems = [
                describe_error(e, TopologySpec, schema_version=SCHEMA_VERSION, override=_override)
                for e in exc.errors()
            ]
        else:
            problems = _cross_check(spec)
            if not problems:
                return _build(spec)
    raise TopologyError(problem_lines(problems, root), source)


def parse_topology(data: Mapping[str, Any]) -> Topology:
    """Validate a topology given as a dict (the parsed YAML) and build it."""
    return _validate(data, source=None)


# ---------------------------------------------------------------------------------------------
# YAML files.
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}; each key may appear once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_topology(path: str | Path) -> Topology:
    """Read, validate and build the topology in the YAML file at `path`."""
    path = Path(path)
    loader = _StrictLoader(path.read_text(encoding="utf-8"))
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError([f"{where}: invalid YAML: {problem}"], str(path)) from None
    finally:
        loader.dispose()
    return _validate(data, source=str(path), root=root)
