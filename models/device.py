"""Where a model's tensors live: the device of one node, its default dtype, and the pinned host
buffers routed rows cross between a GPU and the host in.

A topology node names its device as `auto`, `cuda` or `cpu` (`cluster/topology.py`); the
process that computes for that node turns the name into a `torch.device` here:

    device = resolve_device("auto", "gpu-0")      # cuda:0 where this process sees a GPU, else cpu
    dtype = dtype_for(device, "auto")             # bfloat16 on CUDA, float32 on the CPU
    model = load_model(path, dtype, device=device)

The CPU is the default everywhere, and the CPU path is what it always was: `dtype_for` keeps
float32 there, and `HostStaging` passes CPU tensors through without a copy.

On Ray the answer for `auto` depends on what Ray gave the process: an actor started with
`num_gpus=0` sees no GPU at all (Ray empties `CUDA_VISIBLE_DEVICES` for it), so the pool asks
Ray's node table whether a node has a GPU before it starts the node's actors
(`cluster/devices.py`), and the actor's own `resolve_device` then finds the GPU it was given.
"""

from __future__ import annotations

import threading
from typing import Literal, get_args

import torch
from torch import nn

from .checkpoint import resolve_dtype
from .errors import ModelError

DeviceSpec = Literal["auto", "cuda", "cpu"]
"""What a topology node (or a command line) asks for: `auto` is CUDA where there is a GPU."""
DEVICE_SPECS: tuple[str, ...] = get_args(DeviceSpec)
AUTO_DTYPE = "auto"
"""The dtype name that means "the device's default" (`dtype_for`)."""
CUDA_DTYPE = torch.bfloat16
"""Weights and activations on a GPU unless asked otherwise: half the bytes of float32, the
float32 exponent range (no overflow in the residual stream), and the tensor-core GEMM dtype."""
CPU_DTYPE = torch.float32
"""What the CPU path has always used (CPU bf16 GEMMs are slower than float32 on AVX2)."""


class DeviceError(ModelError):
    """A node asks for a device this process cannot give it; the message names the node and
    the fix."""


def cuda_missing_message(node: str) -> str:
    return (
        f"node {node}: device cuda requested but this Ray node has no CUDA device; "
        "set device: cpu or auto"
    )


def check_device_spec(spec: object, node: str) -> DeviceSpec:
    if spec not in DEVICE_SPECS:
        raise DeviceError(
            f"node {node}: device {spec!r} is not one of {', '.join(DEVICE_SPECS)}; "
            "write device: auto (CUDA where the node has a GPU), cuda or cpu"
        )
    return spec  # type: ignore[return-value]


def resolve_device(spec: str, node: str, cuda_available: bool | None = None) -> torch.device:
    """The device this process computes on for `node`'s `device: spec`.

    `cuda_available`: whether this process sees a CUDA device (None: ask torch). DeviceError
    when `spec` is `cuda` and there is none: never a silent fall back to the CPU."""
    checked = check_device_spec(spec, node)
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if checked == "cpu" or (checked == "auto" and not has_cuda):
        return torch.device("cpu")
    if not has_cuda:
        raise DeviceError(cuda_missing_message(node))
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return torch.device("cuda", index)


def dtype_for(device: torch.device | str, dtype: str | torch.dtype = AUTO_DTYPE) -> torch.dtype:
    """`dtype`, or for "auto" the device's default: bfloat16 on CUDA, float32 on the CPU.

    An explicit dtype is kept on every device (float32 on a GPU for a tight parity check)."""
    if isinstance(dtype, str) and dtype == AUTO_DTYPE:
        return CUDA_DTYPE if torch.device(device).type == "cuda" else CPU_DTYPE
    return resolve_dtype(dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights (the first parameter's; a model lives on one device)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timing GPU code); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class HostStaging:
    """Pinned host buffers that a layer's routed rows cross in: device -> host once before
    dispatch (`to_host`), host -> device once for the replies (`to_device`).

    Expert shards exchange rows with the attention worker over the network, so rows on a GPU
    must reach host memory. Page-locked (pinned) memory is what the GPU's copy engine reads
    and writes directly: copies to and from it run at full PCIe/NVLink speed, and a host ->
    device copy from it can run asynchronously, where a pageable buffer is first staged by the
    driver. Buffers are kept and reused (capacity rounded up to a power of two rows), so a
    decode step allocates nothing; several layer calls may be in flight at once (micro-batch
    overlap): each holds its own buffer from `to_host` until it hands it back (`release`).

    CPU tensors pass straight through, the very same tensor and no copy: the CPU path is what
    it was, and no pinned memory is ever made without a GPU.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # pinned (capacity, width) buffers not in use
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a view we gave out -> its buffer
        self._copying: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # async H2D sources
        self._lock = threading.Lock()

    def _take(self, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned (>= rows, width) buffer of `dtype` (call with the lock held)."""
        copying = []
        for event, buf in self._copying:  # buffers whose host -> device copy has finished
            if event.query():
                self._free.append(buf)
            else:
                copying.append((event, buf))
        self._copying = copying
        for i, buf in enumerate(self._free):
            if buf.dtype == dtype and buf.shape[1] == width and buf.shape[0] >= rows:
                return self._free.pop(i)
        capacity = 1 << max(rows - 1, 0).bit_length()
        return torch.empty(capacity, width, dtype=dtype, pin_memory=True)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, width) -> the same rows on the host, in x's dtype (a pinned view for a GPU
        tensor: hand it back with `release` once nothing reads it)."""
        if x.device.type == "cpu":
            return x
        with self._lock:
            buf = self._take(x.shape[0], x.shape[1], x.dtype)
            view = buf[: x.shape[0]]
            self._lent[view.data_ptr()] = buf
        view.copy_(x)  # one DMA into pinned memory; returns when the rows are there
        return view

    def release(self, host: torch.Tensor) -> None:
        """Hand back a view `to_host` gave out (nothing for a CPU tensor it passed through)."""
        with self._lock:
            buf = self._lent.pop(host.data_ptr(), None)
            if buf is not None:
                self._free.append(buf)

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host rows t (n, width) -> a tensor on `device` (t itself when `device` is the CPU)."""
        if device.type == "cpu":
            return t
        with self._lock:
            buf = self._take(t.shape[0], t.shape[1], t.dtype)
        view = buf[: t.shape[0]]
        view.copy_(t)
        out = view.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        with self._lock:  # reusable once the copy has left it
            self._copying.append((done, buf))
        return out
