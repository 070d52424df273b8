"""The MoE decoder: one readable implementation for Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3.

Plain `nn.Module`s in the gpt-fast style. Shapes in comments use
B = batch rows, T = new tokens this step, L = key length (cached + new), H = heads,
D = head dim, E = experts, N = B*T flattened tokens, k = experts per token.

Parameter names are family-neutral (`layers.3.moe.router.weight`); the adapters in
`models/adapters/` map them to each family's checkpoint names.

Two seams matter to the rest of expertmesh:
- `DecoderLayer.attention_block` / `DecoderLayer.ffn_block` split a layer so the cluster can
  run attention on one node and the experts on others.
- `ExpertBank` holds any subset of a layer's experts and refuses (raises) when tokens are
  routed to an expert it does not hold, so no expert is ever silently skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig
from .errors import ExpertNotLoaded

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .router_stats import RouterStats

LogitsFor = Literal["last", "all"]


SKINNY_ROWS = 128
"""At or below this many input rows, `linear` computes (W @ x^T)^T instead of x @ W^T.

Measured on the project's CPU (AMD EPYC, AVX2, PyTorch 2.13 with MKL): for 2-64 rows and
weights not in cache, MKL's GEMM with the weight as the left operand runs about 2x faster
(decode and per-expert token groups are this shape); above ~128 rows the two are equal.
See benchmarks/RESULTS.md.
"""


def skinny_mm(weight: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """weight (out, in) @ xt (in, n) for a few columns n, laid out token-major (xt = x.t()).

    One column is computed as two: MKL's matrix-vector path for n = 1 measured about 2x
    slower here than its n = 2 GEMM (the weight is read once either way; benchmarks/RESULTS.md),
    so the column is duplicated and one copy of the result kept."""
    if xt.shape[1] != 1 or xt.device.type != "cpu":
        return torch.mm(weight, xt)
    pair = xt.t().expand(2, xt.shape[0]).contiguous().t()  # (in, 2), token-major
    return torch.mm(weight, pair)[:, :1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the weight-on-the-left GEMM for skinny inputs (see SKINNY_ROWS)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 0 or rows > SKINNY_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    out = skinny_mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (n, in) @ (weight * scale[:, None])^T for an int8 weight (out, in), float scale (out,).

    For a single row on CPU this is PyTorch's weight-only int8 kernel (`_weight_int8pack_mm`,
    the one gpt-fast uses). Otherwise the weight is dequantised and multiplied in x's dtype:
    on the project's AVX2 CPU that kernel costs about 35 us per row for a 384 x 256 weight
    (2.3 ms at 64 rows) against 30-90 us for dequantise + GEMM (benchmarks/RESULTS.md).
    """
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == scale.dtype:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale)
    return linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])


class Linear(nn.Linear):
    """nn.Linear that uses `linear` (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as the reference implementations do).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
    """Rotary position embedding; not a module (no parameters, nothing to load)."""

    def __init__(self, cfg: RopeConfig) -> None:
        self.interleaved = cfg.interleaved
        self.inv_freq, self.scale = rope_inv_freq(cfg)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, dim/2)
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

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
            hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = linear(x, *fused).split([hq, hkv, hkv], dim=-1)
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
    copy and the per-head reads were most of a step; benchmarks/RESULTS.md)."""
    B, h = q_lat.shape[0], q_lat.shape[1]
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


