"""Our C++ CPU kernels (`moe_kernel.py`, `latent_kernel.py`): built ahead of time, loaded
without a compiler at run time.

A kernel is C++ source compiled by `torch.utils.cpp_extension.load_inline`. Compiling takes
about a minute on two cores, and `load_inline` serialises concurrent builds with a lock file
that a process killed mid-build leaves behind, after which every process that loads the
kernel waits forever. Neither belongs on a request path or in an expert-shard actor that
chaos tests and the supervisor kill. So:

- `python -m expertmesh.models.native` (run by `make venv`) builds every kernel (each
  `models/*_kernel.py` registers one) once into `~/.cache/expertmesh/kernels/<name>-<hash>/`
  (`EXPERTMESH_KERNEL_DIR` overrides), the hash covering the source, the flags and the torch
  version, so a changed kernel or torch never loads a stale build;
- at run time `load(spec)` imports that build if it is there and returns None otherwise (the
  caller keeps its pure-torch path and says why once); it never compiles, unless
  `EXPERTMESH_KERNEL_BUILD=1` asks it to (development: edit, run, rebuilt on first use).

Every entry point lets go of the GIL once its arguments are checked, as torch's own ops do: a
serving replica runs the model on its engine thread and its HTTP event loops on others, and a
kernel holding the GIL stops every stream for the whole call. Their parallel loops hand out
tasks as threads free up (`parallel_tasks`). Both: `tests/models/test_kernel_threads.py`.

    spec = KernelSpec("expertmesh_moe_kernel", SOURCE, ("expert_mlp",), ("-O3", "-mavx2"))
    module = native.load(spec)      # None: not built here (reason: native.why_not(spec))
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSpec:
    name: str
    source: str
    functions: tuple[str, ...]
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = field(default=("avx2", "fma"))
    """/proc/cpuinfo flags the compiled code needs (it is built with -m<flag>)."""

    @property
    def digest(self) -> str:
        import torch

        h = hashlib.sha256()
        for part in (self.source, *self.functions, *self.cflags, *self.ldflags, torch.__version__):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:12]

    @property
    def module_name(self) -> str:
        return f"{self.name}_{self.digest}"

    def load(self) -> Any | None:
        """The built extension, or None (never compiles unless asked; see `load`)."""
        return load(self)

    def available(self) -> bool:
        return load(self) is not None

    def why_not(self) -> str | None:
        """Why the kernel is not used (None when it is)."""
        return why_not(self)


CPP_PRELUDE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
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

// f(t, t + 1) for every task t in [0, n) on the intra-op threads. Each thread first runs its
// own contiguous share, as at::parallel_for would (one stream of weight rows per thread, which
// the prefetches follow), then takes tasks from the back of another thread's share. A thread
// the OS preempts (a serving replica's event loop wanting a core, on a machine with as many
// threads as cores) no longer holds up the whole region while the others wait at its end.
// Each task computes the same sums in the same order either way.
inline int64_t take_task(std::atomic<uint64_t>& range, bool front) {
  uint64_t v = range.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t lo = v >> 32, hi = v & 0xffffffffu;
    if (lo >= hi) return -1;
    const uint64_t taken = front ? ((lo + 1) << 32) | hi : (lo << 32) | (hi - 1);
    if (range.compare_exchange_weak(v, taken, std::memory_order_relaxed))
      return static_cast<int64_t>(front ? lo : hi - 1);
  }
}

template <typename F>
inline void parallel_tasks(int64_t n, const F& f) {
  const int64_t T = std::min<int64_t>(n, at::get_num_threads());
  if (T <= 1 || n >= (int64_t(1) << 31)) {
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) { f(t0, t1); });
    return;
  }
  std::vector<std::atomic<uint64_t>> shares(T);
  for (int64_t i = 0; i < T; ++i)
    shares[i].store(static_cast<uint64_t>(n * i / T) << 32 | static_cast<uint64_t>(n * (i + 1) / T));
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t t; (t = take_task(shares[i], true)) >= 0;) f(t, t + 1);
    for (int64_t k = 1; k < T; ++k)
      for (int64_t t; (t = take_task(shares[(b + k) % T], false)) >= 0;) f(t, t + 1);
  });
}

}  // namespace
"""
"""C++ every kernel source starts with: the headers, `hsum` (the 8 lanes of an AVX register
added) and `parallel_tasks` (a parallel loop whose threads take tasks one at a time)."""

