"""CPU kernels for the dense part of a forward pass (AVX2/FMA, fp32, no autograd):

- `gqa_decode`: one decode step of grouped-query attention (`Attention`, T == 1) from the
  fused q/k/v projection to the attention output in one call, instead of ~40 eager ops a
  layer. Per (batch row, KV head), in one parallel region over the intra-op threads: per-head
  q/k RMSNorm (Qwen3), rotary on q and k, this token's k and v written into the heads-major KV
  cache (`TensorStore`, slot x head x position x dim), then the G = H / Hkv query heads that
  share the KV head scored against the row's keys 0..pos in one pass (each key row read once
  for all G), fp32 softmax, and the probabilities times the values in a second pass.
- `gqa_prefill_prep`: the norms, rotary and cache write of T > 1 tokens (prefill, chunks);
  q comes back token-major for PyTorch's flash SDPA, which still does the attention.
- `rms_norm_rows`: `RMSNorm` in one pass a row (F.rms_norm is six ops on the CPU: 5.7 ms for
  4096 x 512 rows here against 0.16 ms).
- `few_rows_linear`: x @ W^T for <= 32 rows, the moe kernel's dot-product blocks on a dense
  weight: each block of 32 weight rows read from memory once and reused from cache for every
  group of 4 input rows (MKL's GEMMs for 8-12 rows reached 9-14 GB/s here, this 19-31).

Why: at decode time a layer's attention reads a few hundred keys per head (the prompt is 128
tokens in bench_engine.py) and does about 10 MFLOP at batch 32; the eager path (two RMSNorms
of 4 ops each, two rotaries of ~10 ops, two `index_put_`s into the cache, two `bmm`s of 128
tiny matrices, softmax, reshapes) took 14.9 ms of a 31.8 ms step at batch 32 and 6.8 of 16.8
at batch 8 on this machine: per-op and per-matrix overhead, not FLOPs; the kernel step reads
the cache at about the machine's memory bandwidth (benchmarks/RESULTS.md).

Numerics: the same operations in the same order per element as the eager paths (fp32;
compiled with -ffp-contract=off so rotary's products are not fused), except the sums (RMSNorm,
dot products, the weighted sum of values), whose order differs as between any two GEMM
kernels. bench_engine.py's greedy tokens are unchanged at batch 1, 8 and 32.

Built ahead of time like the MoE kernel (`python -m expertmesh.models.native`).
`EXPERTMESH_DECODE_KERNEL=0` turns it off; where it is not built the eager paths run.
"""

from __future__ import annotations

from typing import Any

import torch

from . import native

