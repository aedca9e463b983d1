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
#include <type_traits>
#include <vector>

#include "gemm_cpu.h"
#include "simd.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

namespace {

constexpr int kRows = kRegRows;  // register block (simd.h): 6 rows x 2 vectors with AVX-512
constexpr int kGroup = 8;   // row blocks per task: a panel is fetched once per 8 blocks

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

// Where rows m0 .. m0 + MR - 1 of a block are: item m is number t = m % per_batch of batch
// b = m / per_batch, and reads input row mult * t + add. One division per block: with 32
// inputs a row, a division per row cost as much as the FMAs.
template <int MR>
struct BlockRows {
  int64_t b[MR], t[MR];
  const float* x[MR];
  BlockRows(const ConvCall& c, int64_t m0, int64_t per_batch, int64_t mult, int64_t add) {
    int64_t bi = m0 / per_batch, ti = m0 % per_batch;
    for (int r = 0; r < MR; ++r) {
      b[r] = bi;
      t[r] = ti;
      x[r] = c.x + bi * c.x_bstride + (mult * ti + add) * c.cin;
      if (++ti == per_batch) {
        ti = 0;
        ++bi;
      }
    }
  }
};

// Rows m0 .. m0 + MR - 1 (flattened b * T + t) times one panel, then the epilogue for
// columns n0 .. n0 + cols - 1.
template <int MR>
void block(const ConvCall& c, int64_t m0, const float* panel, int64_t n0, int64_t cols,
           const float* bias32) {
  const BlockRows<MR> at(c, m0, c.T, 1, 0);
  const float* const* xr = at.x;
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
  for (int r = 0; r < MR; ++r) store_row(c, at.b[r], at.t[r], n0, cols, acc[r][0], acc[r][1]);
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
  const BlockRows<MR> at(c, q0, Tp, 2, 1);  // the rows b = X[2i + 1]
  const float* const* br = at.x;
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
    store_row(c, at.b[r], 2 * at.t[r], n0, cols, m2[r][0] + m[r][0], m2[r][1] + m[r][1]);
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
    store_row(c, at.b[r], 2 * at.t[r] + 1, n0, cols, m2[r][0] + m[r][0],
              m2[r][1] + m[r][1]);
  }
}


// Three taps at dilation 1, two output rows at a time with four products instead of six
// (Winograd F(2, 3)): with d0..d3 = X[2i .. 2i + 3], G0 = g0, G1 = (g0 + g1 + g2) / 2,
// G2 = (g0 - g1 + g2) / 2, G3 = g2: y[2i] = (d0 - d2) G0 + m2 + m3 and y[2i + 1] =
// m2 - m3 + (d3 - d1) G3, where m2 = (d1 + d2) G1 and m3 = (d2 - d1) G2. The input sums are
// made as the rows are read (scalar work beside the vector FMAs: free).
// wp: the G panel of this column block, [4 cin][32].
template <int MR>
void wino3_block(const ConvCall& c, int64_t q0, const float* wp, int64_t n0, int64_t cols,
                 const float* bias32) {
  const int64_t Tp = c.T / 2, cin = c.cin;
  const BlockRows<MR> at(c, q0, Tp, 2, 0);  // d0; d1, d2, d3 follow, cin apart
  const float* const* xr = at.x;
  v16 m2[MR][2], m3[MR][2];
  for (int r = 0; r < MR; ++r) m2[r][0] = m2[r][1] = m3[r][0] = m3[r][1] = splat(0.0f);
  const float* g1 = wp + cin * kPanel;
  const float* g2 = wp + 2 * cin * kPanel;
  for (int64_t k = 0; k < cin; ++k) {
    const v16 a0 = load(g1 + k * kPanel), a1 = load(g1 + k * kPanel + 16);
    const v16 c0 = load(g2 + k * kPanel), c1 = load(g2 + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const float d1 = xr[r][cin + k], d2 = xr[r][2 * cin + k];
      const v16 p = splat(d1 + d2), q = splat(d2 - d1);
      m2[r][0] += p * a0;
      m2[r][1] += p * a1;
      m3[r][0] += q * c0;
      m3[r][1] += q * c1;
    }
  }
  const v16 b0 = load(bias32), b1 = load(bias32 + 16);
  for (int r = 0; r < MR; ++r) {  // m2 <- y[2i] so far, m3 <- y[2i + 1] so far
    const v16 s0 = m2[r][0] + m3[r][0] + b0, s1 = m2[r][1] + m3[r][1] + b1;
    m3[r][0] = m2[r][0] - m3[r][0] + b0;
    m3[r][1] = m2[r][1] - m3[r][1] + b1;
    m2[r][0] = s0;
    m2[r][1] = s1;
  }
  const float* g3 = wp + 3 * cin * kPanel;
  for (int64_t k = 0; k < cin; ++k) {
    const v16 a0 = load(wp + k * kPanel), a1 = load(wp + k * kPanel + 16);
    const v16 c0 = load(g3 + k * kPanel), c1 = load(g3 + k * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const v16 p = splat(xr[r][k] - xr[r][2 * cin + k]);
      const v16 q = splat(xr[r][3 * cin + k] - xr[r][cin + k]);
      m2[r][0] += p * a0;
      m2[r][1] += p * a1;
      m3[r][0] += q * c0;
      m3[r][1] += q * c1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store_row(c, at.b[r], 2 * at.t[r], n0, cols, m2[r][0], m2[r][1]);
    store_row(c, at.b[r], 2 * at.t[r] + 1, n0, cols, m3[r][0], m3[r][1]);
  }
}


// fn(std::integral_constant<int, rows>) for 1 <= rows <= 6: the register blocks' row count
// as a template argument.
template <typename Fn>
void with_rows(int64_t rows, Fn&& fn) {
  switch (rows) {
    case 6: return fn(std::integral_constant<int, 6>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 1: return fn(std::integral_constant<int, 1>{});
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

// fn(m0, rows, p, n0, cols) for every block of <= kRows rows (of M) and panel p (of N columns),
// group-major: a thread's consecutive tasks share their rows (in L1/L2) and walk the
// panels; each panel is read once per group of kGroup blocks.
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
    with_rows(rows, [&](auto mr) {
      block<mr.value>(c, m0, c.panels + p * c.panel_stride, n0, cols, bias.data() + n0);
    });
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
    with_rows(rows, [&](auto mr) {
      pair_block<mr.value>(c, q0, c.panels + p * c.panel_stride, sum_panels + p * cin * kPanel,
                           n0, cols, bias.data() + n0, d1p, d3p);
    });
  });
}

void conv3_pairs_f32(const ConvCall& c, const float* wino_panels, int threads) {
  const int64_t Q = c.B * (c.T / 2), cin = c.cin;
  const std::vector<float> bias = column_bias(c, (c.N + kPanel - 1) / kPanel);
  for_blocks(Q, c.N, threads, [&](int64_t q0, int64_t rows, int64_t p, int64_t n0, int64_t cols) {
    with_rows(rows, [&](auto mr) {
      wino3_block<mr.value>(c, q0, wino_panels + p * 4 * cin * kPanel, n0, cols,
                            bias.data() + n0);
    });
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

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
