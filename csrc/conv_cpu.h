// The SEANet decoder's convolutions on CPU, fp32, over channels-last rows: each conv is an
// implicit GEMM over a panel-packed weight (gemm_cpu.h's layout) with the bias, a residual
// and the ELU that the next layer applies fused into the store.
#pragma once
#include <cstdint>

#include "isa.h"

namespace calm_fast {

// y[b, t, n] = bias[n % bias_n] + sum_{j < taps} sum_{c < cin} x[b, t + j * dil, c] W[j * cin + c, n]
//              (+ add0[b, n] when t == 0) (+ res[b, t, n])
// for t < T, written raw to y and / or as ELU(.) to e (either may be null).
// A [B, rows, C] operand is a pointer and a batch stride in floats; its rows are C floats
// apart. panels: [ceil(N / 32)] panels of panel_stride floats, each [>= taps * cin][32]
// (zero past N). A transposed conv with kernel 2S and stride S is this with taps = 2 over
// its input rows (a zero row first) and N = S * cout: output row t holds the S output
// samples t S .. t S + S - 1 side by side, which is the channels-last layout of the
// upsampled signal.
struct ConvCall {
  const float* x = nullptr;
  int64_t x_bstride = 0;
  int64_t B = 0, T = 0, cin = 0, taps = 1, dil = 1;
  const float* panels = nullptr;
  int64_t panel_stride = 0, N = 0;
  const float* bias = nullptr;
  int64_t bias_n = 1;
  const float* add0 = nullptr;  // [B, N] contiguous
  const float* res = nullptr;
  int64_t res_bstride = 0;
  float* y = nullptr;
  int64_t y_bstride = 0;
  float* e = nullptr;
  int64_t e_bstride = 0;
};

inline namespace CALM_FAST_ISA {  // isa.h

void conv_rows_f32(const ConvCall& c, int threads);

// The same for taps = 2, dil = 1 and an even T, with 3/4 of the multiplies (Winograd
// F(2, 2) over pairs of output rows); sum_panels: [ceil(N / 32)][cin][32], tap 0 + tap 1.
void conv2_pairs_f32(const ConvCall& c, const float* sum_panels, int threads);

// taps = 3, dil = 1, an even T: 2/3 of the multiplies (Winograd F(2, 3)); wino_panels:
// [ceil(N / 32)][4 cin][32] holding g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2.
void conv3_pairs_f32(const ConvCall& c, const float* wino_panels, int threads);

// One output channel (the decoder's last conv, 64 -> 1): y[b, t] = bias + sum_j sum_c
// x[b, t + j dil, c] w[j cin + c]. Through the 32-column panels this would be 32x the work.
void conv_rows_to_one_f32(const float* x, int64_t x_bstride, int64_t B, int64_t T, int64_t cin,
                          int64_t taps, int64_t dil, const float* w, float bias, float* y,
                          int64_t y_bstride, int threads);

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
