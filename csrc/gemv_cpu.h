// Decode-size fp32 linears y = x W (+ b) for 1-4 input rows, W row-major [K, N].
#pragma once
#include <cstdint>

namespace calm_fast {

// x [B, K], w [K, N], bias [N] or nullptr, y [B, N]; 1 <= B <= 4; threads <= 0: OpenMP's.
void gemv_rows_f32(const float* x, const float* w, const float* bias, float* y, int64_t B,
                   int64_t K, int64_t N, int threads);

}  // namespace calm_fast