# ----------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses k experts per token and their weights, per the family's rule."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.score_bias: nn.Parameter | None = None
        if cfg.score_correction_bias:
            self.score_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.router_in_fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> expert ids (N, k), weights (N, k) in x's dtype, logits (N, E)."""
        cfg = self.cfg
        logits = self.logits(x)
        if cfg.scoring == "sigmoid":
            scores = logits.float().sigmoid()
        else:
            scores = logits.float().softmax(dim=-1)
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if cfg.topk_method != "greedy":
            choice = self._limit_to_groups(choice)
        if self.score_bias is None and cfg.topk_method != "group_top2_sum":
            weights, ids = torch.topk(choice, cfg.top_k, dim=-1)
        else:  # choose on biased scores, weight by the unbiased ones (DeepSeek-V3)
            ids = torch.topk(choice, cfg.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (
                weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.scoring == "sigmoid" else 0)
            )
        weights = weights * cfg.routed_scaling_factor
        return ids, weights.to(x.dtype), logits

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts in the best `topk_group` of `n_group` groups (DeepSeek)."""
        cfg = self.cfg
        grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        if cfg.topk_method == "group_max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, cfg.topk_group, dim=-1)[1], True)
        fill = 0.0 if cfg.topk_method == "group_max" else float("-inf")
        return grouped.masked_fill(~keep[..., None], fill).view_as(choice)


class ExpertBank(nn.Module):
    """Some or all routed experts of one layer, stacked for fast indexing.

    gate_up (n_local, 2*I, hidden) fuses each expert's gate and up projections;
    down (n_local, hidden, I). `expert_ids[i]` is the global id of local slot i.

    With `cfg.expert_weights == "int8"` both hold int8 weights (frozen) and
    `gate_up_scale` (n_local, 2*I) / `down_scale` (n_local, hidden) the float scale of each
    output channel: weight = int8 * scale (weight-only quantisation; activations stay float).
    """

    def __init__(
        self, layer: int, hidden: int, cfg: MoEConfig, act: str, expert_ids: Sequence[int]
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = cfg.num_experts
        self.intermediate = cfg.expert_intermediate
        self.act = act
        self.expert_ids = tuple(sorted(set(expert_ids)))
        n = len(self.expert_ids)
        self.quantized = cfg.expert_weights == "int8"
        qdtype = torch.int8 if self.quantized else None
        self.gate_up = nn.Parameter(
            torch.empty(n, 2 * cfg.expert_intermediate, hidden, dtype=qdtype),
            requires_grad=not self.quantized,
        )
        self.down = nn.Parameter(
            torch.empty(n, hidden, cfg.expert_intermediate, dtype=qdtype),
            requires_grad=not self.quantized,
        )
        self.gate_up_scale: nn.Parameter | None = None
        self.down_scale: nn.Parameter | None = None
        if self.quantized:
            self.gate_up_scale = nn.Parameter(torch.empty(n, 2 * cfg.expert_intermediate))
            self.down_scale = nn.Parameter(torch.empty(n, hidden))
        self.slot_of = [-1] * cfg.num_experts
        for slot, e in enumerate(self.expert_ids):
            self.slot_of[e] = slot

    @property
    def complete(self) -> bool:
        return len(self.expert_ids) == self.num_experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), ids/weights (N, k) -> weighted sum of the chosen experts (N, hidden)."""
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the N*k assignments by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token = order // k
        xs = x[token]  # (N*k, hidden), sorted by expert
        out = self.expert_outputs(xs, counts)
        result = torch.zeros_like(x)
        result.index_add_(0, token, out * weights.reshape(-1)[order, None])
        return result

    def expert_outputs(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Unweighted outputs for token rows `xs` sorted by expert; counts[e] rows go to expert e
        (global ids). One GEMM pair per expert that has tokens. Expert shards call this directly.

        Works in the transposed layout (features x tokens) throughout: W @ x^T is the fast
        GEMM shape here (see SKINNY_ROWS), gate and up become contiguous row blocks, and the
        per-expert Python work is a handful of tensor ops (it dominates at decode time)."""
        missing = [e for e, n in enumerate(counts) if n and self.slot_of[e] < 0]
        if missing:
            raise ExpertNotLoaded(self.layer, missing)
        if not xs.shape[0]:
            return xs.clone()
        if self.quantized:
            return self._int8_expert_outputs(xs, counts)
        gate_up, down = self._expert_views()
        xt = xs.t()  # (hidden, N*k), a view
        i = self.intermediate
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slot = self.slot_of[e]
            h = skinny_mm(gate_up[slot], xt[:, start : start + n])  # (2I, n)
            act = activation(self.act, h[:i]).mul_(h[i:])  # (I, n)
            # A (I, n) operand laid out token-major multiplies ~2x faster than row-major.
            outs.append(skinny_mm(down[slot], act.t().contiguous().t()))  # (hidden, n)
            start += n
        return torch.cat(outs, dim=1).t()

    def _int8_expert_outputs(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`expert_outputs` for int8 weights, in the (tokens x features) layout int8_linear takes."""
        assert self.gate_up_scale is not None and self.down_scale is not None
        i = self.intermediate
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slot = self.slot_of[e]
            x = xs[start : start + n]
            h = int8_linear(x, self.gate_up[slot], self.gate_up_scale[slot])  # (n, 2I)
            act = activation(self.act, h[:, :i]) * h[:, i:]  # (n, I)
            outs.append(int8_linear(act, self.down[slot], self.down_scale[slot]))  # (n, hidden)
            start += n
        return torch.cat(outs, dim=0)

    def _expert_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-expert weight views, rebuilt only when the parameters are replaced."""
        if torch.is_grad_enabled() and self.gate_up.requires_grad:
            # Training: cached views belong to an earlier pass's autograd graph, and the
            # optimizer's in-place update invalidates them; take fresh ones (cheap).
            return list(self.gate_up.unbind(0)), list(self.down.unbind(0))
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), self.gate_up.dtype)
        if getattr(self, "_views_key", None) != key:
            self._views = (list(self.gate_up.unbind(0)), list(self.down.unbind(0)))
            self._views_key = key
        return self._views


class MoEBlock(nn.Module):
    def __init__(
        self,
        layer: int,
        hidden: int,
        cfg: MoEConfig,
        act: str,
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = Router(hidden, cfg)
        ids = range(cfg.num_experts) if expert_ids is None else expert_ids
        self.experts = ExpertBank(layer, hidden, cfg, act, ids)
        self.shared = MLP(hidden, cfg.shared_intermediate, act) if cfg.shared_intermediate else None
        self.shared_gate = Linear(hidden, 1, bias=False) if cfg.shared_gate else None

    def forward(self, x: torch.Tensor, stats: RouterStats | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, hidden)
        ids, weights, _ = self.router(flat)
        if stats is not None:
            stats.record(self.layer, ids, weights)
        out = self.experts(flat, ids, weights)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.view(shape)


# ----------------------------------------------------------------------------- layers and model


class DecoderLayer(nn.Module):
    def __init__(
        self, layer: int, config: ModelConfig, expert_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        attn_cls = MLAttention if config.attention.kind == "mla" else Attention
        self.layer = layer
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = attn_cls(hidden, config.attention, config.rope, eps)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.moe: MoEBlock | None = None
        self.mlp: MLP | None = None
        if config.moe_layers[layer]:
            self.moe = MoEBlock(layer, hidden, config.moe, config.hidden_act, expert_ids)
        else:
            self.mlp = MLP(hidden, config.dense_intermediate, config.hidden_act)

    def attention_block(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x), ctx, self.layer)

    def ffn_block(self, x: torch.Tensor, stats: RouterStats | None = None) -> torch.Tensor:
        h = self.mlp_norm(x)
        if self.moe is not None:
            return x + self.moe(h, stats)
        assert self.mlp is not None
        return x + self.mlp(h)

    def forward(
        self, x: torch.Tensor, ctx: StepContext, stats: RouterStats | None = None
    ) -> torch.Tensor:
        return self.ffn_block(self.attention_block(x, ctx), stats)


class MoEModel(nn.Module):
    """Decoder-only MoE language model.

    `expert_ids` selects which routed experts each MoE layer materialises
    ({layer: ids}; layers not named, or None, hold all experts).
    """

    def __init__(
        self, config: ModelConfig, expert_ids: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        selection = expert_ids or {}
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(i, config, selection.get(i)) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary: Rotary = self.blocks[0].attn.rotary

    @property
    def blocks(self) -> list[DecoderLayer]:
        """The decoder layers, typed (nn.ModuleList items are plain Modules to a type checker)."""
        return list(self.layers)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def context(
        self, B: int, T: int, cache: KVCache | None, rows: torch.Tensor | None
    ) -> StepContext:
        """Positions, rotary tables and the attention mask for B rows of T new tokens."""
        if rows is None:
            rows = torch.arange(B)
            prefix = True
        else:
            prefix = bool(rows.numel() == B and torch.equal(rows, torch.arange(B)))
        start = cache.lengths[rows] if cache is not None else torch.zeros(B, dtype=torch.long)
        write_pos = start[:, None] + torch.arange(T)  # (B, T)
        key_len = int(start.max()) + T
        window = self.config.attention.sliding_window
        mask = None
        # A decode step whose rows all hold the same length attends to every key: no mask.
        uniform_decode = T == 1 and bool((start == start[0]).all())
        needs_window = window is not None and key_len > window
        if (key_len != T and not uniform_decode) or needs_window:
            keys = torch.arange(key_len)  # (L,)
            mask = keys[None, None, :] <= write_pos[:, :, None]  # (B, T, L) causal
            if window is not None:
                mask &= keys[None, None, :] > write_pos[:, :, None] - window
            mask = mask[:, None]  # (B, 1, T, L)
        cos, sin = self.rotary.cos_sin(write_pos, self.dtype)
        device = self.embed.weight.device
        if device.type != "cpu":  # positions are host bookkeeping; the tables go to the weights
            cos, sin = cos.to(device), sin.to(device)
            mask = None if mask is None else mask.to(device)
        return StepContext(cos, sin, cache, rows, prefix, write_pos, key_len, mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        router_stats: RouterStats | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden); advances the cache by T for `rows`."""
        B, T = input_ids.shape
        ctx = self.context(B, T, cache, rows)
        x = self.embed(input_ids.to(self.embed.weight.device))
        for layer in self.layers:
            x = layer(x, ctx, router_stats)
        if cache is not None:
            cache.advance(ctx.rows, T)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        logits_for: LogitsFor = "all",
        router_stats: RouterStats | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for logits_for='last'."""
        h = self.hidden_states(input_ids, cache, rows, router_stats)
        if logits_for == "last":
            h = h[:, -1:]
        return self.lm_head(h)


def init_random(model: MoEModel, seed: int = 0, std: float = 0.02) -> MoEModel:
    """Seeded random weights (norms to 1, DeepSeek score bias to 0): demo and benchmark models."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("score_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
