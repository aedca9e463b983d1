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

}  // namespace calm_fast
