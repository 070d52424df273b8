"""A CPU kernel for one decode step of latent attention (MLA with a latent cache): scores,
softmax and the weighted sum of the latent values in one pass over the cache.

Why: at long context a decode step is a read of the whole latent cache (c_kv and the rotary
key, (r + dr) values per token and layer). In eager PyTorch it is five passes: two skinny
GEMMs for the scores (h query rows against L keys: MKL reaches about 8 GB/s on them here),
the scale, the softmax and a third GEMM for the output, which reads c_kv again. At 128k
tokens those came to about 6 ms per layer against about 1 ms for reading the 24 MB once
(benchmarks/RESULTS.md, "Long context"). This kernel walks the cache in blocks of
`BLOCK` tokens: the block's scores for every head (dot products along the contiguous
feature dimension, AVX2/FMA), an online softmax (running max and sum per head, as in
flash-attention's decode), and the block's contribution to each head's output while the
block is still in L1. The cache is read once, nothing of size L is written.

It is built ahead of time by `python -m expertmesh.models.native` (`make venv` runs it; g++
and ninja, `models/native.py`) and only loaded here. Where it is not built (no compiler, no
AVX2, not run), `available()` is False, the reason is logged once, and attention keeps its
torch path; `EXPERTMESH_LATENT_KERNEL=0` turns the kernel off.

Numerics: fp32 throughout; exp is a degree-6 polynomial after range reduction (relative
error about 2e-7, as the Cephes expf); the sums run in another order than MKL's, so outputs
differ from the torch path in the last bits (tests/models/test_latent_kernel.py bounds it).
"""

from __future__ import annotations

import torch

from . import native

