// fp32 linears y = x W (+ b) on CPU over a panel-packed weight, for any number of rows.
#pragma once
#include <cstdint>

#include "isa.h"

namespace calm_fast {

constexpr int64_t kPanel = 32;  // output columns per panel

// x [M, K] row-major; panels [ceil(N / 32), K, 32]: panel p holds columns 32p .. 32p + 31 of
// the row-major [K, N] weight, zero past N; bias [N] or nullptr; y [M, N]. threads <= 0:
// OpenMP's default.
void gemm_panels_f32(const float* x, int64_t M, int64_t K, const float* panels, int64_t N,
                     const float* bias, float* y, int threads);

// The same with bf16 panels (uint16 bit patterns: the top half of each fp32 weight): the
// rows are rounded to bf16 (nearest even) as well, and products and sums are fp32, i.e.
// bf16(x) @ W. AVX512-BF16 dot products where the CPU has them (has_bf16_dot()).
void gemm_panels_bf16(const float* x, int64_t M, int64_t K, const uint16_t* panels, int64_t N,
                      const float* bias, float* y, int threads);

bool has_bf16_dot();

// The panel GEMMs of one instruction set (gemm_panels_isa.cpp, compiled once per set: isa.h);
// gemm_panels_f32 / _bf16 run the ones isa_kernels.h's kernels() chose. bf16w: bf16 panels
// widened to fp32 (rows already rounded to bf16), where the CPU has no bf16 dot products.
inline namespace CALM_FAST_ISA {
void gemm_panels_f32_isa(const float* x, int64_t M, int64_t K, const float* panels, int64_t N,
                         const float* bias, float* y, int threads);
void gemm_panels_bf16w_isa(const float* x, int64_t M, int64_t K, const uint16_t* panels,
                           int64_t N, const float* bias, float* y, int threads);
}  // inline namespace CALM_FAST_ISA

// int8 panels [ceil(N / 32), K4 = ceil(K / 4), 32, 4]: byte b of column c in quad j is the
// weight W[4j + b, 32p + c] quantized per column (symmetric: W = scales[n] * q), zero past K
// and N; colsum [N] holds each column's sum of q. Each row of x is quantized on the fly
// (symmetric, scale max|x| / 127, round half to even) and the sums are exact integers, so
// the result is the same bits on every host, thread count and path:
//   y[m, n] = float(sum_k xq[m, k] q[k, n]) * (sx[m] * scales[n]).
// No bias: a fused add would round differently from the torch reference's (fast/int8.py
// adds it after). AVX512-VNNI dot products where the CPU has them (has_int8_dot()), plain
// integer loops elsewhere.
void gemm_panels_i8(const float* x, int64_t M, int64_t K, const int8_t* panels,
                    const float* scales, const int32_t* colsum, int64_t N, float* y,
                    int threads);

bool has_int8_dot();

// Panels of any kind (what the decode step holds per projection): int8 when scales is set.
struct Panels {
  const void* data = nullptr;
  bool bf16 = false;
  const float* scales = nullptr;
  const int32_t* colsum = nullptr;
};

// Out of line: an inline body here would be compiled into every instruction set's copy of
// the kernels that call it, and the linker keeps any one of them.
void gemm_panels_any(const float* x, int64_t M, int64_t K, Panels w, int64_t N,
                     const float* bias, float* y, int threads);

}  // namespace calm_fast
