"""A CPU kernel for one decode step of latent attention (MLA with a latent cache): scores,
softmax and the weighted sum of the latent values in one pass over the cache.

Why: at long context a decode step is a read of the whole latent cache (c_kv and the rotary
key, (r + dr) values per token and layer). In eager PyTorch it is five passes: two skinny
GEMMs for the scores (h query rows against L keys: MKL reaches about 8 GB/s on them here),
the scale, the softmax and a third GEMM for the output, which reads c_kv again. At 128k
tokens those came to about 6 ms per layer against about 1 ms for reading the 24 MB once
(benchmarks/RESULTS.md, "Long context"). This kernel walks the cache in blocks of
`BLOCK` tokens: the block's scores for every head (dot products along the contiguous
feature dimension, AVX2/FMA; a head's query held in registers, 8 tokens' sums reduced
together), an online softmax (running max and sum per head, as in flash-attention's decode;
the block maximum taken as vectors while the scores are made), and the block's contribution
to the output of 4 heads at a time while the block is still in L1 (each cache vector loaded
once for the 4 heads). The cache is read once, nothing of size L is written. With more torch
threads than rows, a row's keys are split into parts, one per thread, merged at the end
(flash-decoding); with one thread, one pass per row.

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

BLOCK = 32
"""Tokens per block: 32 x (32 + 16) fp32 = 6 KB for the benchmark model, in L1. Measured on
the build machine (AMD EPYC, one thread, 4 heads): 32 and 24 were fastest at 128k keys
(11.2 ns per key against 13.6 at 64 and 15.5 at 256), 8k keys alike at 16-128."""
MIN_PART = 4096
"""With more torch threads than rows, a row's keys are split into parts of at least this many
keys, one thread each (a part must outweigh the cost of a task and of merging)."""

_SOURCE = (
    native.CPP_PRELUDE
    + r"""
namespace {

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
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

// Scores of 8 consecutive tokens for one head whose query (RT + DRT values, known at compile
// time) stays in registers: one accumulator per token, so every cache vector is loaded once
// per head and the 8 horizontal sums are done together (hsum8).
template <int64_t RT, int64_t DRT>
inline __m256 scores8(const __m256* qv, const float* c, int64_t cs, const float* kr,
                      int64_t ks) {
  constexpr int64_t RV = RT / 8, DV = DRT / 8;
  __m256 d[8];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    const float* cj = c + t * cs;
    const float* kj = kr + t * ks;
    __m256 a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(cj));
#pragma GCC unroll 16
    for (int64_t k = 1; k < RV; ++k) a = _mm256_fmadd_ps(qv[k], _mm256_loadu_ps(cj + 8 * k), a);
#pragma GCC unroll 16
    for (int64_t k = 0; k < DV; ++k) a = _mm256_fmadd_ps(qv[RV + k], _mm256_loadu_ps(kj + 8 * k), a);
    d[t] = a;
  }
  return hsum8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
}

// out[h0 + i][k0 .. k0 + 8 * KV) += sum over the block's tokens u of p[h0 + i][u] * c[u][...]
// for HB heads at once: each cache vector is loaded once for HB heads (HB x KV accumulators).
template <int HB, int KV>
inline void weighted_sum(const float* s, int64_t block, const float* cb, int64_t cs,
                         int64_t nb, int64_t k0, float* acc, int64_t R) {
  __m256 a[HB][KV];
#pragma GCC unroll 8
  for (int i = 0; i < HB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) a[i][v] = _mm256_setzero_ps();
  const float* ck = cb + k0;
  for (int64_t u = 0; u < nb; ++u) {
    __m256 cv[KV];
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) cv[v] = _mm256_loadu_ps(ck + u * cs + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < HB; ++i) {
      const __m256 p = _mm256_broadcast_ss(s + i * block + u);
#pragma GCC unroll 4
      for (int v = 0; v < KV; ++v) a[i][v] = _mm256_fmadd_ps(p, cv[v], a[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < HB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) {
      float* o = acc + i * R + k0 + 8 * v;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[i][v]));
    }
}

