"""Expert shards: the experts assigned to one node, held by one Ray actor on that node.

A shard reads its own experts from the checkpoint (`load_expert_bank` reads only those
tensors), so expert weights never travel through the driver. It answers one call per layer
per step: "run these token rows through these experts" and returns unweighted outputs; the
dispatcher weights and combines them.

A shard computes on its node's device (`device`: cpu, cuda or auto; the pool settles it from
Ray's node table, `cluster/devices.py`): on a GPU its experts are there (bf16 unless a dtype
is given) and each call's rows cross host <-> device once, through pinned buffers.

On the embedded single-machine cluster a shard *emulates* its node: it sleeps so that its
compute appears `reference_speed / speed` times slower, and so that the bytes it receives and
returns appear to cross its node's Ethernet link (latency + bytes / bandwidth). On a real
cluster emulation is off and nothing sleeps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from expertmesh.models.checkpoint import load_expert_bank
from expertmesh.models.device import HostStaging, dtype_for, resolve_device
from expertmesh.models.model import ExpertBank

from .wire import Packed, ShardRequest, pack, unpack


@dataclass(frozen=True)
class NodeEmulation:
    """How one node differs from the machine the embedded cluster really runs on."""

    slowdown: float = 1.0
    """Compute takes this many times longer than measured (reference speed / node speed)."""
    link_gbps: float = float("inf")
    link_latency_us: float = 0.0

    def link_s(self, nbytes: int) -> float:
        if self.link_gbps == float("inf"):
            return self.link_latency_us * 1e-6
        return self.link_latency_us * 1e-6 + nbytes * 8 / (self.link_gbps * 1e9)


@dataclass
class ShardReply:
    """What one `compute` call returns: outputs and where the time went."""

    outputs: np.ndarray | Packed
    """(n, hidden) unweighted expert outputs in request order: float32 for `compute`, packed
    in the request's wire format for `compute_request`."""
    compute_s: float
    emulated_compute_s: float
    emulated_link_s: float
    arrived_at: float | None = None
    """`time.perf_counter()` when the reply reached the attention worker's host (the channel
    transport's kernel receive timestamp), not when it was read; None: time it on reading."""


@dataclass
class ShardStatus:
    node: str
    pid: int
    experts: dict[int, list[int]]
    calls: int
    tokens: int
    started_at: float
    last_call_at: float
    restarts_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


log = logging.getLogger("expertmesh.shard")

SHARD_THREADS = 1
"""Torch threads per shard actor (one Ray CPU each on the embedded cluster)."""


