"""A CPU kernel for the routed experts of one layer when every expert gets only a few tokens
(decode): gate/up GEMM, SiLU-gating and down GEMM for all experts in two parallel regions,
instead of ~7 eager ops and two MKL calls per expert.

Why: at decode time an expert's GEMM is W (512 x 512) @ x (512 x n) for n = 1-8 token
columns. MKL's kernels for such n reach 6-18 GB/s here depending on n (benchmarks/RESULTS.md),
each call parallelises over 2 threads on its own, and the Python work per expert (slices,
activation, transposes) is a fixed cost per expert and step. This kernel streams each weight
row once per group of up to 4 tokens (dot products along the contiguous `in` dimension,
AVX2/FMA), splits the work of the whole layer across the intra-op threads, and fuses the
activation into the first GEMM.

It is built ahead of time by `python -m expertmesh.models.native` (`make venv` runs it; g++
and ninja, about a minute) and only loaded here, never compiled in a serving process or an
expert shard (`models/native.py` says why). Where it is not built (no compiler, no AVX2, not
run), `available()` is False, the reason is logged once, and ExpertBank keeps its pure-torch
path; `EXPERTMESH_MOE_KERNEL=0` turns the kernel off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# decode_kernel registers its spec on import: `python -m expertmesh.models.native` imports this
# module, so it builds that kernel too.
from . import decode_kernel, native  # noqa: F401

MAX_TOKENS_PER_EXPERT = 8
"""The kernel computes the experts with at most this many tokens; ExpertBank runs the others
as MKL GEMMs, faster from about 8 columns up (prefill)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

// Software prefetch of the weight rows this many rows ahead: 14 -> 18 GB/s at 4 tokens,
// 2 threads (no prefetch / 2 / 4 / 8 rows ahead measured; 4 and 8 equal).
constexpr int64_t PREFETCH = 4;

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

// y[j * ldy + r] = dot(W row r, X row j) for r in [r0, r1), j in [0, NJ); K % 8 == 0.
// Two weight rows at a time, so each weight vector loaded feeds 2 * NJ FMAs.
template <int NJ>
void dots(const float* W, const float* X, int64_t K, int64_t r0, int64_t r1, float* Y,
          int64_t ldy) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    const float* w0 = W + r * K;
    const float* w1 = w0 + K;
    __m256 a0[NJ], a1[NJ];
    for (int j = 0; j < NJ; ++j) {
      a0[j] = _mm256_setzero_ps();
      a1[j] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 8) {
      if (PREFETCH) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + PREFETCH * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w1 + PREFETCH * K + k), _MM_HINT_T0);
      }
      __m256 v0 = _mm256_loadu_ps(w0 + k);
      __m256 v1 = _mm256_loadu_ps(w1 + k);
      for (int j = 0; j < NJ; ++j) {
        __m256 xv = _mm256_loadu_ps(X + j * K + k);
        a0[j] = _mm256_fmadd_ps(v0, xv, a0[j]);
        a1[j] = _mm256_fmadd_ps(v1, xv, a1[j]);
      }
    }
    for (int j = 0; j < NJ; ++j) {
      Y[j * ldy + r] = hsum(a0[j]);
      Y[j * ldy + r + 1] = hsum(a1[j]);
    }
  }
  for (; r < r1; ++r) {
    const float* w0 = W + r * K;
    __m256 a0[NJ];
    for (int j = 0; j < NJ; ++j) a0[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      __m256 v0 = _mm256_loadu_ps(w0 + k);
      for (int j = 0; j < NJ; ++j)
        a0[j] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(X + j * K + k), a0[j]);
    }
    for (int j = 0; j < NJ; ++j) Y[j * ldy + r] = hsum(a0[j]);
  }
}

// n token rows X (n, K) against weight rows [r0, r1) of W (rows, K), in groups of <= 4.
void dots_n(const float* W, const float* X, int64_t K, int64_t r0, int64_t r1, int64_t n,
            float* Y, int64_t ldy) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const float* x = X + j0 * K;
    float* y = Y + j0 * ldy;
    switch (std::min<int64_t>(4, n - j0)) {
      case 1: dots<1>(W, x, K, r0, r1, y, ldy); break;
      case 2: dots<2>(W, x, K, r0, r1, y, ldy); break;
      case 3: dots<3>(W, x, K, r0, r1, y, ldy); break;
      default: dots<4>(W, x, K, r0, r1, y, ldy); break;
    }
  }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