// All of R for HB heads: 16 values (2 vectors) per pass, a last pass of 8 if R is not a
// multiple of 16.
template <int HB>
inline void weighted_sums(const float* s, int64_t block, const float* cb, int64_t cs,
                          int64_t nb, float* acc, int64_t R) {
  int64_t k0 = 0;
  for (; k0 + 16 <= R; k0 += 16) weighted_sum<HB, 2>(s, block, cb, cs, nb, k0, acc, R);
  if (k0 < R) weighted_sum<HB, 1>(s, block, cb, cs, nb, k0, acc, R);
}

// One row's keys [0, L): q_lat (H, R), q_rope (H, DR) contiguous; c rows of R floats `cs`
// apart, kr rows of DR floats `ks` apart. Leaves the unnormalised output acc (H, R), the
// running max m (H) and the softmax sum l (H), which start as 0, -inf and 0 (a split of the
// keys is merged by merge_parts). `block` is a multiple of 8. RT/DRT: R and DR known at
// compile time (0: read at run time; then the scores take the generic loop).
template <int64_t RT, int64_t DRT>
void decode_part(const float* ql, const float* qr, const float* c, int64_t cs,
                 const float* kr, int64_t ks, int64_t L, int64_t H, int64_t R_, int64_t DR_,
                 float scale, int64_t block, float* acc, float* m, float* l) {
  const int64_t R = RT ? RT : R_, DR = DRT ? DRT : DR_;
  std::vector<float> s(H * block), bmax(H);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t j0 = 0; j0 < L; j0 += block) {
    const int64_t nb = std::min(block, L - j0);
    const float* cb = c + j0 * cs;
    const float* kb = kr + j0 * ks;
    // scores of the block: 8 tokens at a time, one vector of 8 sums per head, and each
    // head's block maximum (a vector max as the scores come, one horizontal max at the end)
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = ql + h * R;
      const float* qrh = qr + h * DR;
      float* sh = s.data() + h * block;
      __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t j = 0;
      if constexpr (RT != 0 && DRT != 0 && RT + DRT <= 64) {
        __m256 qv[(RT + DRT) / 8];
        for (int64_t k = 0; k < RT / 8; ++k) qv[k] = _mm256_loadu_ps(qh + 8 * k);
        for (int64_t k = 0; k < DRT / 8; ++k) qv[RT / 8 + k] = _mm256_loadu_ps(qrh + 8 * k);
        for (; j + 8 <= nb; j += 8) {
          const __m256 v = _mm256_mul_ps(scores8<RT, DRT>(qv, cb + j * cs, cs, kb + j * ks, ks), vscale);
          vmax = _mm256_max_ps(vmax, v);
          _mm256_storeu_ps(sh + j, v);
        }
      } else {
        for (; j + 8 <= nb; j += 8) {
          __m256 d[8];
          for (int t = 0; t < 8; ++t) d[t] = dot_parts<RT, DRT>(qh, qrh, cb + (j + t) * cs, kb + (j + t) * ks, R, DR);
          const __m256 v = _mm256_mul_ps(hsum8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]), vscale);
          vmax = _mm256_max_ps(vmax, v);
          _mm256_storeu_ps(sh + j, v);
        }
      }
      float mx = hmax(vmax);
      for (; j < nb; ++j) {
        sh[j] = hsum(dot_parts<RT, DRT>(qh, qrh, cb + j * cs, kb + j * ks, R, DR)) * scale;
        mx = std::max(mx, sh[j]);
      }
      bmax[h] = mx;
    }
    // online softmax per head: running max, rescale what was summed so far, exp in place
    for (int64_t h = 0; h < H; ++h) {
      float* sh = s.data() + h * block;
      const float mb = std::max(m[h], bmax[h]);
      float* ah = acc + h * R;
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
    }
    // the block's weighted sum of latents, 4 heads per pass over the block (still in L1)
    int64_t h0 = 0;
    for (; h0 + 4 <= H; h0 += 4)
      weighted_sums<4>(s.data() + h0 * block, block, cb, cs, nb, acc + h0 * R, R);
    switch (H - h0) {
      case 3: weighted_sums<3>(s.data() + h0 * block, block, cb, cs, nb, acc + h0 * R, R); break;
      case 2: weighted_sums<2>(s.data() + h0 * block, block, cb, cs, nb, acc + h0 * R, R); break;
      case 1: weighted_sums<1>(s.data() + h0 * block, block, cb, cs, nb, acc + h0 * R, R); break;
      default: break;
    }
  }
}

