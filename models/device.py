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

import numpy as np
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

    Expert shards exchange numpy rows over Ray, so rows on a GPU must reach host memory. Page-
    locked (pinned) memory is what the GPU's copy engine reads and writes directly: copies to
    and from it run at full PCIe/NVLink speed and a host -> device copy can run asynchronously,
    where a pageable buffer is first staged by the driver. The buffers grow to the largest
    layer call seen (rounded up to a power of two rows) and are reused, so a decode step
    allocates nothing.

    CPU tensors pass straight through (`x.float().numpy()`, `torch.from_numpy(a).to(dtype)`),
    exactly what the CPU path did before: no pinned memory is ever made without a GPU.

    One caller at a time per instance (an attention worker runs one forward pass at a time):
    the array `to_host` returns is a view of the buffer, valid until the next `to_host`.
    """

    def __init__(self) -> None:
        self._out: torch.Tensor | None = None  # (rows, hidden) float32, pinned: device -> host
        self._in: torch.Tensor | None = None  # (rows, hidden) float32, pinned: host -> device
        self._in_done: torch.cuda.Event | None = None  # the last host -> device copy finished
        self._lock = threading.Lock()

    @staticmethod
    def _grown(buf: torch.Tensor | None, rows: int, width: int) -> torch.Tensor:
        if buf is not None and buf.shape[0] >= rows and buf.shape[1] == width:
            return buf
        capacity = 1 << max(rows - 1, 0).bit_length()
        return torch.empty(capacity, width, dtype=torch.float32, pin_memory=True)

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        """x (n, width) on any device -> float32 numpy (n, width)."""
        if x.device.type == "cpu":
            return x.float().numpy()
        with self._lock:
            self._out = self._grown(self._out, x.shape[0], x.shape[1])
            view = self._out[: x.shape[0]]
            view.copy_(x)  # cast on the device, one DMA into pinned memory; waits for it
            return view.numpy()

    def to_device(self, rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """float32 numpy rows (n, width) -> a tensor on `device` in `dtype`."""
        if device.type == "cpu":
            return torch.from_numpy(rows).to(dtype)
        with self._lock:
            if self._in_done is not None:
                self._in_done.synchronize()  # the previous copy has left the buffer
            self._in = self._grown(self._in, rows.shape[0], rows.shape[1])
            view = self._in[: rows.shape[0]]
            view.numpy()[:] = rows
            out = view.to(device, non_blocking=True)
            self._in_done = torch.cuda.Event()
            self._in_done.record()
        return out.to(dtype)