CPP_DOT_BLOCKS = r"""
namespace {

// Software prefetch of the weight rows this many rows ahead: 14 -> 18 GB/s at 4 tokens,
// 2 threads (no prefetch / 2 / 4 / 8 rows ahead measured; 4 and 8 equal).
constexpr int64_t PREFETCH = 4;

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

// Weight rows per group in `dots8`, and its prefetch distance in rows (4 groups ahead).
constexpr int ROWS = 8;
constexpr int64_t PREFETCH8 = 32;

// `dots<NJ>` (same sums, same order: bitwise equal) on eight weight rows at a time: more
// loads in flight (the accumulators spill at NJ = 4 and it is still faster). Experts' weight
// streaming, 2 threads, vs 2 rows prefetching 4 ahead: 21 -> 30 GB/s at 1 token, 21 -> 25-29
// at 4 (4 rows: 25-27 and 20-25; 16 rows: 27-29 and 20; prefetch 0-64 rows ahead measured).
template <int NJ>
void dots8(const float* W, const float* X, int64_t K, int64_t r0, int64_t r1, float* Y,
           int64_t ldy) {
  int64_t r = r0;
  for (; r + ROWS <= r1; r += ROWS) {
    const float* w0 = W + r * K;
    __m256 a[ROWS][NJ];
    for (int q = 0; q < ROWS; ++q)
      for (int j = 0; j < NJ; ++j) a[q][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      for (int q = 0; q < ROWS; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (PREFETCH8 + q) * K + k), _MM_HINT_T0);
      __m256 v[ROWS];
      for (int q = 0; q < ROWS; ++q) v[q] = _mm256_loadu_ps(w0 + q * K + k);
      for (int j = 0; j < NJ; ++j) {
        const __m256 xv = _mm256_loadu_ps(X + j * K + k);
        for (int q = 0; q < ROWS; ++q) a[q][j] = _mm256_fmadd_ps(v[q], xv, a[q][j]);
      }
    }
    for (int q = 0; q < ROWS; ++q)
      for (int j = 0; j < NJ; ++j) Y[j * ldy + r + q] = hsum(a[q][j]);
  }
  if (r < r1) dots<NJ>(W, X, K, r, r1, Y, ldy);
}

// n token rows X (n, K) against weight rows [r0, r1) of W (rows, K), in groups of <= 4; with
// EIGHT, `dots8` (the MoE kernel's expert weights) else `dots` (the dense few-row linear: with
// 32 input rows `dots8`'s accumulators spill, 22.4-23.7 -> 24.4-26.2 ms per batch-32 step).
template <bool EIGHT>
inline void dots_n(const float* W, const float* X, int64_t K, int64_t r0, int64_t r1, int64_t n,
                   float* Y, int64_t ldy) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const float* x = X + j0 * K;
    float* y = Y + j0 * ldy;
    switch (std::min<int64_t>(4, n - j0)) {
      case 1: EIGHT ? dots8<1>(W, x, K, r0, r1, y, ldy) : dots<1>(W, x, K, r0, r1, y, ldy); break;
      case 2: EIGHT ? dots8<2>(W, x, K, r0, r1, y, ldy) : dots<2>(W, x, K, r0, r1, y, ldy); break;
      case 3: EIGHT ? dots8<3>(W, x, K, r0, r1, y, ldy) : dots<3>(W, x, K, r0, r1, y, ldy); break;
      default: EIGHT ? dots8<4>(W, x, K, r0, r1, y, ldy) : dots<4>(W, x, K, r0, r1, y, ldy); break;
    }
  }
}

}  // namespace
"""
"""C++ for weight rows against a few token rows (`dots<NJ>`, `dots8<NJ>`:
eight weight rows at a time, and `dots_n<EIGHT>` over either), shared by the MoE and
the dense decode kernels; needs `CPP_PRELUDE` before it."""


