"""KV cache: per-slot storage for every layer, in four modes.

- ``full``: K and V at the model's dtype. For MLA models this is the *expanded* per-head K/V,
  i.e. what an equivalent multi-head-attention cache would hold.
- ``int8``: K and V quantised to int8 with one fp16 scale per (token, head) (symmetric, absmax).
- ``latent`` (MLA only): the compressed latent ``c_kv`` (``kv_lora_rank`` values) and the
  shared rotary key (``qk_rope_head_dim`` values) per token, not per head.
- ``latent-int8``: the latent cache quantised to int8, one scale per token per tensor.

A cache has ``num_slots`` rows (one per sequence) of ``max_len`` positions. Row ``s`` holds
``lengths[s]`` valid tokens; a forward pass on rows ``R`` with ``T`` new tokens writes them at
``lengths[R] .. lengths[R] + T - 1`` and then ``advance(R, T)``. Rows of one batch may hold
different lengths: attention masks the positions a row has not written.

The stores live on the attention worker's device (`device`, the CPU by default); `lengths` and
the row and position indices stay on the host (they are bookkeeping the scheduler reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import KVMode, ModelConfig

INT8_SCALE_BYTES = 2  # one fp16 scale per quantised vector


class TensorStore:
    """Dense storage of one per-token tensor of `feature` shape for `num_slots` rows of
    `max_len` positions.

    A per-head feature (heads, dim) is stored heads-major, (num_slots, heads, max_len, dim),
    so one row's keys of one head are contiguous: decode attention multiplies them in place
    (`read_heads`) instead of gathering a strided (length, heads, dim) slab every step. Other
    features are stored (num_slots, max_len, *feature). `read` and `write` take and give
    (B, T, *feature) either way."""

    def __init__(
        self,
        num_slots: int,
        max_len: int,
        feature: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.heads_major = len(feature) == 2
        self.data = torch.zeros(_layout(num_slots, max_len, feature), dtype=dtype, device=device)

    def _put(
        self, dest: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, x: torch.Tensor
    ) -> None:
        """dest[row, pos] = x (B, T, *f) in this store's layout."""
        rows, pos = _on(rows, dest), _on(pos, dest)
        if self.heads_major:
            # rows (B, 1) and pos (B, T) around the heads slice: the indexed view is (B, T, H, D)
            dest[rows[:, None], :, pos] = x
        else:
            dest[rows[:, None], pos] = x

    def _get(
        self, src: torch.Tensor, rows: torch.Tensor | None, n_rows: int, length: int
    ) -> torch.Tensor:
        """src's first `length` positions of `rows` (None: slots 0..n_rows-1, a view), in the
        storage layout."""
        if self.heads_major:
            return src[:n_rows, :, :length] if rows is None else src[_on(rows, src), :, :length]
        return src[:n_rows, :length] if rows is None else src[_on(rows, src), :length]

    def write(self, rows: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
        # rows (B,), pos (B, T), x (B, T, *feature)
        self._put(self.data, rows, pos, x.to(self.data.dtype))

    def read_heads(
        self, rows: torch.Tensor | None, n_rows: int, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """(B, heads, length, dim) for a per-head feature; rows=None: a view, no copy."""
        assert self.heads_major
        src = self._get(self.data, rows, n_rows, length)
        return src if src.dtype == dtype else src.to(dtype)

    def read(
        self, rows: torch.Tensor | None, n_rows: int, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """(B, length, *feature). rows=None means slots 0..n_rows-1 (a view, no copy)."""
        if self.heads_major:
            return self.read_heads(rows, n_rows, length, dtype).transpose(1, 2)
        src = self._get(self.data, rows, n_rows, length)
        return src if src.dtype == dtype else src.to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _layout(num_slots: int, max_len: int, feature: tuple[int, ...]) -> tuple[int, ...]:
    if len(feature) == 2:
        return (num_slots, feature[0], max_len, feature[1])
    return (num_slots, max_len, *feature)


class Int8Store(TensorStore):
    """int8 storage with one absmax scale per stored vector (the last feature dim).

    Scales are stored in fp16: its 11-bit significand is far finer than the int8 step (1/127),
    and it keeps the overhead at 2 bytes per vector (about 1.5% for 128-wide heads)."""

    def __init__(
        self,
        num_slots: int,
        max_len: int,
        feature: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.heads_major = len(feature) == 2
        self.data = torch.zeros(
            _layout(num_slots, max_len, feature), dtype=torch.int8, device=device
        )
        self.scale = torch.zeros(
            _layout(num_slots, max_len, (*feature[:-1], 1)), dtype=torch.float16, device=device
        )

    def write(self, rows: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
        x32 = x.float()
        scale = (x32.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-6).half()
        self._put(
            self.data, rows, pos, torch.round(x32 / scale.float()).clamp(-127, 127).to(torch.int8)
        )
        self._put(self.scale, rows, pos, scale)

    def _dequantised(
        self, rows: torch.Tensor | None, n_rows: int, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        q = self._get(self.data, rows, n_rows, length)
        s = self._get(self.scale, rows, n_rows, length)
        return (q.to(torch.float32) * s.float()).to(dtype)

    def read_heads(
        self, rows: torch.Tensor | None, n_rows: int, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        assert self.heads_major
        return self._dequantised(rows, n_rows, length, dtype)

    def read(
        self, rows: torch.Tensor | None, n_rows: int, length: int, dtype: torch.dtype
    ) -> torch.Tensor:
        out = self._dequantised(rows, n_rows, length, dtype)
        return out.transpose(1, 2) if self.heads_major else out

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.scale.numel() * self.scale.element_size()


def _on(index: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Host-side row/position indices on the store's device (no-op on the CPU)."""
    return index if index.device == data.device else index.to(data.device)


@dataclass(frozen=True)
class CacheShapes:
    """Per-token feature shapes of the two tensors a layer caches, for one mode."""

    first: tuple[int, ...]
    second: tuple[int, ...]
    quantised: bool


def cache_shapes(config: ModelConfig, mode: KVMode) -> CacheShapes:
    a = config.attention
    if mode in ("latent", "latent-int8"):
        return CacheShapes((a.kv_lora_rank,), (a.qk_rope_dim,), mode == "latent-int8")
    if a.kind == "mla":  # expanded per-head K/V: the equivalent MHA cache
        return CacheShapes((a.num_heads, a.head_dim), (a.num_heads, a.v_head_dim), mode == "int8")
    return CacheShapes((a.num_kv_heads, a.head_dim), (a.num_kv_heads, a.head_dim), mode == "int8")


def kv_bytes_per_token(config: ModelConfig, mode: KVMode, dtype_bytes: int) -> int:
    """Bytes one token occupies in the cache across all layers (scales included)."""
    shapes = cache_shapes(config, mode)
    per_layer = 0
    for feat in (shapes.first, shapes.second):
        if shapes.quantised:
            per_layer += math.prod(feat) + math.prod(feat[:-1]) * INT8_SCALE_BYTES
        else:
            per_layer += math.prod(feat) * dtype_bytes
    return per_layer * config.num_layers


class LayerKV:
    """The two stores of one layer (K and V, or latent and rotary key)."""

    def __init__(self, first: TensorStore, second: TensorStore):
        self.first = first
        self.second = second


class KVCache:
    """KV storage for all layers of one model, `num_slots` sequences of up to `max_len` tokens."""

    def __init__(
        self,
        config: ModelConfig,
        mode: KVMode,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.mode: KVMode = config.check_kv_mode(mode)
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.shapes = cache_shapes(config, mode)
        store = Int8Store if self.shapes.quantised else TensorStore
        self.layers = [
            LayerKV(
                store(num_slots, max_len, self.shapes.first, dtype, device),
                store(num_slots, max_len, self.shapes.second, dtype, device),
            )
            for _ in range(config.num_layers)
        ]
        self.lengths = torch.zeros(num_slots, dtype=torch.long)

    @property
    def latent(self) -> bool:
        return self.mode in ("latent", "latent-int8")

    def advance(self, rows: torch.Tensor, n: int) -> None:
        self.lengths[rows] += n

    def free(self, rows: torch.Tensor) -> None:
        """Forget the contents of `rows` so the slots can take new sequences."""
        self.lengths[rows] = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.first.nbytes + layer.second.nbytes for layer in self.layers)

    def bytes_in_use(self) -> int:
        """Bytes holding valid tokens (allocated bytes scaled by occupancy)."""
        return int(self.nbytes * int(self.lengths.sum()) / (self.num_slots * self.max_len))
