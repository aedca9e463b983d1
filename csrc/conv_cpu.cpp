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

// The store of output row t of batch b, columns n0 .. n0 + cols - 1 (v0, v1: the sums).
inline void store_row(const ConvCall& c, int64_t b, int64_t t, int64_t n0, int64_t cols,
                      v16 v0, v16 v1) {
  const float* a0 = (c.add0 != nullptr && t == 0) ? c.add0 + b * c.N + n0 : nullptr;
  const float* rs = c.res != nullptr ? c.res + b * c.res_bstride + t * c.N + n0 : nullptr;
  float* y = c.y != nullptr ? c.y + b * c.y_bstride + t * c.N + n0 : nullptr;
  float* e = c.e != nullptr ? c.e + b * c.e_bstride + t * c.N + n0 : nullptr;
  if (cols == kPanel) {  // whole panel: in registers (the 1x1 convs on 32-64 channels are
    const v16 vs[2] = {v0, v1};  // store-bound: a scalar epilogue halved them)
    for (int h = 0; h < 2; ++h) {
      v16 v = vs[h];
      if (a0 != nullptr) v += load(a0 + 16 * h);
      if (rs != nullptr) v += load(rs + 16 * h);
      if (y != nullptr) store(y + 16 * h, v);
      if (e != nullptr) store(e + 16 * h, elu(v));
    }
    return;
  }
  float v[kPanel];
  store(v, v0);
  store(v + 16, v1);
  for (int64_t i = 0; i < cols; ++i) {
    if (a0 != nullptr) v[i] += a0[i];
    if (rs != nullptr) v[i] += rs[i];
    if (y != nullptr) y[i] = v[i];
    if (e != nullptr) e[i] = elu(v[i]);
  }
}

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
  for (int r = 0; r < MR; ++r) store_row(c, bb[r], tt[r], n0, cols, acc[r][0], acc[r][1]);
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