_SOURCE = (
    native.CPP_PRELUDE
    + native.CPP_DOT_BLOCKS
    + r"""
namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d < D; d += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

// y = w * (x * rsqrt(mean(x^2) + eps)), as RMSNorm (F.rms_norm, then the weight); w may be null.
inline void rms_norm(const float* x, const float* w, int64_t D, float eps, float* y) {
  float ss = dot(x, x, D);
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t d = 0; d < D; ++d) {
    const float v = x[d] * r;
    y[d] = w ? w[d] * v : v;
  }
}

// Rotary on x (D) into y: pairs (d, d + D/2), or (2d, 2d + 1) when interleaved; the output
// is [x1 * cos - x2 * sin, x2 * cos + x1 * sin] either way (Rotary.apply).
inline void rotate(const float* x, const float* cos, const float* sin, int64_t D,
                   bool interleaved, float* y) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = interleaved ? x[2 * d] : x[d];
    const float x2 = interleaved ? x[2 * d + 1] : x[half + d];
    const float a = x1 * cos[d], b = x2 * sin[d];
    const float c = x2 * cos[d], e = x1 * sin[d];
    y[d] = a - b;
    y[half + d] = c + e;
  }
}

}  // namespace

// qkv (B, (H + 2 Hkv) D): this step's projections, q heads then k heads then v heads.
// q_norm_w / k_norm_w: (D,) per-head RMSNorm weights, or empty tensors for no norm.
// cos, sin (B, D/2); kcache, vcache (slots, Hkv, max_len, D) contiguous fp32;
// rows (B,) cache slots; pos (B,) this token's position (the row attends to 0..pos).
// Returns (B, H D).
torch::Tensor gqa_decode(torch::Tensor qkv, torch::Tensor q_norm_w, torch::Tensor k_norm_w,
                         double eps, torch::Tensor cos, torch::Tensor sin, torch::Tensor kcache,
                         torch::Tensor vcache, torch::Tensor rows, torch::Tensor pos, int64_t H,
                         int64_t Hkv, double scale, bool interleaved) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat);
  TORCH_CHECK(kcache.is_contiguous() && vcache.is_contiguous() && kcache.dim() == 4);
  const int64_t B = qkv.size(0), D = kcache.size(3), Lmax = kcache.size(2);
  const int64_t slots = kcache.size(0);
  TORCH_CHECK(kcache.size(1) == Hkv && qkv.size(1) == (H + 2 * Hkv) * D && D % 8 == 0);
  TORCH_CHECK(H % Hkv == 0 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == D / 2 && sin.sizes() == cos.sizes());
  TORCH_CHECK(rows.scalar_type() == torch::kLong && pos.scalar_type() == torch::kLong);
  const int64_t G = H / Hkv;
  const int64_t* R = rows.data_ptr<int64_t>();
  const int64_t* P = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(R[b] >= 0 && R[b] < slots && P[b] >= 0 && P[b] < Lmax, "row or position out of range");
  const float* X = qkv.data_ptr<float>();
  const float* QW = q_norm_w.numel() ? q_norm_w.data_ptr<float>() : nullptr;
  const float* KW = k_norm_w.numel() ? k_norm_w.data_ptr<float>() : nullptr;
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float* KC = kcache.data_ptr<float>();
  float* VC = vcache.data_ptr<float>();
  auto out = torch::empty({B, H * D}, qkv.options());
  float* O = out.data_ptr<float>();
  const float fscale = (float)scale, feps = (float)eps;
  const int64_t width = (H + 2 * Hkv) * D;

  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  parallel_tasks(B * Hkv, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(G * D), tmp(D), probs, acc(G * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv, p = P[b], L = p + 1;
      const float* x = X + b * width;
      const float* cb = C + b * (D / 2);
      const float* sb = S + b * (D / 2);
      float* kbase = KC + (R[b] * Hkv + g) * Lmax * D;
      float* vbase = VC + (R[b] * Hkv + g) * Lmax * D;
      // This token's key (norm, rotary) and value into the cache.
      const float* kx = x + (H + g) * D;
      if (KW) {
        rms_norm(kx, KW, D, feps, tmp.data());
        kx = tmp.data();
      }
      rotate(kx, cb, sb, D, interleaved, kbase + p * D);
      std::copy(x + (H + Hkv + g) * D, x + (H + Hkv + g + 1) * D, vbase + p * D);
      for (int64_t j = 0; j < G; ++j) {
        const float* qx = x + (g * G + j) * D;
        if (QW) {
          rms_norm(qx, QW, D, feps, tmp.data());
          qx = tmp.data();
        }
        rotate(qx, cb, sb, D, interleaved, q.data() + j * D);
      }
      // Scores of the G query heads, one pass over the keys.
      probs.resize(G * L);
      for (int64_t l = 0; l < L; ++l) {
        const float* krow = kbase + l * D;
        for (int64_t j = 0; j < G; ++j) probs[j * L + l] = dot(q.data() + j * D, krow, D) * fscale;
      }
      for (int64_t j = 0; j < G; ++j) {
        float* s = probs.data() + j * L;
        float m = -INFINITY;
        for (int64_t l = 0; l < L; ++l) m = std::max(m, s[l]);
        float sum = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
          s[l] = std::exp(s[l] - m);
          sum += s[l];
        }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; ++l) s[l] *= inv;
      }
      // Probabilities times values, one pass over the values.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t l = 0; l < L; ++l) {
        const float* vrow = vbase + l * D;
        for (int64_t j = 0; j < G; ++j) {
          const __m256 pj = _mm256_set1_ps(probs[j * L + l]);
          float* a = acc.data() + j * D;
          for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(a + d, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vrow + d),
                                                    _mm256_loadu_ps(a + d)));
        }
      }
      for (int64_t j = 0; j < G; ++j)
        std::copy(acc.data() + j * D, acc.data() + (j + 1) * D, O + b * H * D + (g * G + j) * D);
    }
  });
  return out;
}

// y = w * (x * rsqrt(mean(x^2) + eps)) per row: x (N, D) contiguous fp32, w (D,).
torch::Tensor rms_norm_rows(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat);
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(D % 8 == 0 && w.numel() == D && w.is_contiguous());
  auto y = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float feps = (float)eps;
  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm(X + r * D, W, D, feps, Y + r * D);
  });
  return y;
}

// y (n, out) = x (n, in) @ W^T for a few rows n: each block of `block` weight rows is read
// from memory once and reused from cache for every group of 4 rows of x. in % 8 == 0.
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor weight, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous());
  const int64_t n = x.size(0), K = x.size(1), R = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && K % 8 == 0);
  auto y = torch::empty({n, R}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = weight.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t nb = (R + block - 1) / block;
  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  parallel_tasks(nb, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      dots_n<false>(W, X, K, b * block, std::min(R, (b + 1) * block), n, Y, R);
  });
  return y;
}

// Prefill (T tokens a row): per-head q/k RMSNorm and rotary for every token, k and v
// written into the heads-major cache at pos, q returned in (B * T, H * D) (token-major) order.
// qkv (B * T, (H + 2 Hkv) D); cos, sin (B * T, D/2); rows (B,); pos (B, T).
torch::Tensor gqa_prefill_prep(torch::Tensor qkv, torch::Tensor q_norm_w, torch::Tensor k_norm_w,
                               double eps, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor kcache, torch::Tensor vcache, torch::Tensor rows,
                               torch::Tensor pos, int64_t H, int64_t Hkv, bool interleaved) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat);
  TORCH_CHECK(kcache.is_contiguous() && vcache.is_contiguous() && kcache.dim() == 4);
  TORCH_CHECK(pos.dim() == 2 && pos.is_contiguous() && rows.is_contiguous());
  const int64_t B = pos.size(0), T = pos.size(1), D = kcache.size(3), Lmax = kcache.size(2);
  const int64_t slots = kcache.size(0);
  TORCH_CHECK(qkv.size(0) == B * T && kcache.size(1) == Hkv && qkv.size(1) == (H + 2 * Hkv) * D);
  TORCH_CHECK(D % 8 == 0 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.size(0) == B * T && cos.size(1) == D / 2 && sin.sizes() == cos.sizes());
  TORCH_CHECK(rows.scalar_type() == torch::kLong && pos.scalar_type() == torch::kLong);
  const int64_t* R = rows.data_ptr<int64_t>();
  const int64_t* P = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(R[b] >= 0 && R[b] < slots, "row out of range");
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(P[i] >= 0 && P[i] < Lmax, "position out of range");
  const float* X = qkv.data_ptr<float>();
  const float* QW = q_norm_w.numel() ? q_norm_w.data_ptr<float>() : nullptr;
  const float* KW = k_norm_w.numel() ? k_norm_w.data_ptr<float>() : nullptr;
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float* KC = kcache.data_ptr<float>();
  float* VC = vcache.data_ptr<float>();
  auto q = torch::empty({B * T, H * D}, qkv.options());
  float* Q = q.data_ptr<float>();
  const float feps = (float)eps;
  const int64_t width = (H + 2 * Hkv) * D;
  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  at::parallel_for(0, B * T, 8, [&](int64_t i0, int64_t i1) {
    std::vector<float> tmp(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, p = P[i];
      const float* x = X + i * width;
      const float* ci = C + i * (D / 2);
      const float* si = S + i * (D / 2);
      for (int64_t h = 0; h < H; ++h) {
        const float* qx = x + h * D;
        if (QW) {
          rms_norm(qx, QW, D, feps, tmp.data());
          qx = tmp.data();
        }
        rotate(qx, ci, si, D, interleaved, Q + i * H * D + h * D);
      }
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at = ((R[b] * Hkv + g) * Lmax + p) * D;
        const float* kx = x + (H + g) * D;
        if (KW) {
          rms_norm(kx, KW, D, feps, tmp.data());
          kx = tmp.data();
        }
        rotate(kx, ci, si, D, interleaved, KC + at);
        std::copy(x + (H + Hkv + g) * D, x + (H + Hkv + g + 1) * D, VC + at);
      }
    }
  });
  return q;
}
"""
)

