"""The wire: how one layer call's activations cross to an expert shard and back.

A layer call sends each node only the token rows it needs, once per token even when two of
the token's experts live on that node (`ShardRequest.rows` + `row_of`), and gets back one
unweighted output row per assignment; the attention worker weights and combines them.

Rows travel in a wire format (`WIRE_FORMATS`):
- `fp32`: exact for every model.
- `bf16`: half the bytes; exact when the model computes in bf16 (its activations already are).
- `fp8`: e4m3 with one fp32 scale per row (a quarter of fp32, plus 4 bytes a row).
- `int8`: symmetric, one fp32 scale per row.

`frame_request` / `read_request` and `frame_reply` / `read_reply` turn requests and replies
into flat binary frames for a persistent channel (`cluster/transport.py`): a fixed header,
then raw array bytes. Nothing is pickled, so a frame cannot run code on the receiver.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

WIRE_FORMATS = ("fp32", "bf16", "fp8", "int8")
_CODE = {name: i for i, name in enumerate(WIRE_FORMATS)}
_RAW_DTYPE = {"fp32": np.float32, "bf16": np.uint16, "fp8": np.uint8, "int8": np.int8}
_SCALED = ("fp8", "int8")
_FP8_MAX = 448.0  # largest finite e4m3fn value


def check_wire(fmt: str) -> str:
    """`fmt` if it names a wire format ('auto' allowed: chosen from the model's dtype)."""
    if fmt != "auto" and fmt not in WIRE_FORMATS:
        raise ValueError(
            f"wire: unknown format {fmt!r}; use one of auto, {', '.join(WIRE_FORMATS)}"
        )
    return fmt


def wire_for(fmt: str, dtype: torch.dtype) -> str:
    """Resolve 'auto': bf16 for a bf16 model (exact: its activations are bf16), else fp32."""
    if fmt != "auto":
        return fmt
    return "bf16" if dtype == torch.bfloat16 else "fp32"


@dataclass(frozen=True)
class Packed:
    """A (rows, hidden) block of activations in a wire format."""

    fmt: str
    data: np.ndarray
    """(rows, hidden): float32, bf16 bits as uint16, fp8 bits as uint8, or int8."""
    scales: np.ndarray | None = None
    """(rows,) float32 for fp8 and int8: value = stored * scale."""

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0))


def pack(t: torch.Tensor, fmt: str) -> Packed:
    """(rows, hidden) tensor -> Packed in `fmt`."""
    t = t.detach()
    if fmt == "fp32":
        return Packed(fmt, np.ascontiguousarray(t.to(torch.float32).numpy()))
    if fmt == "bf16":
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return Packed(fmt, bits)
    if fmt not in _SCALED:
        check_wire(fmt)
        raise ValueError(f"wire: {fmt!r} cannot be packed")
    x = t.to(torch.float32)
    top = _FP8_MAX if fmt == "fp8" else 127.0
    amax = x.abs().amax(dim=1, keepdim=True) if x.shape[0] else x.new_zeros((0, 1))
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    if fmt == "fp8":
        q = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    else:
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8).numpy()
    return Packed(fmt, np.ascontiguousarray(q), np.ascontiguousarray(scale[:, 0].numpy()))


def unpack(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    """Packed -> (rows, hidden) tensor of `dtype`."""
    raw = p.data if p.data.flags.writeable else p.data.copy()  # from_numpy wants writable
    data = torch.from_numpy(np.ascontiguousarray(raw))
    if p.fmt == "fp32":
        return data.to(dtype)
    if p.fmt == "bf16":
        return data.view(torch.int16).view(torch.bfloat16).to(dtype)
    assert p.scales is not None, f"{p.fmt} rows travel with scales"
    scale = torch.from_numpy(np.array(p.scales, dtype=np.float32))[:, None]
    if p.fmt == "fp8":
        values = data.view(torch.float8_e4m3fn).to(torch.float32)
    else:
        values = data.to(torch.float32)
    return (values * scale).to(dtype)


def empty_packed(fmt: str, hidden: int) -> Packed:
    scales = np.zeros(0, np.float32) if fmt in _SCALED else None
    return Packed(fmt, np.zeros((0, hidden), _RAW_DTYPE[fmt]), scales)


@dataclass(frozen=True)
class ShardRequest:
    """One node's share of one layer call."""

    layer: int
    rows: Packed
    """The distinct token rows this node needs."""
    row_of: np.ndarray
    """(assignments,) int32: the row each assignment reads."""
    experts: np.ndarray
    """(assignments,) int32: the expert each assignment goes through."""
    echo: bool = False
    """Return rows[row_of] without computing (measures the transport alone)."""

    @property
    def assignments(self) -> int:
        return int(self.row_of.shape[0])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.row_of.nbytes + self.experts.nbytes


# ----------------------------------------------------------------------------- frames

MAGIC = b"EMW1"
_REQ = struct.Struct("<4sBBBxIIIII")  # magic, fmt, echo, has_scales, layer, rows, hidden, n, trace
_REP = struct.Struct("<4sBBBxIIddd")  # magic, status, fmt, has_scales, rows, hidden, 3 timings
LENGTH = struct.Struct("<Q")
"""Every frame on a channel is preceded by its length."""

OK, EXPERT_NOT_LOADED, FAILED = 0, 1, 2


class FrameError(ValueError):
    """A frame that is not one of ours (wrong magic, truncated, inconsistent sizes)."""


def frame_request(
    req: ShardRequest, trace: dict[str, str] | None = None
) -> list[bytes | memoryview]:
    """The request as buffers to send one after another (length prefix first)."""
    tr = json.dumps(trace).encode() if trace else b""
    p = req.rows
    hidden = int(p.data.shape[1]) if p.data.ndim == 2 else 0
    head = _REQ.pack(
        MAGIC,
        _CODE[p.fmt],
        int(req.echo),
        int(p.scales is not None),
        req.layer,
        p.rows,
        hidden,
        req.assignments,
        len(tr),
    )
    parts: list[bytes | memoryview] = [head, tr, _raw(p.data)]
    if p.scales is not None:
        parts.append(_raw(p.scales.astype(np.float32, copy=False)))
    parts += [
        _raw(req.row_of.astype(np.int32, copy=False)),
        _raw(req.experts.astype(np.int32, copy=False)),
    ]
    total = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in parts)
    return [LENGTH.pack(total), *parts]


