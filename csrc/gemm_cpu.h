// fp32 linears y = x W (+ b) on CPU over a panel-packed weight, for any number of rows.
#pragma once
#include <cstdint>

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

// Panels of either kind (what the decode step holds per projection).
struct Panels {
  const void* data = nullptr;
  bool bf16 = false;
};

inline void gemm_panels_any(const float* x, int64_t M, int64_t K, Panels w, int64_t N,
                            const float* bias, float* y, int threads) {
  if (w.bf16) {
    gemm_panels_bf16(x, M, K, static_cast<const uint16_t*>(w.data), N, bias, y, threads);
  } else {
    gemm_panels_f32(x, M, K, static_cast<const float*>(w.data), N, bias, y, threads);
  }
}

}  // namespace calm_fast
