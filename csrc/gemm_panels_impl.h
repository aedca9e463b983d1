// The fp32 panel GEMM's kernels (see gemm_cpu.cpp), included inside an anonymous namespace
// by each translation unit that compiles them for one instruction set: gemm_panels_isa.cpp
// (once per set: isa.h) and gemm_cpu.cpp (its AVX512-BF16 kernel shares the task split). Its
// includers include <algorithm>, <cstring>, <vector> and simd.h first.
#pragma once
// A panel row's 32 weights as two fp32 vectors: fp32 as stored, or bf16 (the top half of
// an fp32) widened by a shift. bf16 panels halve the bytes a batch-1 step reads (it is bound
// by them); the products and sums stay fp32.
inline void load_w(const float* w, v16& w0, v16& w1) {
  w0 = load(w);
  w1 = load(w + 16);
}

inline v16 widen_bf16(const uint16_t* w) {
  return __builtin_bit_cast(v16, widen_u16(w) << 16);
}

inline void load_w(const uint16_t* w, v16& w0, v16& w1) {
  w0 = widen_bf16(w);
  w1 = widen_bf16(w + 16);
}

// Rows [0, MR) of x times one panel: out [MR, 32] (row stride ldo), plus bias (32 or null).
// With PF, the same k loop also prefetches ``next`` (the panel this thread takes next) into
// L2, two cache lines per k: the panel's DRAM read then overlaps this panel's FMAs.
template <int MR, bool PF, typename W>
void block_loop(const float* x, int64_t ldx, const W* panel, int64_t K, const float* bias,
                float* out, int64_t ldo, const W* next) {
  v16 acc[MR][2];
  const v16 b0 = bias ? load(bias) : splat(0.0f), b1 = bias ? load(bias + 16) : splat(0.0f);
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  const W* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    if (PF) {  // one panel row: two cache lines of fp32, one of bf16
      __builtin_prefetch(next + k * kPanel, 0, 2);
      if (sizeof(W) == 4) __builtin_prefetch(next + k * kPanel + 16, 0, 2);
    }
    v16 w0, w1;
    load_w(w, w0, w1);
    for (int r = 0; r < MR; ++r) {
      const v16 a = splat(x[r * ldx + k]);
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(out + r * ldo, acc[r][0]);
    store(out + r * ldo + 16, acc[r][1]);
  }
}

template <int MR, typename W>
struct Block {
  static void run(const float* x, int64_t ldx, const W* panel, int64_t K, const float* bias,
                  float* out, int64_t ldo, const W* next) {
    if (next != nullptr) return block_loop<MR, true>(x, ldx, panel, K, bias, out, ldo, next);
    block_loop<MR, false, W>(x, ldx, panel, K, bias, out, ldo, nullptr);
  }
};

// One row (batch-1 decode) only reads the panel: four independent accumulator pairs (k, k+1,
// k+2, k+3) so that the adds do not wait on one another. Over the 24 `pocket` projections
// (302 MB) this reads at 0.8-0.9 of a plain sum's rate, as the previous [K, N] slab gemv
// did (27 GB/s for both where the sum read 31, same run).
template <typename W>
struct Block<1, W> {
  static void run(const float* x, int64_t, const W* panel, int64_t K, const float* bias,
                  float* out, int64_t, const W*) {  // one row: one row block, no prefetch
    v16 a0 = bias ? load(bias) : splat(0.0f), a1 = bias ? load(bias + 16) : splat(0.0f);
    v16 b0 = splat(0.0f), b1 = b0, c0 = b0, c1 = b0, d0 = b0, d1 = b0;
    v16 w0, w1;
    const W* w = panel;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4, w += 4 * kPanel) {
      // bf16: four panel rows are four cache lines; ask for them well ahead (the hardware
      // prefetcher alone left the widening loads waiting on DRAM)
      if (sizeof(W) == 2) {
        for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (64 + j) * kPanel, 0, 0);
      }
      load_w(w, w0, w1);
      a0 += splat(x[k]) * w0;
      a1 += splat(x[k]) * w1;
      load_w(w + 32, w0, w1);
      b0 += splat(x[k + 1]) * w0;
      b1 += splat(x[k + 1]) * w1;
      load_w(w + 64, w0, w1);
      c0 += splat(x[k + 2]) * w0;
      c1 += splat(x[k + 2]) * w1;
      load_w(w + 96, w0, w1);
      d0 += splat(x[k + 3]) * w0;
      d1 += splat(x[k + 3]) * w1;
    }
    for (; k < K; ++k, w += kPanel) {
      load_w(w, w0, w1);
      a0 += splat(x[k]) * w0;
      a1 += splat(x[k]) * w1;
    }
    store(out, (a0 + b0) + (c0 + d0));
    store(out + 16, (a1 + b1) + (c1 + d1));
  }
};

