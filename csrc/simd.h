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

// These inline functions get their own names per instruction set (isa.h).
#include "isa.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {

// v16 / i16: 16 lanes of float / int32. With AVX-512 one register (a GCC vector). Elsewhere
// a GCC vector of 16 lanes has no register mode: GCC keeps it in memory and builds every
// splat from scalar stores (the fp32 GEMM's AVX2 copy ran at 4 GB/s, its AVX-512 one at 83),
// so there the 16 lanes are an array of native vectors (2 AVX or 4 SSE registers) whose
// operators work part by part, and the kernels' code stays the same.
#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline v16 select(i16 m, v16 a, v16 b) { return m ? a : b; }
inline i16 widen_u16(const uint16_t* p) {  // 16 uint16 -> int32 lanes
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, i16);
}
inline v16 splat(float a) { return v16{} + a; }
#else
#if defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kParts = 64 / kVecBytes, kLanes = kVecBytes / 4;
typedef float fnat __attribute__((vector_size(kVecBytes)));
typedef int32_t inat __attribute__((vector_size(kVecBytes)));
typedef uint16_t unat __attribute__((vector_size(kVecBytes / 2)));

template <typename N, typename E>
struct Lanes16 {
  N p[kParts];
  E operator[](int i) const { return p[i / kLanes][i % kLanes]; }
};
using v16 = Lanes16<fnat, float>;
using i16 = Lanes16<inat, int32_t>;

#define CALM_FAST_LANES_OP(OP)                                                        \
  template <typename N, typename E>                                                   \
  inline Lanes16<N, E> operator OP(Lanes16<N, E> a, Lanes16<N, E> b) {                \
    for (int j = 0; j < kParts; ++j) a.p[j] = a.p[j] OP b.p[j];                       \
    return a;                                                                         \
  }                                                                                   \
  template <typename N, typename E>                                                   \
  inline Lanes16<N, E> operator OP(Lanes16<N, E> a, E s) {                            \
    for (int j = 0; j < kParts; ++j) a.p[j] = a.p[j] OP s;                            \
    return a;                                                                         \
  }                                                                                   \
  template <typename N, typename E>                                                   \
  inline Lanes16<N, E> operator OP(E s, Lanes16<N, E> a) {                            \
    for (int j = 0; j < kParts; ++j) a.p[j] = s OP a.p[j];                            \
    return a;                                                                         \
  }                                                                                   \
  template <typename N, typename E>                                                   \
  inline Lanes16<N, E>& operator OP##=(Lanes16<N, E>& a, Lanes16<N, E> b) {           \
    return a = a OP b;                                                                \
  }
CALM_FAST_LANES_OP(+)
CALM_FAST_LANES_OP(-)
CALM_FAST_LANES_OP(*)
CALM_FAST_LANES_OP(/)
CALM_FAST_LANES_OP(&)
#undef CALM_FAST_LANES_OP

inline i16 operator<<(i16 a, int s) {
  for (int j = 0; j < kParts; ++j) a.p[j] = a.p[j] << s;
  return a;
}

// Comparisons give all-ones / zero lanes, as GCC's vector comparisons do.
#define CALM_FAST_LANES_CMP(OP)                                                       \
  inline i16 operator OP(v16 a, v16 b) {                                              \
    i16 m;                                                                            \
    for (int j = 0; j < kParts; ++j) m.p[j] = a.p[j] OP b.p[j];                       \
    return m;                                                                         \
  }                                                                                   \
  inline i16 operator OP(v16 a, float s) {                                            \
    i16 m;                                                                            \
    for (int j = 0; j < kParts; ++j) m.p[j] = a.p[j] OP s;                            \
    return m;                                                                         \
  }
CALM_FAST_LANES_CMP(<)
CALM_FAST_LANES_CMP(>)
CALM_FAST_LANES_CMP(<=)
CALM_FAST_LANES_CMP(>=)
#undef CALM_FAST_LANES_CMP

inline v16 select(i16 m, v16 a, v16 b) {
  for (int j = 0; j < kParts; ++j) a.p[j] = m.p[j] ? a.p[j] : b.p[j];
  return a;
}
inline i16 widen_u16(const uint16_t* p) {
  i16 out;
  for (int j = 0; j < kParts; ++j) {
    unat h;
    std::memcpy(&h, p + j * kLanes, sizeof h);
    out.p[j] = __builtin_convertvector(h, inat);
  }
  return out;
}
inline v16 splat(float a) {
  v16 v;
  for (int j = 0; j < kParts; ++j) v.p[j] = fnat{} + a;
  return v;
}
// part by part: one memcpy of the whole 64 bytes went through a stack copy
inline v16 load(const float* p) {
  v16 v;
  for (int j = 0; j < kParts; ++j) std::memcpy(&v.p[j], p + j * kLanes, kVecBytes);
  return v;
}
inline void store(float* p, v16 v) {
  for (int j = 0; j < kParts; ++j) std::memcpy(p + j * kLanes, &v.p[j], kVecBytes);
}
#endif

#if defined(__AVX512F__)
inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
#endif

// Rows of the register blocks that hold 32 output columns (2 v16) per row: 6 (8 when the
// rows come in eights) fill AVX-512's 32 registers; AVX2's 16 hold 3 (4), SSE's 1 (2).
#if defined(__AVX512F__)
constexpr int kRegRows = 6, kRegRows8 = 8;
#elif defined(__AVX__)
constexpr int kRegRows = 3, kRegRows8 = 4;
#else
constexpr int kRegRows = 1, kRegRows8 = 2;
#endif

inline float clamp80(float x) { return std::min(std::max(x, -80.0f), 80.0f); }
inline v16 clamp80(v16 x) {
  x = select(x < -80.0f, splat(-80.0f), x);
  return select(x > 80.0f, splat(80.0f), x);
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
inline v16 elu(v16 x) { return select(x > 0.0f, x, exp_t(x) - 1.0f); }

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
