"""The expert-parallel model: attention, norms and routers here; experts on shards.

    with ExpertParallelModel.launch("ckpt/", topology) as ep:
        Generator(ep.model, tokenizer).generate(["Hello"])

`launch` starts the embedded cluster for the topology (or joins a running Ray cluster with
`local=False`), plans the placement from the topology and an optional routing trace, starts
one `ExpertShard` actor per node holding that node's experts, and returns a model whose MoE
layers dispatch to them. Its outputs equal the single-process model's on the same checkpoint.

Devices: each node's `device` (auto|cuda|cpu) decides where its shards compute and, for the
attention node, where this process holds the model and its KV cache (`cluster/devices.py`);
dtype "auto" is bf16 on a GPU and float32 on the CPU, per process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expertmesh.models.checkpoint import load_model, read_config
from expertmesh.models.config import ModelConfig
from expertmesh.models.device import HostStaging, dtype_for
from expertmesh.models.model import MoEModel

from .dispatch import (
    Dispatcher,
    RemoteExpertBank,
    Replica,
    RoutingTable,
    ShardPool,
    routes_from_placement,
)
from .placement import PlacementOptions

DEFAULT_TFLOPS = PlacementOptions().reference_tflops


def attach_dispatcher(model: MoEModel, dispatcher: Dispatcher) -> MoEModel:
    """Swap every MoE layer's local ExpertBank for one that dispatches to shards, and let
    forward passes pipeline two micro-batches when measured to help (`cluster/overlap.py`;
    `model.overlap_policy.mode` = auto | on | off)."""
    from .overlap import install_overlap

    staging = HostStaging()  # one set of pinned buffers for all layers (used only on a GPU)
    for block in model.blocks:
        if block.moe is not None:
            block.moe.experts = RemoteExpertBank(
                block.layer, model.config.moe.num_experts, dispatcher, staging
            )  # type: ignore[assignment]
    install_overlap(model, dispatcher)
    return model


def measure_node_speeds(nodes: Sequence[str]) -> dict[str, float]:
    """Relative GEMM speed of each node on a real cluster (fastest = 1.0), one probe task each."""
    import ray

    from .pool import node_resource
    from .shard import measure_gflops

    probe = ray.remote(num_cpus=0)(measure_gflops)
    refs = {n: probe.options(resources={node_resource(n): 0.001}).remote() for n in nodes}
    gflops = {n: float(ray.get(r)) for n, r in refs.items()}
    fastest = max(gflops.values())
    return {n: g / fastest for n, g in gflops.items()}


def attention_model(
    checkpoint: str | Path, dtype: str = "float32", device: torch.device | str = "cpu"
) -> MoEModel:
    """The model without routed-expert weights (what an attention worker holds), on `device`
    (dtype "auto": bf16 on a GPU, float32 on the CPU)."""
    config = read_config(checkpoint)
    dev = torch.device(device)
    experts: dict[int, list[int]] = {layer: [] for layer in config.moe_layer_ids}
    return load_model(checkpoint, dtype_for(dev, dtype), expert_ids=experts, device=dev)


class ExpertParallelModel:
    """A model whose experts run on shards, plus the handles to manage them."""

    def __init__(
        self,
        model: MoEModel,
        dispatcher: Dispatcher,
        pool: ShardPool,
        placement: Any = None,
        cluster: Any = None,
    ) -> None:
        self.model = model
        self.dispatcher = dispatcher
        self.pool = pool
        self.placement = placement
        self.cluster = cluster
        self.plan_options = PlacementOptions()
        """The options the placement was planned with (the rebalancer plans with them too)."""
        self.topology: Any = None
        """The topology the placement was planned on (measured figures on a rig)."""
        self.node_costs: dict[str, Any] = {}
        """node -> `NodeCost` when launched with `profile` (the planner read them)."""

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @classmethod
    def from_routes(
        cls,
        checkpoint: str | Path,
        routes: Mapping[tuple[int, int], Sequence[Replica]],
        pool: ShardPool,
        dtype: str = "float32",
        placement: Any = None,
        cluster: Any = None,
        tracer: Any = None,
        device: torch.device | str = "cpu",
    ) -> ExpertParallelModel:
        model = attention_model(checkpoint, dtype, device)
        dispatcher = Dispatcher(
            RoutingTable(routes), pool, model.config.moe.num_experts, tracer=tracer
        )
        attach_dispatcher(model, dispatcher)
        return cls(model, dispatcher, pool, placement, cluster)

    @classmethod
    def launch(
        cls,
        checkpoint: str | Path,
        topology: Any,
        trace: np.ndarray | None = None,
        dtype: str = "auto",
        local: bool = True,
        emulate: bool | None = None,
        min_replicas: int = 1,
        tracer: Any = None,
        telemetry_config: Mapping[str, Any] | None = None,
        colocate: bool = False,
        tokens_per_step: int | None = None,
        profile: bool = False,
    ) -> ExpertParallelModel:
        """Start (`local`) or join the cluster, plan, start shards, and return the model.

        emulate: emulate node speeds and links (None: when `local`; pass True when joining
        the embedded cluster that `expertmesh up` started). dtype "auto": bf16 where a node
        computes on a GPU, float32 on the CPU. colocate: the attention node's experts run in
        this process (`cluster/colocated.py`: no call, no standby; its shard cannot be killed
        alone), and the planner knows it. tokens_per_step: the decode batch to plan for.
        profile: once the shards are up, measure real layer calls on every node, plan again on
        those costs and move the experts there (`cluster/profile.py`)."""
        emulate = local if emulate is None else emulate
        import ray

        from .devices import attention_device, gpus_offered
        from .local import LocalCluster, emulation_for
        from .planning import embedded_reference_tflops, plan_for_topology
        from .pool import RayShardPool, node_resource
        from .transport import CHANNEL_SPIN_US

        config = read_config(checkpoint)
        cluster = None
        if local:
            cluster = LocalCluster(topology)
            cluster.start()
        elif topology.nodes_to_measure:
            topology = topology.with_speeds(measure_node_speeds(topology.nodes_to_measure))
        tflops = None
        if emulate and topology.reference_tflops is None:
            tflops = embedded_reference_tflops(topology)  # what the emulated nodes really do
        placement = plan_for_topology(
            topology,
            config,
            trace,
            min_replicas=min_replicas,
            reference_tflops=tflops,
            colocate=colocate,
            tokens_per_step=tokens_per_step,
        )
        options = PlacementOptions(
            min_replicas=min_replicas,
            reference_tflops=tflops or topology.reference_tflops or DEFAULT_TFLOPS,
            call_overhead_us=topology.call_overhead_us or 0.0,
            colocate=colocate,
            tokens_per_step=tokens_per_step or PlacementOptions.tokens_per_step,
        )
        routes = routes_from_placement(placement)
        held = RoutingTable(routes).node_experts()
        # Every node gets a shard, the ones the plan leaves empty too: failover and rebalancing
        # move experts onto them without starting actors first.
        assignment = {n.name: held.get(n.name, {}) for n in topology.nodes}
        head = topology.attention_nodes[0]
        try:
            device = attention_device(
                head.device, head.name, gpus_offered(node_resource(head.name), ray.nodes())
            )
            remote = {n: e for n, e in assignment.items() if not (colocate and n == head.name)}
            pool: ShardPool = RayShardPool(
                str(checkpoint),
                remote,
                dtype,
                emulation_for(topology) if emulate else None,
                telemetry=telemetry_config,
                devices={n.name: n.device for n in topology.nodes},
                # Poll for replies where the shards have CPUs of their own (not emulated).
                spin_us=0.0 if emulate else CHANNEL_SPIN_US,
            )
            if colocate:
                from .colocated import ColocatedPool, local_shard

                shard = local_shard(
                    head.name, str(checkpoint), assignment[head.name], dtype, str(device)
                )
                pool = ColocatedPool(pool, head.name, shard)
        except Exception:
            if cluster is not None:
                cluster.stop()
            raise
        ep = cls.from_routes(
            checkpoint, routes, pool, dtype, placement, cluster, tracer, device=device
        )
        ep.plan_options = options
        ep.topology = topology
        if profile:
            from .profile import profile_layer_calls, replan_measured

            try:
                costs = profile_layer_calls(ep, [n.name for n in topology.nodes])
                replan_measured(ep, costs, trace)
            except Exception:
                ep.shutdown()
                raise
        return ep

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> ExpertParallelModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
