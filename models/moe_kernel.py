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

from . import native

MAX_TOKENS_PER_EXPERT = 8
"""The kernel computes the experts with at most this many tokens; ExpertBank runs the others
as MKL GEMMs, faster from about 8 columns up (prefill)."""

_SOURCE = (
    native.CPP_PRELUDE
    + native.CPP_DOT_BLOCKS
    + r"""
namespace {

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
  pybind11::gil_scoped_release no_gil;  // no Python below: other threads may run
  parallel_tasks(E * ib, [&](int64_t t0, int64_t t1) {
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
        dots_n<true>(W + r0 * H, x, H, 0, r1 - r0, nj, g.data(), block);
        dots_n<true>(W + (I + r0) * H, x, H, 0, r1 - r0, nj, u.data(), block);
        for (int64_t j = 0; j < nj; ++j) {
          float* a = A + (offset[e] + j0 + j) * I;
          for (int64_t r = r0; r < r1; ++r)
            a[r] = silu(g[j * block + r - r0]) * u[j * block + r - r0];
        }
      }
    }
  });
  parallel_tasks(E * hb, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / hb, r0 = (t % hb) * block, r1 = std::min(H, r0 + block);
      const int64_t n = counts[e];
      if (n == 0 || n > max_n) continue;
      const float* W = D + slots[e] * H * I;
      dots_n<true>(W, A + offset[e] * I, I, r0, r1, n, O + offset[e] * H, H);
    }
  });
  return out;
}
"""
)

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