// xs (M, H): token rows sorted by expert; counts[i] rows go to local slot slots[i].
// gate_up (E, 2I, H), down (E, H, I). Returns (M, H) = down @ (silu(gate @ x) * (up @ x));
// the rows of experts with more than max_n tokens are left unwritten (the caller fills them).
torch::Tensor expert_mlp(torch::Tensor xs, std::vector<int64_t> counts,
                         std::vector<int64_t> slots, torch::Tensor gate_up, torch::Tensor down,
                         int64_t block, int64_t max_n) {
  const int64_t M = xs.size(0), H = xs.size(1);
  const int64_t I = down.size(2);
  auto act = torch::empty({M, I}, xs.options());
  auto out = torch::empty({M, H}, xs.options());
  const float* X = xs.data_ptr<float>();
  const float* GU = gate_up.data_ptr<float>();
  const float* D = down.data_ptr<float>();
  float* A = act.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t E = (int64_t)counts.size();
  std::vector<int64_t> offset(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) offset[e + 1] = offset[e] + counts[e];
  const int64_t ib = (I + block - 1) / block, hb = (H + block - 1) / block;

  // Gate and up rows of one block together, so the activation is applied in place.
  at::parallel_for(0, E * ib, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> g(block * 4), u(block * 4);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / ib, r0 = (t % ib) * block, r1 = std::min(I, r0 + block);
      const int64_t n = counts[e];
      if (n == 0 || n > max_n) continue;
      const float* W = GU + slots[e] * 2 * I * H;
      for (int64_t j0 = 0; j0 < n; j0 += 4) {
        const int64_t nj = std::min<int64_t>(4, n - j0);
        const float* x = X + (offset[e] + j0) * H;
        // Rows r0..r1 of gate and of up; row r lands at g[j * block + (r - r0)].
        dots_n(W + r0 * H, x, H, 0, r1 - r0, nj, g.data(), block);
        dots_n(W + (I + r0) * H, x, H, 0, r1 - r0, nj, u.data(), block);
        for (int64_t j = 0; j < nj; ++j) {
          float* a = A + (offset[e] + j0 + j) * I;
          for (int64_t r = r0; r < r1; ++r)
            a[r] = silu(g[j * block + r - r0]) * u[j * block + r - r0];
        }
      }
    }
  });
  at::parallel_for(0, E * hb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / hb, r0 = (t % hb) * block, r1 = std::min(H, r0 + block);
      const int64_t n = counts[e];
      if (n == 0 || n > max_n) continue;
      const float* W = D + slots[e] * H * I;
      dots_n(W, A + offset[e] * I, I, r0, r1, n, O + offset[e] * H, H);
    }
  });
  return out;
}
"""

SPEC = native.register(
    native.KernelSpec(
        "expertmesh_moe_kernel",
        _SOURCE,
        ("expert_mlp",),
        ("-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"),
        ("-fopenmp",),
    )
)


available = SPEC.available
unavailable_reason = SPEC.why_not
"""Why the kernel is not used (None when it is)."""


def applies(xs: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether `expert_mlp` can run these inputs: fp32 on CPU, widths a multiple of 8 (16 for
    gate_up's 2I rows), no autograd, and the kernel built."""
    return (
        xs.device.type == "cpu"
        and xs.dtype == torch.float32
        and gate_up.dtype == torch.float32
        and xs.shape[1] % 8 == 0
        and gate_up.shape[1] % 16 == 0
        and not (torch.is_grad_enabled() and gate_up.requires_grad)
        and available()
    )


def expert_mlp(
    xs: torch.Tensor,
    counts: Sequence[int],
    slots: Sequence[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    block: int = 32,
    max_tokens: int = MAX_TOKENS_PER_EXPERT,
) -> torch.Tensor:
    """down[s] @ (silu(gate[s] @ x) * (up[s] @ x)) for each expert's rows of `xs` (sorted by
    expert; counts[i] rows for local slot slots[i]) -> (rows, hidden). SiLU only. The rows of
    experts with more than `max_tokens` tokens are left uninitialised: the caller computes
    those (MKL is faster there)."""
    module = SPEC.load()
    assert module is not None, "expert_mlp called without the kernel; check applies() first"
    return module.expert_mlp(
        xs.contiguous(),
        list(counts),
        list(slots),
        gate_up.contiguous(),
        down.contiguous(),
        block,
        max_tokens,
    )
