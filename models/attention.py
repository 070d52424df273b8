"""Attention for the MoE decoder: rotary tables (plain, linear, YaRN), the per-pass
`StepContext`, multi-head attention with grouped KV heads, DeepSeek's latent attention (MLA),
and the decode paths that read the KV cache in place.

Shapes: B = batch rows, T = new tokens this step, L = key length (cached + new), H = heads,
D = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_kernel, latent_kernel
from .config import AttentionConfig, RopeConfig
from .kv_cache import TensorStore
from .layers import Linear, RMSNorm, linear

if TYPE_CHECKING:
    from .kv_cache import KVCache

# ----------------------------------------------------------------------------- rotary embedding


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the factor cos/sin are multiplied by.

    Always computed on the CPU, whatever the default device: `load_model` builds the model
    under `torch.device("meta")`, and these are derived constants (not parameters or buffers,
    so `to_empty` never replaces them with uninitialised memory).

    YaRN follows Peng et al. 2023 ("YaRN: Efficient Context Window Extension"), section 3:
    interpolate low frequencies, keep high ones, ramp in between, scale attention by mscale.
    """
    cpu = torch.device("cpu")
    exponents = torch.arange(0, cfg.dim, 2, dtype=torch.float32, device=cpu) / cfg.dim
    pos_freqs = cfg.theta**exponents
    if cfg.scaling == "linear":
        return 1.0 / (pos_freqs * cfg.factor), 1.0
    if cfg.scaling != "yarn":
        return 1.0 / pos_freqs, 1.0
    orig = cfg.original_max_position or 4096

    def correction_dim(n_rot: float) -> float:
        return (cfg.dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, cfg.dim - 1)
    if low == high:
        high = high + 0.001
    ramp = torch.arange(cfg.dim // 2, dtype=torch.float32, device=cpu)
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    if cfg.attention_factor is not None:
        scale = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        scale = _yarn_mscale(cfg.factor, cfg.mscale) / _yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        scale = _yarn_mscale(cfg.factor)
    return inv_freq, scale


class Rotary:
    """Rotary position embedding; not a module (no parameters, nothing to load).

    cos/sin come from per-dtype tables of positions 0..n-1, grown to the next power of two
    past the largest position asked for, then indexed: every forward pass used to recompute
    them (about 7% of the engine thread in a serving profile). A table row is the same
    elementwise arithmetic as computing that position alone, so the values are identical."""

    def __init__(self, cfg: RopeConfig) -> None:
        self.interleaved = cfg.interleaved
        self.inv_freq, self.scale = rope_inv_freq(cfg)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, dim/2) for positions 0..n-1, n >= size."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < size:
            n = max(256, 1 << (size - 1).bit_length())
            positions = torch.arange(n, device=self.inv_freq.device)
            freqs = positions[:, None].float() * self.inv_freq  # (n, dim/2)
            table = (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)
            self._tables[dtype] = table
        return table

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (*positions.shape, dim/2) of host-side (CPU) integer positions."""
        if positions.numel() == 0:
            empty = torch.empty(*positions.shape, self.inv_freq.shape[0], dtype=dtype)
            return empty, empty
        cos, sin = self._table(int(positions.max()) + 1, dtype)
        return cos[positions], sin[positions]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x (B, T, H, dim); cos/sin (B, T, dim/2) broadcast over heads.
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        if self.interleaved:  # DeepSeek: pairs (x0, x1), (x2, x3), ...; output de-interleaved
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ----------------------------------------------------------------------------- step context


@dataclass
class StepContext:
    """What every layer needs about the current forward pass; built once per pass."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None
    rows: torch.Tensor  # (B,) cache slots of the batch rows
    rows_are_prefix: bool  # rows == arange(B): cache reads can be views
    write_pos: torch.Tensor  # (B, T) absolute positions of the new tokens
    key_len: int  # L
    mask: torch.Tensor | None  # (B, 1, T, L) bool, or None for plain causal over T == L

    def read_rows(self) -> torch.Tensor | None:
        return None if self.rows_are_prefix else self.rows


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention. q (B, H, T, Dq); k (B, Hkv, L, Dq); v (B, Hkv, L, Dv)."""
    causal = ctx.mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=ctx.mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional q/k norms and q/k/v clipping."""

    def __init__(self, hidden: int, cfg: AttentionConfig, rope: RopeConfig, eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(hidden, h * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(hidden, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(hidden, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, hidden, bias=cfg.o_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, eps), RMSNorm(hkv * d, eps)
        self.rotary = Rotary(rope)

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One (q + k + v rows, hidden) weight (and bias) so inference runs one GEMM, not three.

        Built on first use and kept in step with the parameters: q/k/v_proj's weights are
        re-pointed at row blocks of it (no second copy); a parameter replaced later (a new
        checkpoint, `load_state_dict` with assign) has another address and triggers a
        rebuild. Not while training: autograd wants the three parameters as they are."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() and self.q_proj.weight.requires_grad:
            return None
        key = tuple(p.weight.data_ptr() for p in projs)
        if getattr(self, "_qkv_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():
                weight = torch.cat([p.weight.detach() for p in projs])
                bias = None
                if self.q_proj.bias is not None:
                    bias = torch.cat([p.bias.detach() for p in projs])  # type: ignore[misc]
                start = 0
                for p in projs:
                    n = p.weight.shape[0]
                    p.weight.data = weight[start : start + n]
                    if bias is not None:
                        p.bias.data = bias[start : start + n]
                    start += n
            self._qkv_fused = (weight, bias)
            self._qkv_key = tuple(p.weight.data_ptr() for p in projs)
        return self._qkv_fused

    def forward(self, x: torch.Tensor, ctx: StepContext, layer: int) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        fused = self._qkv()
        if fused is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            qkv = linear(x, *fused)
            if self._kernel_runs(qkv, ctx, layer):
                if T == 1:
                    return self.o_proj(self._kernel_decode(qkv, ctx, layer).view(B, 1, -1))
                return self._kernel_prefill(qkv, ctx, layer)
            hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = qkv.split([hq, hkv, hkv], dim=-1)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        q = self.rotary.apply(q, ctx.cos, ctx.sin)
        k = self.rotary.apply(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = cache_update(ctx, layer, k, v)  # (B, L, Hkv, D)
        if T == 1:
            out = decode_attention(q, k.transpose(1, 2), v.transpose(1, 2), ctx, cfg.head_dim**-0.5)
            return self.o_proj(out)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx, cfg.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _kernel_runs(self, qkv: torch.Tensor, ctx: StepContext, layer: int) -> bool:
        """Whether this pass's q/k norms, rotary and cache write (and, decoding, attention)
        run compiled (models/decode_kernel.py): a plain fp32 heads-major cache, per-head or
        no q/k norm, no clipping; decoding, no sliding window that cuts keys off."""
        cfg = self.cfg
        if ctx.cache is None or cfg.qk_norm == "full" or cfg.clip_qkv is not None:
            return False
        decoding = qkv.shape[1] == 1
        if decoding and cfg.sliding_window is not None and ctx.key_len > cfg.sliding_window:
            return False
        kv = ctx.cache.layers[layer]
        first, second = kv.first, kv.second
        return (
            type(first) is TensorStore
            and type(second) is TensorStore
            and first.heads_major
            and second.data.dtype == first.data.dtype
            and decode_kernel.applies(qkv, first.data, cfg.head_dim)
        )

    def _kernel_prefill(self, qkv: torch.Tensor, ctx: StepContext, layer: int) -> torch.Tensor:
        """T > 1 new tokens a row: q/k norm, rotary and the cache write in one compiled call,
        then SDPA over the cache's heads-major views -> the block's output (B, T, hidden)."""
        cfg = self.cfg
        assert ctx.cache is not None
        B, T, _ = qkv.shape
        kv = ctx.cache.layers[layer]
        q_norm, k_norm = self.q_norm, self.k_norm
        q = decode_kernel.gqa_prefill_prep(
            qkv.reshape(B * T, -1),
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            q_norm.eps if q_norm is not None else 0.0,
            ctx.cos.reshape(B * T, -1),
            ctx.sin.reshape(B * T, -1),
            kv.first.data,
            kv.second.data,
            ctx.rows,
            ctx.write_pos,
            cfg.num_heads,
            cfg.num_kv_heads,
            self.rotary.interleaved,
        ).view(B, T, cfg.num_heads, cfg.head_dim)
        rows, n, length = ctx.read_rows(), B, ctx.key_len
        k = kv.first.read_heads(rows, n, length, q.dtype)  # (B, Hkv, L, D)
        v = kv.second.read_heads(rows, n, length, q.dtype)
        out = sdpa(q.transpose(1, 2), k, v, ctx, cfg.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _kernel_decode(self, qkv: torch.Tensor, ctx: StepContext, layer: int) -> torch.Tensor:
        """q/k norm, rotary, cache write and attention of one decode step -> (B, H * D)."""
        cfg = self.cfg
        assert ctx.cache is not None
        kv = ctx.cache.layers[layer]
        q_norm, k_norm = self.q_norm, self.k_norm
        return decode_kernel.gqa_decode(
            qkv.reshape(qkv.shape[0], -1),
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            q_norm.eps if q_norm is not None else 0.0,
            ctx.cos[:, 0],
            ctx.sin[:, 0],
            kv.first.data,
            kv.second.data,
            ctx.rows,
            ctx.write_pos[:, 0],
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim**-0.5,
            self.rotary.interleaved,
        )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, scale: float
) -> torch.Tensor:
    """One new token per row: q (B, 1, H, D); k, v (B, Hkv, L, D) -> (B, 1, H * D).

    The G = H / Hkv query heads that share a KV head are G query rows of one small GEMM
    against that head's keys (a view of the heads-major cache, no copy). PyTorch's CPU flash
    kernel took about 1 ms per layer here at batch 32 (one query row per head: its blocking
    does not pay off), this about a tenth of it (benchmarks/RESULTS.md)."""
    B, _, H, D = q.shape
    hkv = k.shape[1]
    qg = q.reshape(B, hkv, H // hkv, D)  # head h = kv head h // G, as SDPA's enable_gqa
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G, L)
    if ctx.mask is not None:  # (B, 1, 1, L): rows of different lengths
        scores = scores.masked_fill(~ctx.mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, 1, H * D)


def cache_update(
    ctx: StepContext, layer: int, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's tensors into the cache and read back all L positions of each row."""
    assert ctx.cache is not None
    kv = ctx.cache.layers[layer]
    kv.first.write(ctx.rows, ctx.write_pos, first)
    kv.second.write(ctx.rows, ctx.write_pos, second)
    n, length, rows = first.shape[0], ctx.key_len, ctx.read_rows()
    return kv.first.read(rows, n, length, first.dtype), kv.second.read(
        rows, n, length, second.dtype
    )


def _latent_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    c_all: torch.Tensor,
    kr_all: torch.Tensor,
    ctx: StepContext,
    scale: float,
) -> torch.Tensor:
    """One decode step over the latent cache: q_lat (B, h, 1, r), q_rope (B, 1, h, dr),
    c_all (B, L, r), kr_all (B, L, dr) -> (B, h, 1, r).

    Every head reads the same latent keys, so the h heads are h query rows of one multi-query
    attention, and the key's two parts are multiplied separately: the cache is read once per
    step, not once per head, and never copied into a concatenated key (at 128k context that
    copy and the per-head reads were most of a step; benchmarks/RESULTS.md).

    On the CPU, where every row attends to all L keys, one compiled kernel does scores,
    softmax and output in a single pass over the cache (models/latent_kernel.py); the eager
    path below is five passes and MKL's skinny GEMMs (about 6 ms against 2.4 per layer at
    128k keys here)."""
    B, h = q_lat.shape[0], q_lat.shape[1]
    if ctx.mask is None and latent_kernel.applies(q_lat, c_all, kr_all):
        out = latent_kernel.latent_decode(
            q_lat.view(B, h, -1), q_rope.reshape(B, h, -1), c_all, kr_all, scale
        )
        return out.view(B, h, 1, -1)
    scores = torch.baddbmm(
        torch.bmm(q_lat.view(B, h, -1), c_all.transpose(1, 2)),
        q_rope.reshape(B, h, -1),
        kr_all.transpose(1, 2),
    )  # (B, h, L)
    if ctx.mask is not None:  # rows of different lengths: (B, 1, 1, L) -> (B, 1, L)
        scores = scores.masked_fill(~ctx.mask[:, 0], float("-inf"))
    probs = (scores.float() * scale).softmax(dim=-1).to(c_all.dtype)
    return torch.bmm(probs, c_all).view(B, h, 1, -1)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    K and V are up-projected from a per-token latent `c_kv` (kv_lora_rank values) plus one
    rotary key shared by all heads. With a latent cache we never expand K/V: the up-projection
    is absorbed into the query and the output (DeepSeek-V2 paper, section 2.1.2), so attention
    runs as multi-query attention over [c_kv, k_rope].
    """

    def __init__(self, hidden: int, cfg: AttentionConfig, rope: RopeConfig, eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        h, dqk = cfg.num_heads, cfg.qk_nope_dim + cfg.qk_rope_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(hidden, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * dqk, bias=False)
        else:
            self.q_proj = Linear(hidden, h * dqk, bias=False)
        self.kv_a_proj = Linear(hidden, cfg.kv_lora_rank + cfg.qk_rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(
            cfg.kv_lora_rank, h * (cfg.qk_nope_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = Linear(h * cfg.v_head_dim, hidden, bias=cfg.o_bias)
        self.rotary = Rotary(rope)

    def forward(self, x: torch.Tensor, ctx: StepContext, layer: int) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        h, dn, dr, dv, r = (
            cfg.num_heads,
            cfg.qk_nope_dim,
            cfg.qk_rope_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_rope = q.view(B, T, h, dn + dr).split([dn, dr], dim=-1)
        c_kv, k_rope = self.kv_a_proj(x).split([r, dr], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # (B, T, r)
        q_rope = self.rotary.apply(q_rope, ctx.cos, ctx.sin)
        k_rope = self.rotary.apply(k_rope.view(B, T, 1, dr), ctx.cos, ctx.sin).view(B, T, dr)

        if ctx.cache is not None and ctx.cache.latent:
            c_all, kr_all = cache_update(ctx, layer, c_kv, k_rope)  # (B, L, r), (B, L, dr)
            w = self.kv_b_proj.weight.view(h, dn + dv, r)
            w_uk, w_uv = w[:, :dn], w[:, dn:]  # (h, dn, r), (h, dv, r)
            q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)
            if T == 1:
                out_lat = _latent_decode(q_lat, q_rope, c_all, kr_all, ctx, cfg.softmax_scale)
            else:
                query = torch.cat((q_lat, q_rope.transpose(1, 2)), dim=-1)  # (B, h, T, r + dr)
                key = torch.cat((c_all, kr_all), dim=-1).unsqueeze(1)  # (B, 1, L, r + dr)
                # The value is c_kv, the key's first r dims: pass the key itself and drop the
                # rope dims of the output. Equal q/k/v head dims let PyTorch's CPU flash kernel
                # run; with v narrower it falls back to the math kernel, which materialises
                # h x T x L scores (1.3 GB per 512-token chunk at 32k context; 3x slower).
                out_lat = sdpa(query, key, key, ctx, cfg.softmax_scale)[..., :r]  # (B, h, T, r)
            out = torch.einsum("bhtr,hvr->bthv", out_lat, w_uv)
        else:
            kv = self.kv_b_proj(c_kv).view(B, T, h, dn + dv)
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat((k_nope, k_rope[:, :, None, :].expand(B, T, h, dr)), dim=-1)
            qf = torch.cat((q_nope, q_rope), dim=-1)
            if ctx.cache is not None:
                k, v = cache_update(ctx, layer, k, v)
            out = sdpa(
                qf.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx, cfg.softmax_scale
            )
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, T, h * dv))
