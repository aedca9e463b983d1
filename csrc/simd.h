// What the CPU kernels share: 16-float vectors (GCC/Clang vector extension, compiled to one
// AVX-512 register, two AVX ones, ...), exp and ELU in plain arithmetic (libm's expf is a
// scalar call: GELU through std::tanh cost 0.27-0.47 ms per backbone frame, through this
// 0.014 ms), and the OpenMP loop every kernel splits its tasks with.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef CALM_FAST_OPENMP
#include <omp.h>
#endif

// Each instruction set's translation unit (gemm_f32_avx512.cpp) defines CALM_FAST_ISA before
// including this: these inline functions then get their own names per instruction set, so
// the linker never merges an AVX-512 copy into code that must run on a CPU without it.
#ifndef CALM_FAST_ISA
#define CALM_FAST_ISA isa_build
#endif

namespace calm_fast {
inline namespace CALM_FAST_ISA {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

inline v16 splat(float a) { return v16{} + a; }

inline float clamp80(float x) { return std::min(std::max(x, -80.0f), 80.0f); }
inline v16 clamp80(v16 x) {
  x = x < -80.0f ? splat(-80.0f) : x;
  return x > 80.0f ? splat(80.0f) : x;
}
inline float pow2_bits(float t) {  // 2^n for t = n + 1.5 * 2^23
  return __builtin_bit_cast(float, (__builtin_bit_cast(int32_t, t) - 0x4B400000 + 127) << 23);
}
inline v16 pow2_bits(v16 t) {
  return __builtin_bit_cast(v16, (__builtin_bit_cast(i16, t) - 0x4B400000 + 127) << 23);
}

// exp(x) to ~1e-7 relative, for a float or 16 lanes. NaN stays NaN.
template <typename F>
inline F exp_t(F x) {
  x = clamp80(x);
  const F t = x * 1.44269504f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const F n = t - 12582912.0f;
  const F r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2, split
  F p = r * (1.0f / 720.0f) + 1.0f / 120.0f;  // Taylor to r^6 on |r| <= ln2 / 2: < 1.3e-7
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2_bits(t);
}

inline float exp_approx(float x) { return exp_t(x); }

// ELU (alpha 1): x for x > 0, exp(x) - 1 otherwise (absolute error ~1e-7 near 0, where
// torch's expm1 is exact: far below the fp32 tolerance of the conv sums it feeds).
inline float elu(float x) { return x > 0.0f ? x : exp_t(x) - 1.0f; }
inline v16 elu(v16 x) { return x > 0.0f ? x : exp_t(x) - 1.0f; }

// Threads for `tasks` tasks: `threads` (<= 0: OpenMP's default), at most one per task.
inline int team(int threads, int64_t tasks) {
#ifdef CALM_FAST_OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
#else
  (void)threads;
  (void)tasks;
  return 1;
#endif
}

// fn(i) for i in [0, n), split into equal contiguous runs over team(threads, n) threads.
template <typename Fn>
inline void parallel_for(int64_t n, int threads, Fn&& fn) {
  const int nt = team(threads, n);
  (void)nt;
#ifdef CALM_FAST_OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
