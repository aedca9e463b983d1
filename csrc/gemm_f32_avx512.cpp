// The fp32 panel GEMM compiled for AVX-512 (CMakeLists.txt adds the flags to this file
// alone): gemm_panels_f32 (gemm_cpu.cpp) calls it where the CPU has AVX-512F, so a portable
// build (CALM_FAST_NATIVE=OFF: the rest compiled for the baseline) still multiplies with
// 512-bit FMAs, which is where a step spends its time.
#define CALM_FAST_ISA isa_avx512
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_cpu.h"
#include "simd.h"

namespace calm_fast {

namespace {
#include "gemm_panels_impl.h"
}  // namespace

void gemm_panels_f32_avx512(const float* x, int64_t M, int64_t K, const float* panels,
                            int64_t N, const float* bias, float* y, int threads) {
  gemm_panels(x, M, K, panels, N, bias, y, threads);
}

}  // namespace calm_fast
