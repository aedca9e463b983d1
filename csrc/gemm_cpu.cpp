// Decode and prefill linears on CPU. torch's sgemm on this AMD host reaches 55-130 GFLOP/s
// for 8-64 rows (2 threads; 1-8 rows run on one thread), and reading a row-major [K, N]
// weight down a 32-column strip is slow when the row stride is 4 or 16 KB (cache-set
// aliasing: 35-75 GFLOP/s). So the weight is packed once into panels [N / 32, K, 32]: a
// panel is one contiguous run, each thread takes whole panels (one sequential stream per
// thread at 1 row, like a plain sum), and a register block of 6 rows x 32 columns
// (12 vector accumulators, one broadcast and two loads per 12 FMAs) keeps the FMA units
// busy from 8 rows up: 180-220 GFLOP/s for 8-256 rows at the `pocket` shapes, where a
// 1024^3 sgemm measures 193 (same host, 2 threads).
#include "gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa_kernels.h"
#include "simd.h"

namespace calm_fast {

namespace {

#include "gemm_panels_impl.h"

// -- bf16 panels: bf16 dot products -----------------------------------------------------
// precision="bf16" rounds the rows to bf16 too (round to nearest even), so a layer gives
// bf16(x) @ bf16(W) with fp32 products and sums on every host. Where the CPU has
// AVX512-BF16 one vdpbf16ps multiplies 32 pairs and adds them into 16 fp32 sums: the
// batch-1 loop no longer spends its issue slots widening weights, and a prefill block does
// half the multiply-add instructions of fp32. Elsewhere the rounded rows go through the
// widening kernel above (the same products; sums in another order).

inline uint16_t bf16_bits(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CALM_FAST_DPBF16 1

// CALM_FAST_BF16_DOT=0 (read once) keeps the widening kernel on a CPU that has them (the
// tests run both paths on such a host; A/B timings).
bool cpu_has_dpbf16() {
  static const bool has = [] {
    const char* env = std::getenv("CALM_FAST_BF16_DOT");
    if (env != nullptr && env[0] == '0') return false;
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// Rows [0, MR) of the bf16 pairs xp (row stride ldx pairs; pair j = x[2j] | x[2j+1] << 16)
// times one bf16 panel [K, 32]. Two panel rows k, k+1 are interleaved in registers
// (unpacklo/hi: each 32-bit lane then holds the pair of one column), so the sums come out
// with the columns permuted: lo holds 0-3, 8-11, 16-19, 24-27 and hi the others, put back
// in order once at the end.
template <int MR>
DP_TARGET void dp_block(const uint32_t* xp, int64_t ldx, const uint16_t* panel, int64_t K,
                        const float* bias, float* out, int64_t ldo) {
  __m512 lo[MR], hi[MR];
  // one row: two accumulator pairs over alternate k pairs, so the sums do not wait on one
  // another (vdpbf16ps has a multi-cycle latency)
  __m512 lo2 = _mm512_setzero_ps(), hi2 = _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  const uint16_t* w = panel;
  int64_t j = 0;
  if (MR == 1) {
    for (; j + 2 <= K2; j += 2, w += 4 * kPanel) {
      for (int q = 0; q < 4; ++q) __builtin_prefetch(w + (64 + q) * kPanel, 0, 0);
      const __m512i a = _mm512_loadu_si512(w), b = _mm512_loadu_si512(w + kPanel);
      const __m512i c = _mm512_loadu_si512(w + 2 * kPanel), d = _mm512_loadu_si512(w + 3 * kPanel);
      const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[j]));
      const __m512bh x1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[j + 1]));
      lo[0] = _mm512_dpbf16_ps(lo[0], x0, (__m512bh)_mm512_unpacklo_epi16(a, b));
      hi[0] = _mm512_dpbf16_ps(hi[0], x0, (__m512bh)_mm512_unpackhi_epi16(a, b));
      lo2 = _mm512_dpbf16_ps(lo2, x1, (__m512bh)_mm512_unpacklo_epi16(c, d));
      hi2 = _mm512_dpbf16_ps(hi2, x1, (__m512bh)_mm512_unpackhi_epi16(c, d));
    }
  }
  for (; j < K2; ++j, w += 2 * kPanel) {
    const __m512i a = _mm512_loadu_si512(w), b = _mm512_loadu_si512(w + kPanel);
    const __m512bh wl = (__m512bh)_mm512_unpacklo_epi16(a, b);
    const __m512bh wh = (__m512bh)_mm512_unpackhi_epi16(a, b);
    for (int r = 0; r < MR; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * ldx + j]));
      lo[r] = _mm512_dpbf16_ps(lo[r], xr, wl);
      hi[r] = _mm512_dpbf16_ps(hi[r], xr, wh);
    }
  }
  if (K % 2) {  // the odd last panel row pairs with zeros
    const __m512i a = _mm512_loadu_si512(w), z = _mm512_setzero_si512();
    const __m512bh wl = (__m512bh)_mm512_unpacklo_epi16(a, z);
    const __m512bh wh = (__m512bh)_mm512_unpackhi_epi16(a, z);
    for (int r = 0; r < MR; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * ldx + K2]));
      lo[r] = _mm512_dpbf16_ps(lo[r], xr, wl);
      hi[r] = _mm512_dpbf16_ps(hi[r], xr, wh);
    }
  }
  if (MR == 1) {
    lo[0] = _mm512_add_ps(lo[0], lo2);
    hi[0] = _mm512_add_ps(hi[0], hi2);
  }
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(out + r * ldo, _mm512_add_ps(_mm512_permutex2var_ps(lo[r], i0, hi[r]), b0));
    _mm512_storeu_ps(out + r * ldo + 16,
                     _mm512_add_ps(_mm512_permutex2var_ps(lo[r], i1, hi[r]), b1));
  }
}