class ExpertShard:
    """The state and work of one shard. Wrapped as a Ray actor by `shard_actor_class()`;
    usable in-process too (unit tests, single-node runs)."""

    def __init__(
        self,
        node: str,
        checkpoint: str,
        experts: Mapping[int, Sequence[int]],
        dtype: str = "float32",
        emulation: NodeEmulation | None = None,
        torch_threads: int = SHARD_THREADS,
        telemetry: Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.tracer: Any = None
        self._telemetry: Any = None
        if telemetry and telemetry.get("exporter", "none") != "none":
            # Spans only: metrics are the attention worker's (it sees every dispatch).
            from expertmesh.observability import TelemetryConfig, configure_telemetry

            spans_only = {k: v for k, v in telemetry.items() if not k.startswith("metrics")}
            self._telemetry = configure_telemetry(TelemetryConfig(**spans_only))
            self.tracer = self._telemetry.tracer
        if telemetry is not None:  # JSON logs beside the other processes' ($EXPERTMESH_HOME)
            from expertmesh.observability.logs import configure_json_logging

            configure_json_logging(None, f"shard-{node}")
        self.node = node
        self.checkpoint = checkpoint
        self.device = resolve_device(device, node)
        self.dtype = dtype_for(self.device, dtype)  # "auto": bf16 on CUDA, float32 on the CPU
        self._staging = HostStaging()
        self.emulation = emulation or NodeEmulation()
        self.banks: dict[int, ExpertBank] = {}
        self._membership = threading.Lock()  # load / drop / ensure, one at a time
        for layer, ids in experts.items():
            if ids:
                self.banks[layer] = load_expert_bank(
                    checkpoint, layer, ids, self.dtype, self.device
                )
        log.info(
            "shard up on %s with %d experts",
            node,
            sum(len(ids) for ids in experts.values()),
            extra={"node": node},
        )
        self.calls = 0
        self.tokens = 0
        self.started_at = time.time()
        self.last_call_at = 0.0
        self._channel: Any = None

    # --------------------------------------------------------------- membership

    def experts(self) -> dict[int, list[int]]:
        return {layer: list(bank.expert_ids) for layer, bank in self.banks.items()}

    def load(self, layer: int, ids: Sequence[int]) -> list[int]:
        """Add experts of one layer (read from the checkpoint); returns the layer's expert ids."""
        with self._membership:
            return self._load(layer, ids)

    def _load(self, layer: int, ids: Sequence[int]) -> list[int]:
        have = set(self.banks[layer].expert_ids) if layer in self.banks else set()
        want = have | set(ids)
        if want != have:
            self.banks[layer] = load_expert_bank(
                self.checkpoint, layer, sorted(want), self.dtype, self.device
            )
        return sorted(want)

    def drop(self, layer: int, ids: Sequence[int]) -> list[int]:
        """Forget experts of one layer; returns the layer's remaining expert ids."""
        with self._membership:
            return self._drop(layer, ids)

    def _drop(self, layer: int, ids: Sequence[int]) -> list[int]:
        if layer not in self.banks:
            return []
        keep = sorted(set(self.banks[layer].expert_ids) - set(ids))
        if not keep:
            del self.banks[layer]
            return []
        bank = self.banks[layer]
        if set(bank.state_dict()) != {"gate_up", "down"}:  # e.g. int8 experts with scales
            self.banks[layer] = load_expert_bank(
                self.checkpoint, layer, keep, self.dtype, self.device
            )
            return keep
        slots = [bank.slot_of[e] for e in keep]
        with torch.device("meta"):
            smaller = ExpertBank(layer, bank.gate_up.shape[2], _moe_cfg(bank), bank.act, keep)
        smaller = smaller.to_empty(device=bank.gate_up.device).to(bank.gate_up.dtype)
        with torch.no_grad():
            smaller.gate_up.copy_(bank.gate_up[slots])
            smaller.down.copy_(bank.down[slots])
        self.banks[layer] = smaller
        return keep

    def ensure(self, experts: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """Make this shard hold exactly `experts` (after a restart or a rebalance)."""
        with self._membership:
            return self._ensure(experts)

    def _ensure(self, experts: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        for layer in list(self.banks):
            extra = set(self.banks[layer].expert_ids) - set(experts.get(layer, ()))
            if extra:
                self._drop(layer, sorted(extra))
        for layer, ids in experts.items():
            if ids:
                self._load(layer, ids)
        return self.experts()

    # --------------------------------------------------------------- work

    def compute(
        self,
        layer: int,
        x: np.ndarray,
        expert_ids: np.ndarray,
        trace: Mapping[str, str] | None = None,
    ) -> ShardReply:
        """Rows `x` (n, hidden) through experts `expert_ids` (n,), outputs in the same order.
        `trace`: the dispatcher's W3C trace context; the shard's span continues that trace."""
        if self.tracer is None or not trace:
            return self._compute(layer, x, expert_ids)
        from opentelemetry import propagate

        with self.tracer.start_as_current_span(
            "expertmesh.shard.compute",
            context=propagate.extract(dict(trace)),
            attributes={
                "expertmesh.node": self.node,
                "expertmesh.layer": layer,
                "expertmesh.rows": len(expert_ids),
            },
        ):
            return self._compute(layer, x, expert_ids)

    def _compute(self, layer: int, x: np.ndarray, expert_ids: np.ndarray) -> ShardReply:
        ids = torch.from_numpy(np.ascontiguousarray(expert_ids, dtype=np.int64))
        xs = torch.from_numpy(np.array(x, copy=True)).to(self.dtype)
        xs = self._staging.to_device(xs, self.device)  # the same tensor on the CPU
        out, timings = self._expert_rows(layer, xs, ids, 2 * x.nbytes)  # fp32 rows out and back
        return ShardReply(out.to(torch.float32).cpu().numpy(), *timings)

    def _expert_rows(
        self, layer: int, xs: torch.Tensor, ids: torch.Tensor, link_bytes: int
    ) -> tuple[torch.Tensor, tuple[float, float, float]]:
        """Rows `xs` (n, hidden) through experts `ids` (n,): outputs in the same order, and
        (compute_s, emulated_compute_s, emulated_link_s); sleeps when emulating a node
        (`link_bytes`: what crossed its link both ways)."""
        t0 = time.perf_counter()
        bank = self.banks.get(layer)
        if bank is None:
            from expertmesh.models.errors import ExpertNotLoaded

            raise ExpertNotLoaded(layer, sorted(set(ids.tolist())))
        order = torch.argsort(ids, stable=True).to(xs.device)  # no-op on the CPU
        counts = torch.bincount(ids, minlength=bank.num_experts).tolist()
        with torch.inference_mode():
            out_sorted = bank.expert_outputs(xs[order], counts)
            out = torch.empty_like(out_sorted)
            out[order] = out_sorted
        compute_s = time.perf_counter() - t0
        timings = self._emulate(compute_s, link_bytes)
        self.calls += 1
        self.tokens += int(ids.numel())
        self.last_call_at = time.time()
        return out, timings

    def _emulate(self, compute_s: float, nbytes: int) -> tuple[float, float, float]:
        emu = self.emulation
        extra_compute = compute_s * (emu.slowdown - 1.0) if emu.slowdown > 1 else 0.0
        link_s = emu.link_s(nbytes) if emu.link_gbps != float("inf") or emu.link_latency_us else 0.0
        if extra_compute + link_s > 0:
            time.sleep(extra_compute + link_s)
        return compute_s, extra_compute, link_s

    # --------------------------------------------------------------- the compact wire

    def compute_request(
        self, request: ShardRequest, trace: Mapping[str, str] | None = None
    ) -> ShardReply:
        """One layer call in the compact wire format (`cluster/wire.py`): the distinct rows
        this node needs, one output row per assignment, packed like the request."""
        if request.echo:
            rows = request.rows
            scales = rows.scales[request.row_of] if rows.scales is not None else None
            return ShardReply(Packed(rows.fmt, rows.data[request.row_of], scales), 0.0, 0.0, 0.0)
        if self.tracer is None or not trace:
            return self._compute_request(request)
        from opentelemetry import propagate

        with self.tracer.start_as_current_span(
            "expertmesh.shard.compute",
            context=propagate.extract(dict(trace)),
            attributes={
                "expertmesh.node": self.node,
                "expertmesh.layer": request.layer,
                "expertmesh.rows": request.assignments,
            },
        ):
            return self._compute_request(request)

    def _compute_request(self, request: ShardRequest) -> ShardReply:
        rows = self._staging.to_device(unpack(request.rows, self.dtype), self.device)
        ids = torch.from_numpy(request.experts.astype(np.int64))
        xs = rows[torch.from_numpy(request.row_of.astype(np.int64)).to(rows.device)]
        # Link bytes: the request, plus one output row per assignment in the same format.
        per_row = request.rows.nbytes // max(request.rows.rows, 1)
        link_bytes = request.nbytes + per_row * request.assignments
        out, timings = self._expert_rows(request.layer, xs, ids, link_bytes)
        return ShardReply(pack(out.cpu(), request.rows.fmt), *timings)  # one copy to the host

    def open_channel(self, secret: bytes) -> tuple[str, int]:
        """Listen for a persistent channel (`cluster/transport_channel.py`) on this node's IP;
        returns (ip, port). Idempotent: a second call returns the same address."""
        if self._channel is None or self._channel.closed or self._channel.secret != secret:
            from .transport_channel import ChannelServer

            if self._channel is not None:
                self._channel.close()
            self._channel = ChannelServer(_node_ip(), secret, self.handle_frame, self.node)
        return self._channel.address

    def handle_frame(self, frame: bytearray) -> list[bytes | memoryview]:
        """A request frame -> its reply frame (errors travel as frames; the caller raises)."""
        from expertmesh.models.errors import ExpertNotLoaded

        from . import wire

        try:
            request, trace = wire.read_request(frame)
            reply = self.compute_request(request, trace)
        except ExpertNotLoaded as e:
            return wire.frame_reply(
                None, status=wire.EXPERT_NOT_LOADED, error={"layer": e.layer, "experts": e.experts}
            )
        except Exception as e:  # the caller fails this call; the channel stays usable
            log.exception("shard %s: a layer call failed", self.node)
            return wire.frame_reply(None, status=wire.FAILED, error={"error": repr(e)[:2000]})
        timings = (reply.compute_s, reply.emulated_compute_s, reply.emulated_link_s)
        assert isinstance(reply.outputs, Packed)
        return wire.frame_reply(reply.outputs, timings)

    def status(self) -> ShardStatus:
        return ShardStatus(
            node=self.node,
            pid=os.getpid(),
            experts=self.experts(),
            calls=self.calls,
            tokens=self.tokens,
            started_at=self.started_at,
            last_call_at=self.last_call_at,
            extra={"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")},
        )

    def set_emulation(self, emulation: NodeEmulation) -> None:
        """Change the emulated speed and link (fault injection: a slow node, a slow link)."""
        self.emulation = emulation

    def flush_telemetry(self) -> None:
        """Export the spans this shard still buffers (before a planned stop, and in tests)."""
        if self._telemetry is not None:
            self._telemetry.force_flush()

    def ping(self) -> str:
        return self.node

    def measure_speed(self, size: int = 1024, repeats: int = 5) -> float:
        """GEMM throughput of this node in GFLOP/s (used where the topology says "measure")."""
        return measure_gflops(size, repeats)


def measure_gflops(size: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Best-of-`repeats` square GEMM throughput of this process (or with `threads` threads)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _gemm_gflops(size, repeats)
    finally:
        torch.set_num_threads(before)


def _gemm_gflops(size: int, repeats: int) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _node_ip() -> str:
    """This process's node IP as Ray knows it (the rig's namespace address), else loopback."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # not in a Ray worker (in-process shards in tests)
        return "127.0.0.1"


def _moe_cfg(bank: ExpertBank) -> Any:
    """A MoEConfig with the bank's shape (for building a smaller bank of the same layer)."""
    from expertmesh.models.config import MoEConfig

    return MoEConfig(num_experts=bank.num_experts, top_k=1, expert_intermediate=bank.intermediate)


def shard_actor_class() -> Any:
    """`ExpertShard` as a Ray actor class that Ray restarts after a crash (its __init__ reloads
    the experts it was created with; the dispatcher then calls `ensure` with the current set)."""
    import ray

    # Two threads: a load or drop (seconds for big experts) runs beside `compute` calls, so
    # rebalancing never makes a request wait on a busy shard. Membership changes hold a lock;
    # `compute` reads one bank reference per call and banks are swapped whole, never mutated.
    remote: Any = ray.remote
    return remote(max_restarts=-1, max_task_retries=0, max_concurrency=2)(ExpertShard)