SPECS: dict[str, KernelSpec] = {}
"""Every kernel module registers its spec here on import (`register`)."""
_loaded: dict[str, Any] = {}
_why_not: dict[str, str] = {}


def register(spec: KernelSpec) -> KernelSpec:
    SPECS[spec.name] = spec
    return spec


def kernel_dir() -> Path:
    root = os.environ.get("EXPERTMESH_KERNEL_DIR")
    return Path(root) if root else Path.home() / ".cache" / "expertmesh" / "kernels"


def build_dir(spec: KernelSpec) -> Path:
    return kernel_dir() / f"{spec.name}-{spec.digest}"


def _cpu_missing(spec: KernelSpec) -> str | None:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "cannot read /proc/cpuinfo to check the CPU's instruction sets"
    missing = [f for f in spec.cpu_flags if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def build(spec: KernelSpec) -> Any:
    """Compile `spec` into its build directory (minutes; one process at a time) and import it."""
    from torch.utils.cpp_extension import load_inline

    directory = build_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    module = load_inline(
        name=spec.module_name,
        cpp_sources=[spec.source],
        functions=list(spec.functions),
        extra_cflags=list(spec.cflags),
        extra_ldflags=list(spec.ldflags),
        build_directory=str(directory),
        verbose=False,
    )
    _loaded[spec.name] = module
    _why_not.pop(spec.name, None)
    return module


def _import_built(spec: KernelSpec) -> Any | None:
    found = sorted(build_dir(spec).glob(f"{spec.module_name}*.so"))
    if not found:
        return None
    import torch  # noqa: F401  (the extension links against torch's libraries, loaded first)

    loader = importlib.util.spec_from_file_location(spec.module_name, found[0])
    if loader is None or loader.loader is None:
        return None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    sys.modules[spec.module_name] = module
    return module


def load(spec: KernelSpec) -> Any | None:
    """The built kernel, or None (then `why_not(spec)` says why; logged once)."""
    if spec.name in _loaded:
        return _loaded[spec.name]
    if spec.name in _why_not:
        return None
    switch = spec.name.upper()  # EXPERTMESH_MOE_KERNEL=0 turns expertmesh_moe_kernel off
    reason = f"{switch}=0" if os.environ.get(switch, "1") == "0" else _cpu_missing(spec)
    module = None
    if reason is None:
        try:
            module = _import_built(spec)
            if module is None and os.environ.get("EXPERTMESH_KERNEL_BUILD") == "1":
                module = build(spec)
            if module is None:
                reason = (
                    f"not built in {build_dir(spec)}; run `python -m expertmesh.models.native` "
                    "(`make venv` does)"
                )
        except Exception as exc:  # a broken build or a missing compiler: the torch path
            reason = f"cannot load: {type(exc).__name__}: {str(exc)[:300]}"
    if module is None:
        _why_not[spec.name] = reason or "unknown"
        log.warning("%s not used (%s); the pure-torch path runs", spec.name, reason)
        return None
    _loaded[spec.name] = module
    return module


def why_not(spec: KernelSpec) -> str | None:
    load(spec)
    return _why_not.get(spec.name)


def main() -> int:
    """Build every registered kernel; exit 0 even when one cannot be built (the pure-torch path
    runs then), saying which and why."""
    import importlib
    import pkgutil

    # Run as `python -m`, this file is `__main__`; the kernels register with the package's module.
    registry = importlib.import_module("expertmesh.models.native")
    package = importlib.import_module("expertmesh.models")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith("_kernel"):  # every `models/*_kernel.py` registers a spec
            importlib.import_module(f"expertmesh.models.{info.name}")
    for spec in registry.SPECS.values():
        missing = registry._cpu_missing(spec)
        if missing:
            print(f"{spec.name}: not built ({missing})")
            continue
        try:
            if registry._import_built(spec) is not None:
                print(f"{spec.name}: already built in {registry.build_dir(spec)}")
                continue
            registry.build(spec)
            print(f"{spec.name}: built in {registry.build_dir(spec)}")
        except Exception as exc:
            print(f"{spec.name}: not built ({type(exc).__name__}: {str(exc)[:300]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
