// The panel GEMMs over fp32 and (widened) bf16 panels, one copy per instruction set
// (CALM_FAST_ISA_SOURCES): gemm_cpu.cpp calls the copy kernels() chose, so a portable build
// (CALM_FAST_NATIVE=OFF: the rest compiled for the baseline) still multiplies with 256- or
// 512-bit FMAs, which is where a step spends its time.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_cpu.h"
#include "simd.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

namespace {
#include "gemm_panels_impl.h"
}  // namespace

void gemm_panels_f32_isa(const float* x, int64_t M, int64_t K, const float* panels, int64_t N,
                         const float* bias, float* y, int threads) {
  gemm_panels(x, M, K, panels, N, bias, y, threads);
}

void gemm_panels_bf16w_isa(const float* x, int64_t M, int64_t K, const uint16_t* panels,
                           int64_t N, const float* bias, float* y, int threads) {
  gemm_panels(x, M, K, panels, N, bias, y, threads);
}

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
