// Why not oneDNN through torch: at batch 64 the `pocket` SEANet decoder's convs ran at
// 6-190 GFLOP/s (1x1 convs on 32-64 channels: 17-28; the 64 -> 1 output conv: 6), each
// ELU was a separate pass over activations of up to 31 MB, and the transposed convs,
// residual adds and causal-state concatenations were more passes. Here every conv runs
// through one register-blocked kernel (6 rows x 32 columns, as gemm_cpu.cpp), reading its
// input rows in place (the taps are row offsets: no im2col copy), and its store adds the
// residual and writes the ELU that the next layer wants.
#include "conv_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_cpu.h"
#include "simd.h"

namespace calm_fast {

namespace {

constexpr int kRows = 6;    // register block: 6 rows x 2 vectors, as gemm_cpu.cpp
constexpr int kGroup = 8;   // row blocks per task: a panel is fetched once per 48 rows

// Rows m0 .. m0 + MR - 1 (flattened b * T + t) times one panel, then the epilogue for
// columns n0 .. n0 + cols - 1.
template <int MR>
void block(const ConvCall& c, int64_t m0, const float* panel, int64_t n0, int64_t cols,
           const float* bias32) {
  const float* xr[MR];
  int64_t bb[MR], tt[MR];
  int64_t b = m0 / c.T, t = m0 % c.T;  // one division per block: with 32 inputs a row,
  for (int r = 0; r < MR; ++r) {        // a division per row cost as much as the FMAs
    bb[r] = b;
    tt[r] = t;
    xr[r] = c.x + b * c.x_bstride + t * c.cin;
    if (++t == c.T) {
      t = 0;
      ++b;
    }
  }
  v16 acc[MR][2];
  const v16 b0 = load(bias32), b1 = load(bias32 + 16);
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  const float* w = panel;
  for (int64_t j = 0; j < c.taps; ++j) {
    const int64_t off = j * c.dil * c.cin;
    for (int64_t k = 0; k < c.cin; ++k, w += kPanel) {
      const v16 w0 = load(w), w1 = load(w + 16);
      for (int r = 0; r < MR; ++r) {
        const v16 a = splat(xr[r][off + k]);
        acc[r][0] += a * w0;
        acc[r][1] += a * w1;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const int64_t b = bb[r], t = tt[r];
    const float* a0 = (c.add0 != nullptr && t == 0) ? c.add0 + b * c.N + n0 : nullptr;
    const float* rs = c.res != nullptr ? c.res + b * c.res_bstride + t * c.N + n0 : nullptr;
    float* y = c.y != nullptr ? c.y + b * c.y_bstride + t * c.N + n0 : nullptr;
    float* e = c.e != nullptr ? c.e + b * c.e_bstride + t * c.N + n0 : nullptr;
    if (cols == kPanel) {  // whole panel: in registers (the 1x1 convs on 32-64 channels
      for (int h = 0; h < 2; ++h) {  // are store-bound: a scalar epilogue halved them)
        v16 v = acc[r][h];
        if (a0 != nullptr) v += load(a0 + 16 * h);
        if (rs != nullptr) v += load(rs + 16 * h);
        if (y != nullptr) store(y + 16 * h, v);
        if (e != nullptr) store(e + 16 * h, elu(v));
      }
      continue;
    }
    float v[kPanel];
    store(v, acc[r][0]);
    store(v + 16, acc[r][1]);
    for (int64_t i = 0; i < cols; ++i) {
      if (a0 != nullptr) v[i] += a0[i];
      if (rs != nullptr) v[i] += rs[i];
      if (y != nullptr) y[i] = v[i];
      if (e != nullptr) e[i] = elu(v[i]);
    }
  }
}

void rows_block(const ConvCall& c, int64_t m0, int64_t rows, const float* panel, int64_t n0,
                int64_t cols, const float* bias32) {
  switch (rows) {
    case 6: return block<6>(c, m0, panel, n0, cols, bias32);
    case 5: return block<5>(c, m0, panel, n0, cols, bias32);
    case 4: return block<4>(c, m0, panel, n0, cols, bias32);
    case 3: return block<3>(c, m0, panel, n0, cols, bias32);
    case 2: return block<2>(c, m0, panel, n0, cols, bias32);
    case 1: return block<1>(c, m0, panel, n0, cols, bias32);
    default: return;
  }
}

}  // namespace

void conv_rows_f32(const ConvCall& c, int threads) {
  const int64_t M = c.B * c.T;
  if (M <= 0 || c.N <= 0) return;
  const int64_t P = (c.N + kPanel - 1) / kPanel, MB = (M + kRows - 1) / kRows;
  const int64_t groups = (MB + kGroup - 1) / kGroup, tasks = groups * P;
  std::vector<float> bias;  // bias[n % bias_n] for every column (a transposed conv repeats
  if (c.bias != nullptr) {  // its bias for each of its S samples per row)
    bias.resize(P * kPanel);
    for (int64_t n = 0; n < c.N; ++n) bias[n] = c.bias[n % c.bias_n];
  }
  // Group-major: a thread's consecutive tasks share their rows (in L1/L2) and walk the
  // panels; each panel is read once per group of 48 rows.
  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t g = task / P, p = task % P;
    const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, c.N - n0);
    float bias32[kPanel] = {};
    if (c.bias != nullptr) std::copy(bias.begin() + n0, bias.begin() + n0 + cols, bias32);
    const float* panel = c.panels + p * c.panel_stride;
    const int64_t mb_end = std::min<int64_t>(MB, (g + 1) * kGroup);
    for (int64_t mb = g * kGroup; mb < mb_end; ++mb) {
      const int64_t m0 = mb * kRows;
      rows_block(c, m0, std::min<int64_t>(kRows, M - m0), panel, n0, cols, bias32);
    }
  });
}

void conv_rows_to_one_f32(const float* x, int64_t x_bstride, int64_t B, int64_t T, int64_t cin,
                          int64_t taps, int64_t dil, const float* w, float bias, float* y,
                          int64_t y_bstride, int threads) {
  const int64_t M = B * T;
  if (M <= 0) return;
  parallel_for(M, threads, [&](int64_t m) {
    const int64_t b = m / T, t = m % T;
    const float* xr = x + b * x_bstride + t * cin;
    v16 acc = splat(0.0f);
    float tail = 0.0f;
    for (int64_t j = 0; j < taps; ++j) {
      const float* a = xr + j * dil * cin;
      const float* wj = w + j * cin;
      int64_t k = 0;
      for (; k + 16 <= cin; k += 16) acc += load(a + k) * load(wj + k);
      for (; k < cin; ++k) tail += a[k] * wj[k];
    }
    float s = bias + tail;
    for (int i = 0; i < 16; ++i) s += acc[i];
    y[b * y_bstride + t] = s;
  });
}

}  // namespace calm_fast