constexpr int kRows = kRegRows;  // register block (simd.h): with AVX-512 6 rows x 2 vectors
constexpr int kRows8 = kRegRows8;  // for row counts that are multiples of it

template <typename W>
void rows_times_panel(const float* x, int64_t rows, int64_t K, const W* panel,
                      const float* bias, float* out, int64_t ldo, const W* next) {
  switch (rows) {
    case 8: return Block<8, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 6: return Block<6, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 5: return Block<5, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 4: return Block<4, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 3: return Block<3, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 2: return Block<2, W>::run(x, K, panel, K, bias, out, ldo, next);
    case 1: return Block<1, W>::run(x, K, panel, K, bias, out, ldo, next);
    default: return;
  }
}

// The tasks of y = x W over panel-packed weights: (panel, row block) pairs split over the
// threads. ``block(m0, rows, p, bias, out, ldo, next)`` computes rows [m0, m0 + rows) of
// panel p into out (row stride ldo), bias already offset (or null); ``next`` says whether
// this task may prefetch the thread's next panel. Partial last panels go through a scratch
// block.
template <typename Block>
void panel_tasks(int64_t M, int64_t N, const float* bias, float* y, int threads,
                 Block&& block) {
  // 8-row blocks when they divide M (the engine's batches): at 16 rows the 6 + 6 + 4 split
  // left a third of the last block's FMA slots idle; 24 `pocket` projections from DRAM,
  // interleaved medians, 6-row vs 8-row blocks: 8 rows 12.6 / 11.8 ms, 16 rows 20.0 / 16.3,
  // 32 rows 30.4 / 28.3, 64 rows 61.0 / 59.2; 256-1024 rows unchanged.
  const int64_t R = M % kRows8 == 0 ? kRows8 : kRows;
  const int64_t P = (N + kPanel - 1) / kPanel, MB = (M + R - 1) / R;
  const int64_t tasks = P * MB;
  // Task order: the inner loop re-reads the smaller operand, which stays in cache. Panel-
  // major (a thread's tasks share their panels) when the weight is the larger one (decode,
  // prefill); row-block-major otherwise: the VAE's upsampler GEMM, 7680 x 128 x 512 at batch
  // 16, re-read 15.7 MB of rows per panel panel-major (71 ms at batch 64; rows outer: see
  // vae.CausalConvTranspose).
  const bool rows_outer = M > N;
  parallel_for(tasks, threads, [&](int64_t t) {
    const int64_t p = rows_outer ? t % P : t / MB, mb = rows_outer ? t / P : t % MB;
    const int64_t m0 = mb * R, rows = std::min<int64_t>(R, M - m0);
    const int64_t n0 = p * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
    float bias_tail[kPanel] = {};
    const float* b = bias ? bias + n0 : nullptr;
    if (b != nullptr && cols < kPanel) {
      std::copy(b, b + cols, bias_tail);
      b = bias_tail;
    }
    // With several row blocks per panel (compute-bound), the first one fetches the next
    // panel (a thread's tasks run in order): 35 rows x the 24 `pocket` projections from
    // DRAM, 32.7 -> 30.0 ms. A single row block (1-6 rows) only streams: no prefetch.
    const bool next = !rows_outer && MB > 1 && m0 == 0 && p + 1 < P;
    if (cols == kPanel) {
      block(m0, rows, p, b, y + m0 * N + n0, N, next);
    } else {  // the last, partial panel: through a scratch block
      float tmp[kRows8 * kPanel];
      block(m0, rows, p, b, tmp, kPanel, next);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(tmp + r * kPanel, tmp + r * kPanel + cols, y + (m0 + r) * N + n0);
      }
    }
  });
}

template <typename W>
void gemm_panels(const float* x, int64_t M, int64_t K, const W* panels, int64_t N,
                 const float* bias, float* y, int threads) {
  panel_tasks(M, N, bias, y, threads,
              [&](int64_t m0, int64_t rows, int64_t p, const float* b, float* out, int64_t ldo,
                  bool next) {
                const W* panel = panels + p * K * kPanel;
                rows_times_panel(x + m0 * K, rows, K, panel, b, out, ldo,
                                 next ? panel + K * kPanel : nullptr);
              });
}