SPEC = native.register(
    native.KernelSpec(
        "expertmesh_decode_kernel",
        _SOURCE,
        ("gqa_decode", "gqa_prefill_prep", "rms_norm_rows", "few_rows_linear"),
        ("-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"),
        ("-fopenmp",),
    )
)

available = SPEC.available
unavailable_reason = SPEC.why_not
"""Why the kernel is not used (None when it is)."""

_EMPTY = torch.empty(0)


def applies(qkv: torch.Tensor, kcache: torch.Tensor, head_dim: int) -> bool:
    """Whether `gqa_decode` can run: fp32 on the CPU, a contiguous fp32 cache of this head
    dim, head_dim a multiple of 8 (at most 1024), no autograd, and the kernel built."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype == torch.float32
        and kcache.dtype == torch.float32
        and kcache.dim() == 4
        and kcache.shape[-1] == head_dim
        and head_dim % 8 == 0
        and head_dim <= 1024
        and not (torch.is_grad_enabled() and qkv.requires_grad)
        and available()
    )


def gqa_decode(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kcache: torch.Tensor,
    vcache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    interleaved: bool = False,
) -> torch.Tensor:
    """One decode step: qkv (B, (H + 2 Hkv) D) -> attention output (B, H D); writes this
    step's k (normed, rotated) and v into kcache/vcache[rows, :, pos] (heads-major stores).
    cos/sin (B, D/2) with the rotary scale applied; q_norm/k_norm per-head RMSNorm weights
    (D,) or None."""
    module = SPEC.load()
    assert module is not None, "gqa_decode called without the kernel; check applies() first"
    args = _gqa_args(qkv, q_norm, k_norm, eps, cos, sin, kcache, vcache, rows, pos)
    return module.gqa_decode(*args, num_heads, num_kv_heads, float(scale), interleaved)


def _gqa_args(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kcache: torch.Tensor,
    vcache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
) -> tuple[Any, ...]:
    """The leading arguments of the two GQA entry points, in the layout the C++ reads."""
    return (
        qkv.contiguous(),
        _EMPTY if q_norm is None else q_norm.detach().float().contiguous(),
        _EMPTY if k_norm is None else k_norm.detach().float().contiguous(),
        float(eps),
        cos.contiguous(),
        sin.contiguous(),
        kcache,
        vcache,
        rows.contiguous(),
        pos.contiguous(),
    )


def _plain_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autograd, the kernel built: what every dense entry point needs."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` can run: fp32 CPU tensors, last dim a multiple of 8, no autograd."""
    return x.dim() >= 1 and x.shape[-1] % 8 == 0 and _plain_fp32(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in one pass per row."""
    module = SPEC.load()
    assert module is not None, "rms_norm called without the kernel; check rms_norm_applies()"
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return module.rms_norm_rows(rows, weight.detach().contiguous(), float(eps)).view(x.shape)


FEW_ROWS = 32
"""`few_rows_linear` runs inputs of at most this many rows (layers.linear).

32, not 16: at batch 32 (bench_engine.py's decode step: q/k/v, o_proj and lm_head, weights
cold from DRAM behind the experts) it measured 24.39 -> 23.47 ms a step against MKL's
weight-left GEMM (median of 10 calls each, alternating in one process, load 1.8; greedy
tokens identical), and it runs in the same OpenMP pool as the attention kernel."""


def linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_rows_linear` can run: fp32 on the CPU, in-features a multiple of 8,
    no autograd, the kernel built."""
    return weight.dim() == 2 and weight.shape[1] % 8 == 0 and _plain_fp32(x, weight)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x (n, in) @ weight (out, in)^T for a few rows n, the weight streamed once."""
    module = SPEC.load()
    assert module is not None, "few_rows_linear called without the kernel; check linear_applies()"
    return module.few_rows_linear(x.contiguous(), weight.detach().contiguous(), block)


def gqa_prefill_prep(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kcache: torch.Tensor,
    vcache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    interleaved: bool = False,
) -> torch.Tensor:
    """T new tokens a row: qkv (B * T, (H + 2 Hkv) D) -> q (B * T, H * D), normed and rotated;
    k (normed, rotated) and v written into kcache/vcache[rows, :, pos]. cos/sin
    (B * T, D/2); pos (B, T)."""
    module = SPEC.load()
    assert module is not None, "gqa_prefill_prep called without the kernel; check applies()"
    args = _gqa_args(qkv, q_norm, k_norm, eps, cos, sin, kcache, vcache, rows, pos)
    return module.gqa_prefill_prep(*args, num_heads, num_kv_heads, interleaved)