def read_request(buf: bytes | bytearray | memoryview) -> tuple[ShardRequest, dict[str, str] | None]:
    view = memoryview(buf)
    magic, code, echo, has_scales, layer, rows, hidden, n, trace_len = _unpack(_REQ, view)
    if magic != MAGIC or code >= len(WIRE_FORMATS):
        raise FrameError("not an expertmesh request frame")
    fmt = WIRE_FORMATS[code]
    at = _REQ.size
    trace = json.loads(bytes(view[at : at + trace_len])) if trace_len else None
    at += trace_len
    data, at = _take(view, at, _RAW_DTYPE[fmt], rows * hidden)
    scales = None
    if has_scales:
        scales, at = _take(view, at, np.float32, rows)
    row_of, at = _take(view, at, np.int32, n)
    experts, at = _take(view, at, np.int32, n)
    if at != len(view):
        raise FrameError(f"request frame has {len(view) - at} trailing bytes")
    packed = Packed(fmt, data.reshape(rows, hidden), scales)
    return ShardRequest(layer, packed, row_of, experts, bool(echo)), trace


def frame_reply(
    outputs: Packed | None,
    timings: tuple[float, float, float] = (0.0, 0.0, 0.0),
    status: int = OK,
    error: dict[str, Any] | None = None,
) -> list[bytes | memoryview]:
    """A reply: outputs (status OK) or an error description (JSON) for the caller to raise."""
    if status != OK or outputs is None:
        body = json.dumps(error or {}).encode()
        head = _REP.pack(MAGIC, status, 0, 0, len(body), 0, *timings)
        return [LENGTH.pack(len(head) + len(body)), head, body]
    p = outputs
    hidden = int(p.data.shape[1]) if p.data.ndim == 2 else 0
    head = _REP.pack(MAGIC, OK, _CODE[p.fmt], int(p.scales is not None), p.rows, hidden, *timings)
    parts: list[bytes | memoryview] = [head, _raw(p.data)]
    if p.scales is not None:
        parts.append(_raw(p.scales))
    total = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in parts)
    return [LENGTH.pack(total), *parts]


def read_reply(
    buf: bytes | bytearray | memoryview,
) -> tuple[int, Packed | None, tuple[float, float, float], dict[str, Any] | None]:
    """(status, outputs, (compute_s, emulated_compute_s, emulated_link_s), error)."""
    view = memoryview(buf)
    magic, status, code, has_scales, rows, hidden, c, ec, el = _unpack(_REP, view)
    if magic != MAGIC:
        raise FrameError("not an expertmesh reply frame")
    at = _REP.size
    if status != OK:
        return status, None, (c, ec, el), json.loads(bytes(view[at : at + rows]) or b"{}")
    fmt = WIRE_FORMATS[code]
    data, at = _take(view, at, _RAW_DTYPE[fmt], rows * hidden)
    scales = None
    if has_scales:
        scales, at = _take(view, at, np.float32, rows)
    if at != len(view):
        raise FrameError(f"reply frame has {len(view) - at} trailing bytes")
    return OK, Packed(fmt, data.reshape(rows, hidden), scales), (c, ec, el), None


def _raw(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).data).cast("B")


def _unpack(s: struct.Struct, view: memoryview) -> tuple[Any, ...]:
    if len(view) < s.size:
        raise FrameError(f"frame of {len(view)} bytes is shorter than its header ({s.size})")
    return s.unpack_from(view, 0)


def _take(view: memoryview, at: int, dtype: Any, count: int) -> tuple[np.ndarray, int]:
    size = np.dtype(dtype).itemsize * count
    if at + size > len(view):
        raise FrameError("frame is truncated")
    return np.frombuffer(view[at : at + size], dtype=dtype), at + size