DP_TARGET void dp_rows(const uint32_t* xp, int64_t ldx, int64_t rows, int64_t K,
                       const uint16_t* panel, const float* bias, float* out, int64_t ldo) {
  switch (rows) {
    case 8: return dp_block<8>(xp, ldx, panel, K, bias, out, ldo);
    case 6: return dp_block<6>(xp, ldx, panel, K, bias, out, ldo);
    case 5: return dp_block<5>(xp, ldx, panel, K, bias, out, ldo);
    case 4: return dp_block<4>(xp, ldx, panel, K, bias, out, ldo);
    case 3: return dp_block<3>(xp, ldx, panel, K, bias, out, ldo);
    case 2: return dp_block<2>(xp, ldx, panel, K, bias, out, ldo);
    case 1: return dp_block<1>(xp, ldx, panel, K, bias, out, ldo);
    default: return;
  }
}
#else
bool cpu_has_dpbf16() { return false; }
#endif

void gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* panels, int64_t N,
               const float* bias, float* y, int threads) {
#ifdef CALM_FAST_DPBF16
  if (cpu_has_dpbf16()) {
    const int64_t K2 = (K + 1) / 2;  // pairs per row (the odd last one: x[K - 1] | 0)
    std::vector<uint32_t> xp(static_cast<size_t>(M * K2));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; k += 2) {
        const uint32_t hi = k + 1 < K ? bf16_bits(x[m * K + k + 1]) : 0u;
        xp[m * K2 + k / 2] = bf16_bits(x[m * K + k]) | (hi << 16);
      }
    }
    panel_tasks(M, N, bias, y, threads,
                [&](int64_t m0, int64_t rows, int64_t p, const float* b, float* out,
                    int64_t ldo, bool) {
                  dp_rows(xp.data() + m0 * K2, K2, rows, K, panels + p * K * kPanel, b, out,
                          ldo);
                });
    return;
  }
#endif
  std::vector<float> xr(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t u = static_cast<uint32_t>(bf16_bits(x[i])) << 16;
    std::memcpy(&xr[i], &u, 4);
  }
  kernels().gemm_bf16_widen(xr.data(), M, K, panels, N, bias, y, threads);
}


// -- int8 panels: integer dot products ----------------------------------------------------
// A batch-1 step reads its weights once: int8 panels are a quarter of fp32's bytes. The
// rows are quantized here, per row, so the error is that of 8-bit rows and 8-bit
// per-column weights; the sums are exact int32 (the VNNI path's shifted rows reach
// 255 * 127 * K, below 2^31 up to K = 66311: fast/int8.py refuses more than 65536 inputs),
// so the result does not depend on the order of the sums: the same bits
// on every host, path and thread count, and one multiply per output turns them to fp32.

inline int8_t quantize_one(float v, float inv) {
  const float q = std::nearbyint(v * inv);  // the default rounding: half to even
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
}

// Rows of x quantized: xq [M, 4 K4] (zero past K), their scales sx [M].
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t K4, int8_t* xq, float* sx) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(r[k]);
      if (!(a <= std::numeric_limits<float>::max())) finite = false;
      amax = std::max(amax, a);
    }
    // a row with NaN or inf: scale NaN, so its outputs come out NaN
    const float s = !finite ? std::numeric_limits<float>::quiet_NaN()
                            : amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / s;
    int8_t* o = xq + m * 4 * K4;
    for (int64_t k = 0; k < K; ++k) o[k] = quantize_one(r[k], inv);
    for (int64_t k = K; k < 4 * K4; ++k) o[k] = 0;
    sx[m] = s;
  }
}