// out (H, R) = the softmax-weighted output of P parts of the keys (acc (P, H, R), m and l
// (P, H)): each part's sums rescaled to the overall max, as flash-decoding's reduction.
void merge_parts(const float* acc, const float* m, const float* l, int64_t P, int64_t H,
                 int64_t R, float* out) {
  for (int64_t h = 0; h < H; ++h) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < P; ++p) mx = std::max(mx, m[p * H + h]);
    float total = 0.0f;
    float* oh = out + h * R;
    for (int64_t k = 0; k < R; ++k) oh[k] = 0.0f;
    for (int64_t p = 0; p < P; ++p) {
      const float f = std::exp(m[p * H + h] - mx);
      total += l[p * H + h] * f;
      const float* ah = acc + (p * H + h) * R;
      for (int64_t k = 0; k < R; ++k) oh[k] += ah[k] * f;
    }
    const float inv = 1.0f / total;
    for (int64_t k = 0; k < R; ++k) oh[k] *= inv;
  }
}

using PartFn = void (*)(const float*, const float*, const float*, int64_t, const float*,
                        int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t, float*,
                        float*, float*);

}  // namespace

// q_lat (B, H, R), q_rope (B, H, DR) contiguous; c (B, L, R), kr (B, L, DR) with contiguous
// rows (any row and batch strides) -> (B, H, R). With more intra-op threads than rows, each
// row's keys are split into parts of at least `min_part` keys, one task per part, and the
// parts merged (flash-decoding); with one thread, or short rows, one task per row.
torch::Tensor latent_decode(torch::Tensor q_lat, torch::Tensor q_rope, torch::Tensor c,
                            torch::Tensor kr, double scale, int64_t block, int64_t min_part) {
  TORCH_CHECK(q_lat.is_contiguous() && q_rope.is_contiguous(), "queries must be contiguous");
  TORCH_CHECK(c.stride(2) == 1 && kr.stride(2) == 1, "cache rows must be contiguous");
  TORCH_CHECK(block > 0 && block % 8 == 0 && min_part > 0, "block: a positive multiple of 8");
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
  const PartFn part = R == 32 && DR == 16     ? decode_part<32, 16>
                      : R == 512 && DR == 64 ? decode_part<512, 64>
                                             : decode_part<0, 0>;
  const int64_t threads = at::get_num_threads();
  // parts per row: enough to give every thread work, each at least min_part keys (in blocks)
  int64_t P = 1;
  if (threads > B) P = std::max<int64_t>(1, std::min((threads + B - 1) / B, L / min_part));
  const int64_t span = (L + P - 1) / P;
  const int64_t step = (span + block - 1) / block * block;
  P = std::max<int64_t>(1, (L + step - 1) / step);
  std::vector<float> acc(B * P * H * R, 0.0f), m(B * P * H, -std::numeric_limits<float>::infinity()),
      l(B * P * H, 0.0f);
  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  at::parallel_for(0, B * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / P, p = t % P, j0 = p * step, n = std::min(step, L - j0);
      if (n <= 0) continue;
      part(ql + b * H * R, qr + b * H * DR, cp + b * cb + j0 * cs, cs, kp + b * kb + j0 * ks, ks,
           n, H, R, DR, static_cast<float>(scale), block, acc.data() + t * H * R,
           m.data() + t * H, l.data() + t * H);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    merge_parts(acc.data() + b * P * H * R, m.data() + b * P * H, l.data() + b * P * H, P, H, R,
                op + b * H * R);
  return out;
}
"""
)

SPEC = native.register(
    native.KernelSpec(
        "expertmesh_latent_kernel",
        _SOURCE,
        ("latent_decode",),
        # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without it the
        # rows and parts run one after another whatever torch's thread count (measured: 2
        # threads 1.49 ms per 128k-key call without, 0.94 with). The extension then uses the
        # libgomp torch has already loaded (same soname), not a second runtime.
        ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"),
        ("-fopenmp",),
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
        q_lat.contiguous(), q_rope.contiguous(), c_all, kr_all, scale, BLOCK, MIN_PART
    )