BLOCK = 64
"""Tokens per block: 64 x (32 + 16) fp32 = 12 KB for the benchmark model, in L1."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

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

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + f, |f| <= ln2 / 2, e^f by the Cephes
// expf polynomial, 2^n by the exponent bits. Below -87 the result is 0.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 f2 = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, f2, f);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, r);
}

// The 8 sums of a0..a7 (each the sum of its lanes) as one vector.
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                    __m256 a6, __m256 a7) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int64_t RT, int64_t DRT>
inline __m256 dot_parts(const float* q, const float* qr, const float* cj, const float* kj,
                        int64_t R_, int64_t DR_) {
  const int64_t R = RT ? RT : R_, DR = DRT ? DRT : DR_;
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; k += 8)
    a = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), _mm256_loadu_ps(cj + k), a);
  for (int64_t k = 0; k < DR; k += 8)
    b = _mm256_fmadd_ps(_mm256_loadu_ps(qr + k), _mm256_loadu_ps(kj + k), b);
  return _mm256_add_ps(a, b);
}

// One row: q_lat (H, R), q_rope (H, DR) contiguous; c rows of R floats `cs` apart, kr rows
// of DR floats `ks` apart; L keys; out (H, R). `block` is a multiple of 8. RT/DRT: R and DR
// known at compile time (0: read at run time).
template <int64_t RT, int64_t DRT>
void decode_row(const float* ql, const float* qr, const float* c, int64_t cs,
                const float* kr, int64_t ks, int64_t L, int64_t H, int64_t R_, int64_t DR_,
                float scale, int64_t block, float* out) {
  const int64_t R = RT ? RT : R_, DR = DRT ? DRT : DR_;
  std::vector<float> acc(H * R, 0.0f), m(H, -std::numeric_limits<float>::infinity()),
      l(H, 0.0f), s(H * block);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t j0 = 0; j0 < L; j0 += block) {
    const int64_t nb = std::min(block, L - j0);
    const float* cb = c + j0 * cs;
    const float* kb = kr + j0 * ks;
    // scores of the block: 8 tokens at a time, one vector of 8 sums per head
    int64_t j = 0;
    for (; j + 8 <= nb; j += 8) {
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = ql + h * R;
        const float* qrh = qr + h * DR;
        __m256 d[8];
        for (int t = 0; t < 8; ++t) d[t] = dot_parts<RT, DRT>(qh, qrh, cb + (j + t) * cs, kb + (j + t) * ks, R, DR);
        _mm256_storeu_ps(s.data() + h * block + j,
                         _mm256_mul_ps(hsum8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]), vscale));
      }
    }
    for (; j < nb; ++j)
      for (int64_t h = 0; h < H; ++h)
        s[h * block + j] = hsum(dot_parts<RT, DRT>(ql + h * R, qr + h * DR, cb + j * cs, kb + j * ks, R, DR)) * scale;
    for (int64_t h = 0; h < H; ++h) {
      float* sh = s.data() + h * block;
      float mb = m[h];
      for (int64_t t = 0; t < nb; ++t) mb = std::max(mb, sh[t]);
      float* ah = acc.data() + h * R;
      if (mb > m[h]) {  // new running max: rescale what was summed so far
        const float f = std::exp(m[h] - mb);
        l[h] *= f;
        for (int64_t k = 0; k < R; ++k) ah[k] *= f;
        m[h] = mb;
      }
      const __m256 mv = _mm256_set1_ps(mb);
      __m256 lsum = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 8 <= nb; t += 8) {
        __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(sh + t), mv));
        _mm256_storeu_ps(sh + t, p);
        lsum = _mm256_add_ps(lsum, p);
      }
      float tail = 0.0f;
      for (; t < nb; ++t) {
        sh[t] = std::exp(sh[t] - mb);
        tail += sh[t];
      }
      l[h] += hsum(lsum) + tail;
      // the block's weighted sum of latents, 4 tokens in flight, then added to the total
      for (int64_t k = 0; k < R; k += 8) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const float* ck = cb + k;
        int64_t u = 0;
        for (; u + 4 <= nb; u += 4) {
          a0 = _mm256_fmadd_ps(_mm256_set1_ps(sh[u]), _mm256_loadu_ps(ck + u * cs), a0);
          a1 = _mm256_fmadd_ps(_mm256_set1_ps(sh[u + 1]), _mm256_loadu_ps(ck + (u + 1) * cs), a1);
          a2 = _mm256_fmadd_ps(_mm256_set1_ps(sh[u + 2]), _mm256_loadu_ps(ck + (u + 2) * cs), a2);
          a3 = _mm256_fmadd_ps(_mm256_set1_ps(sh[u + 3]), _mm256_loadu_ps(ck + (u + 3) * cs), a3);
        }
        for (; u < nb; ++u)
          a0 = _mm256_fmadd_ps(_mm256_set1_ps(sh[u]), _mm256_loadu_ps(ck + u * cs), a0);
        __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        _mm256_storeu_ps(ah + k, _mm256_add_ps(_mm256_loadu_ps(ah + k), sum));
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = 1.0f / l[h];
    for (int64_t k = 0; k < R; ++k) out[h * R + k] = acc[h * R + k] * inv;
  }
}

}  // namespace

// q_lat (B, H, R), q_rope (B, H, DR) contiguous; c (B, L, R), kr (B, L, DR) with contiguous
// rows (any row and batch strides) -> (B, H, R).
torch::Tensor latent_decode(torch::Tensor q_lat, torch::Tensor q_rope, torch::Tensor c,
                            torch::Tensor kr, double scale, int64_t block) {
  TORCH_CHECK(q_lat.is_contiguous() && q_rope.is_contiguous(), "queries must be contiguous");
  TORCH_CHECK(c.stride(2) == 1 && kr.stride(2) == 1, "cache rows must be contiguous");
  const int64_t B = q_lat.size(0), H = q_lat.size(1), R = q_lat.size(2), DR = q_rope.size(2);
  const int64_t L = c.size(1);
  TORCH_CHECK(R % 8 == 0 && DR % 8 == 0, "latent and rope widths must be multiples of 8");
  auto out = torch::empty({B, H, R}, q_lat.options());
  const float* ql = q_lat.data_ptr<float>();
  const float* qr = q_rope.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* kp = kr.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cb = c.stride(0), cs = c.stride(1), kb = kr.stride(0), ks = kr.stride(1);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      auto row = R == 32 && DR == 16     ? decode_row<32, 16>
                 : R == 512 && DR == 64 ? decode_row<512, 64>
                                        : decode_row<0, 0>;
      row(ql + b * H * R, qr + b * H * DR, cp + b * cb, cs, kp + b * kb, ks, L, H, R, DR,
          static_cast<float>(scale), block, op + b * H * R);
    }
  });
  return out;
}
"""

SPEC = native.register(
    native.KernelSpec(
        "expertmesh_latent_kernel",
        _SOURCE,
        ("latent_decode",),
        ("-O3", "-mavx2", "-mfma", "-ffp-contract=off"),
    )
)


available = SPEC.available
unavailable_reason = SPEC.why_not
"""Why the kernel is not used (None when it is)."""


def applies(q_lat: torch.Tensor, c_all: torch.Tensor, kr_all: torch.Tensor) -> bool:
    """Whether `latent_decode` can run these: fp32 on the CPU, widths a multiple of 8, cache
    rows contiguous, no autograd."""
    return (
        q_lat.device.type == "cpu"
        and q_lat.dtype == c_all.dtype == kr_all.dtype == torch.float32
        and c_all.shape[-1] % 8 == 0
        and kr_all.shape[-1] % 8 == 0
        and c_all.stride(-1) == 1
        and kr_all.stride(-1) == 1
        and not torch.is_grad_enabled()
        and available()
    )


def latent_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    c_all: torch.Tensor,
    kr_all: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(scale * (q_lat c^T + q_rope kr^T)) c for q_lat (B, h, r), q_rope (B, h, dr),
    c_all (B, L, r), kr_all (B, L, dr) -> (B, h, r). Every row attends to all L keys."""
    module = SPEC.load()
    assert module is not None, "latent_decode called without the kernel; check applies() first"
    return module.latent_decode(
        q_lat.contiguous(), q_rope.contiguous(), c_all, kr_all, scale, BLOCK
    )