// acc [rows, 32] = xq rows [rows, 4 K4] (row stride ldx bytes) times one int8 panel, exact.
void i8_rows_plain(const int8_t* xq, int64_t ldx, int64_t rows, int64_t K4,
                   const int8_t* panel, int32_t* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t a[kPanel] = {};
    const int8_t* xr = xq + r * ldx;
    for (int64_t j = 0; j < K4; ++j) {
      const int8_t* w = panel + j * 4 * kPanel;
      for (int b = 0; b < 4; ++b) {
        const int32_t xv = xr[4 * j + b];
        for (int64_t c = 0; c < kPanel; ++c) a[c] += xv * w[c * 4 + b];
      }
    }
    std::copy(a, a + kPanel, acc + r * kPanel);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CALM_FAST_VNNI 1

// CALM_FAST_INT8_DOT=0 (read once) keeps the plain integer loops on a CPU that has VNNI (the
// tests run both paths on such a host).
bool cpu_has_vnni() {
  static const bool has = [] {
    const char* env = std::getenv("CALM_FAST_INT8_DOT");
    if (env != nullptr && env[0] == '0') return false;
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

// vpdpbusd multiplies unsigned by signed bytes: the rows go in as xq + 128 (xu), and
// 128 * colsum comes off at the end. One quad of the panel is 128 bytes, two registers of
// 16 columns x 4 bytes, so the sums come out in column order.
template <int MR>
VNNI_TARGET void vnni_block(const uint32_t* xu, int64_t ldx, const int8_t* panel, int64_t K4,
                            int32_t* acc) {
  __m512i lo[MR], hi[MR];
  __m512i lo2 = _mm512_setzero_si512(), hi2 = _mm512_setzero_si512();
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
  const int8_t* w = panel;
  int64_t j = 0;
  if (MR == 1) {  // two accumulator pairs over alternate quads (the dot product's latency)
    for (; j + 2 <= K4; j += 2, w += 8 * kPanel) {
      __builtin_prefetch(w + 64 * 4 * kPanel, 0, 0);
      __builtin_prefetch(w + 64 * 4 * kPanel + 64, 0, 0);
      __builtin_prefetch(w + 64 * 4 * kPanel + 128, 0, 0);
      __builtin_prefetch(w + 64 * 4 * kPanel + 192, 0, 0);
      const __m512i a = _mm512_loadu_si512(w), b = _mm512_loadu_si512(w + 64);
      const __m512i c = _mm512_loadu_si512(w + 128), d = _mm512_loadu_si512(w + 192);
      const __m512i x0 = _mm512_set1_epi32(static_cast<int>(xu[j]));
      const __m512i x1 = _mm512_set1_epi32(static_cast<int>(xu[j + 1]));
      lo[0] = _mm512_dpbusd_epi32(lo[0], x0, a);
      hi[0] = _mm512_dpbusd_epi32(hi[0], x0, b);
      lo2 = _mm512_dpbusd_epi32(lo2, x1, c);
      hi2 = _mm512_dpbusd_epi32(hi2, x1, d);
    }
  }
  for (; j < K4; ++j, w += 4 * kPanel) {
    if (MR > 1) {  // the panel streams from DRAM once: fetch 32 quads ahead
      __builtin_prefetch(w + 32 * 4 * kPanel, 0, 0);
      __builtin_prefetch(w + 32 * 4 * kPanel + 64, 0, 0);
    }
    const __m512i a = _mm512_loadu_si512(w), b = _mm512_loadu_si512(w + 64);
    for (int r = 0; r < MR; ++r) {
      const __m512i xr = _mm512_set1_epi32(static_cast<int>(xu[r * ldx + j]));
      lo[r] = _mm512_dpbusd_epi32(lo[r], xr, a);
      hi[r] = _mm512_dpbusd_epi32(hi[r], xr, b);
    }
  }
  if (MR == 1) {
    lo[0] = _mm512_add_epi32(lo[0], lo2);
    hi[0] = _mm512_add_epi32(hi[0], hi2);
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_si512(acc + r * kPanel, lo[r]);
    _mm512_storeu_si512(acc + r * kPanel + 16, hi[r]);
  }
}

VNNI_TARGET void vnni_rows(const uint32_t* xu, int64_t ldx, int64_t rows, int64_t K4,
                           const int8_t* panel, int32_t* acc) {
  switch (rows) {
    case 8: return vnni_block<8>(xu, ldx, panel, K4, acc);
    case 6: return vnni_block<6>(xu, ldx, panel, K4, acc);
    case 5: return vnni_block<5>(xu, ldx, panel, K4, acc);
    case 4: return vnni_block<4>(xu, ldx, panel, K4, acc);
    case 3: return vnni_block<3>(xu, ldx, panel, K4, acc);
    case 2: return vnni_block<2>(xu, ldx, panel, K4, acc);
    case 1: return vnni_block<1>(xu, ldx, panel, K4, acc);
    default: return;
  }
}
#else
bool cpu_has_vnni() { return false; }
#endif

void gemm_i8(const float* x, int64_t M, int64_t K, const int8_t* panels, const float* scales,
             const int32_t* colsum, int64_t N, float* y, int threads) {
  const int64_t K4 = (K + 3) / 4;
  std::vector<int8_t> xq(static_cast<size_t>(M * 4 * K4));
  std::vector<float> sx(static_cast<size_t>(M));
  quantize_rows(x, M, K, K4, xq.data(), sx.data());
  const bool vnni = cpu_has_vnni();
  std::vector<uint32_t> xu;
  if (vnni) {  // xq + 128 as unsigned bytes, four to a lane
    xu.resize(static_cast<size_t>(M * K4));
    for (int64_t i = 0; i < M * K4; ++i) {
      uint32_t u = 0;
      for (int b = 0; b < 4; ++b) {
        u |= static_cast<uint32_t>(static_cast<uint8_t>(xq[4 * i + b] + 128)) << (8 * b);
      }
      xu[i] = u;
    }
  }
  panel_tasks(M, N, nullptr, y, threads,
              [&](int64_t m0, int64_t rows, int64_t p, const float*, float* out,
                  int64_t ldo, bool) {
                int32_t acc[kRows8 * kPanel];
                const int8_t* panel = panels + p * K4 * 4 * kPanel;
                const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
                float sc[kPanel] = {};
                int32_t off[kPanel] = {};
                std::copy(scales + n0, scales + n0 + cols, sc);
#ifdef CALM_FAST_VNNI
                if (vnni) {
                  vnni_rows(xu.data() + m0 * K4, K4, rows, K4, panel, acc);
                  for (int64_t c = 0; c < cols; ++c) off[c] = 128 * colsum[n0 + c];
                } else
#endif
                  i8_rows_plain(xq.data() + m0 * 4 * K4, 4 * K4, rows, K4, panel, acc);
                for (int64_t r = 0; r < rows; ++r) {
                  const float s = sx[m0 + r];
                  for (int64_t c = 0; c < kPanel; ++c) {
                    out[r * ldo + c] = static_cast<float>(acc[r * kPanel + c] - off[c]) * (s * sc[c]);
                  }
                }
              });
}
}  // namespace

bool has_bf16_dot() { return cpu_has_dpbf16(); }

bool has_int8_dot() { return cpu_has_vnni(); }

void gemm_panels_i8(const float* x, int64_t M, int64_t K, const int8_t* panels,
                    const float* scales, const int32_t* colsum, int64_t N, float* y,
                    int threads) {
  gemm_i8(x, M, K, panels, scales, colsum, N, y, threads);
}

void gemm_panels_f32(const float* x, int64_t M, int64_t K, const float* panels, int64_t N,
                     const float* bias, float* y, int threads) {
  kernels().gemm_f32(x, M, K, panels, N, bias, y, threads);
}

void gemm_panels_bf16(const float* x, int64_t M, int64_t K, const uint16_t* panels, int64_t N,
                      const float* bias, float* y, int threads) {
  gemm_bf16(x, M, K, panels, N, bias, y, threads);
}

void gemm_panels_any(const float* x, int64_t M, int64_t K, Panels w, int64_t N,
                     const float* bias, float* y, int threads) {
  if (w.scales != nullptr) {  // int8 projections carry no bias (the decode step has none)
    gemm_panels_i8(x, M, K, static_cast<const int8_t*>(w.data), w.scales, w.colsum, N, y,
                   threads);
    for (int64_t m = 0; bias != nullptr && m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
    }
  } else if (w.bf16) {
    gemm_panels_bf16(x, M, K, static_cast<const uint16_t*>(w.data), N, bias, y, threads);
  } else {
    gemm_panels_f32(x, M, K, static_cast<const float*>(w.data), N, bias, y, threads);
  }
}

}  // namespace calm_fast