// Two taps (a transposed conv), two output rows at a time with three products instead of
// four (Winograd F(2, 2)): with a = X[2i], b = X[2i + 1], c = X[2i + 2] (tap 0 reads the
// row before), y[2i] = a W0 + b W1 = (a - b) W0 + b (W0 + W1) and y[2i + 1] = b W0 + c W1 =
// b (W0 + W1) + (c - b) W1. d1 = a - b and d3 = c - b are made once per call; pair q =
// b * T / 2 + i.
template <int MR>
void pair_block(const ConvCall& c, int64_t q0, const float* panel, const float* psum, int64_t n0,
                int64_t cols, const float* bias32, const float* d1, const float* d3) {
  const int64_t Tp = c.T / 2, cin = c.cin;
  const float* br[MR];
  int64_t bb[MR], ii[MR];
  int64_t b = q0 / Tp, i = q0 % Tp;
  for (int r = 0; r < MR; ++r) {
    bb[r] = b;
    ii[r] = i;
    br[r] = c.x + b * c.x_bstride + (2 * i + 1) * cin;
    if (++i == Tp) {
      i = 0;
      ++b;
    }
  }
  v16 m2[MR][2], m[MR][2];
  const v16 b0 = load(bias32), b1 = load(bias32 + 16);
  for (int r = 0; r < MR; ++r) {
    m2[r][0] = b0;
    m2[r][1] = b1;
    m[r][0] = m[r][1] = splat(0.0f);
  }
  for (int64_t k = 0; k < cin; ++k) {  // m2 = b (W0 + W1) and m = (a - b) W0 together
    const v16 s0 = load(psum + k * kPanel), s1 = load(psum + k * kPanel + 16);
    const v16 w0 = load(panel + k * kPanel), w1 = load(panel + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const v16 bv = splat(br[r][k]), dv = splat(d1[(q0 + r) * cin + k]);
      m2[r][0] += bv * s0;
      m2[r][1] += bv * s1;
      m[r][0] += dv * w0;
      m[r][1] += dv * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store_row(c, bb[r], 2 * ii[r], n0, cols, m2[r][0] + m[r][0], m2[r][1] + m[r][1]);
    m[r][0] = m[r][1] = splat(0.0f);
  }
  const float* p1 = panel + cin * kPanel;  // tap 1: W1
  for (int64_t k = 0; k < cin; ++k) {
    const v16 w0 = load(p1 + k * kPanel), w1 = load(p1 + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const v16 dv = splat(d3[(q0 + r) * cin + k]);
      m[r][0] += dv * w0;
      m[r][1] += dv * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store_row(c, bb[r], 2 * ii[r] + 1, n0, cols, m2[r][0] + m[r][0], m2[r][1] + m[r][1]);
  }
}

void pairs_block(const ConvCall& c, int64_t q0, int64_t rows, const float* panel,
                 const float* psum, int64_t n0, int64_t cols, const float* bias32,
                 const float* d1, const float* d3) {
  switch (rows) {
    case 6: return pair_block<6>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    case 5: return pair_block<5>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    case 4: return pair_block<4>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    case 3: return pair_block<3>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    case 2: return pair_block<2>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    case 1: return pair_block<1>(c, q0, panel, psum, n0, cols, bias32, d1, d3);
    default: return;
  }
}

// bias[n % bias_n] for every column of P panels (a transposed conv repeats its bias for each
// of its S samples per row).
std::vector<float> column_bias(const ConvCall& c, int64_t P) {
  std::vector<float> bias(P * kPanel, 0.0f);
  if (c.bias != nullptr) {
    for (int64_t n = 0; n < c.N; ++n) bias[n] = c.bias[n % c.bias_n];
  }
  return bias;
}

// fn(m0, rows, p, n0, cols) for every block of <= 6 rows (of M) and panel p (of N columns),
// group-major: a thread's consecutive tasks share their rows (in L1/L2) and walk the
// panels; each panel is read once per group of 48 rows.
template <typename Fn>
void for_blocks(int64_t M, int64_t N, int threads, Fn&& fn) {
  if (M <= 0 || N <= 0) return;
  const int64_t P = (N + kPanel - 1) / kPanel, MB = (M + kRows - 1) / kRows;
  const int64_t groups = (MB + kGroup - 1) / kGroup;
  parallel_for(groups * P, threads, [&](int64_t task) {
    const int64_t g = task / P, p = task % P;
    const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
    const int64_t mb_end = std::min<int64_t>(MB, (g + 1) * kGroup);
    for (int64_t mb = g * kGroup; mb < mb_end; ++mb) {
      fn(mb * kRows, std::min<int64_t>(kRows, M - mb * kRows), p, n0, cols);
    }
  });
}

}  // namespace

void conv_rows_f32(const ConvCall& c, int threads) {
  const int64_t M = c.B * c.T;
  const std::vector<float> bias = column_bias(c, (c.N + kPanel - 1) / kPanel);
  for_blocks(M, c.N, threads, [&](int64_t m0, int64_t rows, int64_t p, int64_t n0, int64_t cols) {
    rows_block(c, m0, rows, c.panels + p * c.panel_stride, n0, cols, bias.data() + n0);
  });
}

void conv2_pairs_f32(const ConvCall& c, const float* sum_panels, int threads) {
  const int64_t Tp = c.T / 2, Q = c.B * Tp, cin = c.cin;
  if (Q <= 0 || c.N <= 0) return;
  thread_local std::vector<float> d1, d3;  // kept: fresh pages cost more than the pass
  d1.resize(Q * cin);
  d3.resize(Q * cin);
  float* d1p = d1.data();
  float* d3p = d3.data();
  parallel_for(Q, threads, [&](int64_t q) {
    const int64_t b = q / Tp, i = q % Tp;
    const float* xa = c.x + b * c.x_bstride + 2 * i * cin;
    for (int64_t k = 0; k < cin; ++k) {
      d1p[q * cin + k] = xa[k] - xa[cin + k];
      d3p[q * cin + k] = xa[2 * cin + k] - xa[cin + k];
    }
  });
  const std::vector<float> bias = column_bias(c, (c.N + kPanel - 1) / kPanel);
  for_blocks(Q, c.N, threads, [&](int64_t q0, int64_t rows, int64_t p, int64_t n0, int64_t cols) {
    pairs_block(c, q0, rows, c.panels + p * c.panel_stride, sum_panels + p * cin * kPanel, n0,
                cols, bias.data() + n0, d1p, d3p);
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
