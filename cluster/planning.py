"""From what users give us (a topology YAML, a checkpoint, a routing trace) to the planner's
inputs, and back to something printable: the glue between `topology`, the model core and
`placement`.

A routing trace is the JSON that `RouterStats.to_dict()` writes (`expertmesh generate
--record-trace FILE`): {"num_experts": E, "layers": {"<layer>": [tokens per expert]}}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from expertmesh.models.config import ModelConfig

from .placement import (
    ExpertShape,
    NodeCapacity,
    Placement,
    PlacementOptions,
    eplb_placement,
    evaluate,
    plan_placement,
)
from .placement_model import build_placement, cost_model, token_load
from .topology import Topology


class TraceError(ValueError):
    """A routing trace file does not fit the model."""


def expert_shape(config: ModelConfig, dtype_bytes: int = 2) -> ExpertShape:
    return ExpertShape(
        num_layers=len(config.moe_layer_ids),
        num_experts=config.moe.num_experts,
        top_k=config.moe.top_k,
        hidden_size=config.hidden_size,
        expert_bytes=3 * config.hidden_size * config.moe.expert_intermediate * dtype_bytes,
        dtype_bytes=dtype_bytes,
    )


def node_capacities(
    topology: Topology, shape: ExpertShape, measured: Mapping[str, Any] | None = None
) -> list[NodeCapacity]:
    """Expert slots each node's weight memory holds; link = the node's link to the attention
    node. measured: node -> a profile of its real layer calls (`cluster/profile.py`
    `NodeCost`: call_us, token_us), which replaces the cost the planner would model."""
    head = topology.attention_nodes[0].name
    caps = []
    for node in topology.nodes:
        link = topology.link(head, node.name)
        cost = (measured or {}).get(node.name)
        caps.append(
            NodeCapacity(
                name=node.name,
                speed=node.speed if node.speed is not None else 1.0,
                expert_slots=int(node.weight_bytes // shape.expert_bytes),
                link_gbps=link.bandwidth_gbps,  # inf: the attention node's own process
                link_latency_us=link.latency_us,
                rack=node.rack or "",
                measured_token_us=None if cost is None else float(cost.token_us),
                measured_call_us=None if cost is None else float(cost.call_us),
            )
        )
    return caps


def load_trace(path: str | Path, config: ModelConfig) -> np.ndarray:
    """(num MoE layers, num experts) token counts from a trace file, checked against the model."""
    try:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TraceError(f"routing trace {path}: cannot read it ({e})") from e
    if raw.get("num_experts") != config.moe.num_experts:
        raise TraceError(
            f"routing trace {path}: num_experts is {raw.get('num_experts')}, the model has "
            f"{config.moe.num_experts}; record the trace with this model"
        )
    layers = raw.get("layers", {})
    load = np.ones((len(config.moe_layer_ids), config.moe.num_experts))
    for i, layer in enumerate(config.moe_layer_ids):
        counts = layers.get(str(layer))
        if counts is not None:
            if len(counts) != config.moe.num_experts:
                raise TraceError(
                    f"routing trace {path}: layers.{layer} has {len(counts)} counts, expected {config.moe.num_experts}"
                )
            load[i] = np.asarray(counts, dtype=float)
    return load


def planner_inputs(
    topology: Topology,
    config: ModelConfig,
    min_replicas: int = 1,
    rack_local: bool = False,
    dtype_bytes: int = 2,
    reference_tflops: float | None = None,
    colocate: bool = False,
    tokens_per_step: int | None = None,
    measured: Mapping[str, Any] | None = None,
) -> tuple[list[NodeCapacity], ExpertShape, PlacementOptions]:
    """What the planner reads for a model on a topology (see `plan_for_topology`)."""
    shape = expert_shape(config, dtype_bytes)
    nodes = node_capacities(topology, shape, measured)
    options = PlacementOptions(
        min_replicas=min_replicas,
        rack_local=rack_local,
        call_overhead_us=topology.call_overhead_us or 0.0,
        colocate=colocate,
    )
    if tokens_per_step is not None:
        options = replace(options, tokens_per_step=tokens_per_step)
    tflops = reference_tflops or topology.reference_tflops
    if tflops is not None:
        options = replace(options, reference_tflops=tflops)
    return nodes, shape, options


def plan_for_topology(
    topology: Topology,
    config: ModelConfig,
    trace: np.ndarray | None = None,
    min_replicas: int = 1,
    rack_local: bool = False,
    dtype_bytes: int = 2,
    reference_tflops: float | None = None,
    colocate: bool = False,
    tokens_per_step: int | None = None,
    measured: Mapping[str, Any] | None = None,
) -> Placement:
    """Plan expert placement for a model on a topology; keys of the result use model layer ids.

    reference_tflops: effective TFLOP/s of a speed-1.0 node; default the topology's
    `reference_tflops`, else the planner's GPU-class default. colocate: the attention node's
    experts run in the attention worker's process (`cluster/colocated.py`). tokens_per_step:
    the decode batch to plan for (default the planner's). measured: node -> profiled call
    costs (`cluster/profile.py`).
    """
    nodes, shape, options = planner_inputs(
        topology,
        config,
        min_replicas,
        rack_local,
        dtype_bytes,
        reference_tflops,
        colocate,
        tokens_per_step,
        measured,
    )
    placement = plan_placement(nodes, shape, trace, options)
    return placement.with_layer_ids(config.moe_layer_ids)


BASELINES = ("eplb", "attention_only")
"""The placements `baseline_placement` builds, that ours is compared with."""


def baseline_placement(
    kind: str,
    topology: Topology,
    config: ModelConfig,
    trace: np.ndarray | None = None,
    dtype_bytes: int = 2,
    reference_tflops: float | None = None,
    colocate: bool = False,
    tokens_per_step: int | None = None,
    measured: Mapping[str, Any] | None = None,
) -> Placement:
    """A baseline placement on the topology, keyed by model layer ids:

    - `eplb`: DeepSeek's EPLB (`cluster/eplb.py`, global policy) with every node that has
      expert slots as one of its GPUs, ceil(experts / GPUs) slots on each in every layer (no
      redundant experts, vLLM's default `num_redundant_experts=0`); tokens split evenly over
      replicas. It may not fit a small node's slots: `evaluate(...)["slots_over"]` says.
    - `attention_only`: every expert once, on the (first) attention node.
    """
    nodes, shape, options = planner_inputs(
        topology,
        config,
        dtype_bytes=dtype_bytes,
        reference_tflops=reference_tflops,
        colocate=colocate,
        tokens_per_step=tokens_per_step,
        measured=measured,
    )
    L, E = shape.num_layers, shape.num_experts
    load = token_load(trace, shape, options)
    if kind == "attention_only":
        head = [n.name for n in nodes].index(topology.attention_nodes[0].name)
        cost = cost_model(nodes, shape, options)
        layer, expert = np.repeat(np.arange(L), E), np.tile(np.arange(E), L)
        node, share = np.full(L * E, head), np.ones(L * E)
        placement = build_placement(nodes, shape, options, cost, load, layer, expert, node, share)
    elif kind == "eplb":
        with_slots = sum(1 for n in nodes if n.expert_slots > 0)
        per_gpu = -(-E // max(with_slots, 1))  # no redundant experts: vLLM's default
        placement = eplb_placement(load, nodes, shape, options, per_gpu)
    else:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    return placement.with_layer_ids(config.moe_layer_ids)


def compare_for_topology(
    topology: Topology,
    config: ModelConfig,
    ours: Placement,
    trace: np.ndarray | None = None,
    dtype_bytes: int = 2,
    reference_tflops: float | None = None,
    colocate: bool = False,
    tokens_per_step: int | None = None,
    measured: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Ours and every baseline scored by one cost model (the topology's, measured figures where
    it has them): {name: {predicted_step_s, balancedness, nodes_used, slots_over}}."""
    nodes, shape, options = planner_inputs(
        topology,
        config,
        dtype_bytes=dtype_bytes,
        reference_tflops=reference_tflops,
        colocate=colocate,
        tokens_per_step=tokens_per_step,
        measured=measured,
    )
    placements = {"ours": ours}
    for kind in BASELINES:
        placements[kind] = baseline_placement(
            kind,
            topology,
            config,
            trace,
            dtype_bytes,
            reference_tflops,
            colocate,
            tokens_per_step,
            measured,
        )
    out: dict[str, dict[str, Any]] = {}
    for name, p in placements.items():
        ev = evaluate(p.by_index(config.moe_layer_ids), nodes, shape, trace, options)
        out[name] = {
            "predicted_step_s": ev["step_time_s"],
            "balancedness": ev["balancedness"],
            "nodes_used": sorted(n for n, k in ev["slots_used"].items() if k > 0),
            "slots_over": ev["slots_over"],
        }
    return out


def embedded_reference_tflops(topology: Topology) -> float:
    """Reference TFLOP/s on the embedded cluster: this machine runs the fastest node at full
    speed and emulates the others slower, so a speed-1.0 node gets machine / fastest speed."""
    from .shard import SHARD_THREADS, measure_gflops

    fastest = max((n.speed or 1.0) for n in topology.nodes)
    return measure_gflops(512, 3, threads=SHARD_THREADS) / 1000.0 / fastest
