// Through torch, each call gathered every stream's keys and values into dense [B, L, H, D]
// tensors (4 index ops of up to 35 MB at batch 64) and ran SDPA with a [B, 1, T, L] mask:
// 14 ms of a 73 ms batch-16 decode call. Here a task is one (stream, kv head) and reads its
// K/V rows in place from the pages. Its query rows (T per head, times the heads that share
// the kv head) sit side by side in the vector lanes: S[j][m] = K_j . Q_m for 8 keys at a
// time, the window's mask and softmax run down each lane, and O_m = sum_j P[j][m] V_j in
// register blocks of 6 rows x head_dim. (A first version copied each task's rows into GEMM
// panels: 6.4 ms per layer at batch 16, 22 GFLOP/s, mostly the transposing copy.)
#include "window_attention_cpu.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "paged_attention_cpu.h"
#include "simd.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

namespace {

struct Task {
  const int64_t* row;  // [L] offsets of this kv head's K rows in k (and V rows in v)
  const float* k;
  const float* v;
  int64_t L, Mp;             // keys; query lanes, a multiple of 16
  const float* qt;           // [D][Mp] the queries, transposed
  float* s;                  // [L][Mp] scores, then probabilities (unnormalised)
  const float* lo;           // [Mp] first and last key (in 0 .. L - 1) of each lane
  const float* hi;
};

// S = K Q^T (scaled), 8 keys at a time (8 independent accumulators per lane vector).
void scores(const Task& t, int64_t D, float scale) {
  for (int64_t mv = 0; mv < t.Mp; mv += 16) {
    for (int64_t j0 = 0; j0 < t.L; j0 += 8) {
      const int64_t n = std::min<int64_t>(8, t.L - j0);
      const float* kr[8];
      for (int r = 0; r < 8; ++r) kr[r] = t.k + t.row[j0 + std::min<int64_t>(r, n - 1)];
      v16 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = splat(0.0f);
      for (int64_t d = 0; d < D; ++d) {
        const v16 q = load(t.qt + d * t.Mp + mv);
        for (int r = 0; r < 8; ++r) acc[r] += splat(kr[r][d]) * q;
      }
      for (int64_t r = 0; r < n; ++r) store(t.s + (j0 + r) * t.Mp + mv, acc[r] * scale);
    }
  }
}

// Each lane's softmax over its window, unnormalised; returns 1 / sum per lane in inv.
void softmax_lanes(const Task& t, float* inv) {
  const v16 ninf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t mv = 0; mv < t.Mp; mv += 16) {
    const v16 lo = load(t.lo + mv), hi = load(t.hi + mv);
    v16 mx = ninf;
    for (int64_t j = 0; j < t.L; ++j) {
      const v16 jj = splat(static_cast<float>(j));
      const v16 sv = load(t.s + j * t.Mp + mv);
      const v16 in = select((jj >= lo) & (jj <= hi), sv, ninf);
      mx = select(mx > in, mx, in);
    }
    v16 sum = splat(0.0f);
    for (int64_t j = 0; j < t.L; ++j) {
      const v16 jj = splat(static_cast<float>(j));
      float* sp = t.s + j * t.Mp + mv;
      float e[16];
      store(e, load(sp) - mx);
      for (int i = 0; i < 16; ++i) e[i] = exp_approx(e[i]);
      const v16 p = select((jj >= lo) & (jj <= hi), load(e), splat(0.0f));
      store(sp, p);
      sum += p;
    }
    // lanes past the last query have no key: their sum is 0, and nobody reads them
    store(inv + mv, select(sum > 0.0f, 1.0f / sum, splat(0.0f)));
  }
}

// O[m] = inv[m] sum_j P[j][m] V_j for MR lanes at a time; DV vectors per row (D = 16 DV).
template <int DV, int MR>
void weighted_values(const Task& t, int64_t m0, int64_t rows, const float* inv, float* o,
                     int64_t ldo) {
  v16 acc[MR][DV];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.0f);
  }
  for (int64_t j = 0; j < t.L; ++j) {
    const float* vr = t.v + t.row[j];
    v16 vv[DV];
    for (int c = 0; c < DV; ++c) vv[c] = load(vr + 16 * c);
    const float* pj = t.s + j * t.Mp + m0;
    for (int r = 0; r < MR; ++r) {
      const v16 p = splat(pj[r]);
      for (int c = 0; c < DV; ++c) acc[r][c] += p * vv[c];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < DV; ++c) store(o + (m0 + r) * ldo + 16 * c, acc[r][c] * inv[m0 + r]);
  }
}

template <int DV>
void values(const Task& t, int64_t M, const float* inv, float* o, int64_t ldo) {
  constexpr int MR = DV <= 4 ? 6 : 3;  // <= 24 accumulators
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    weighted_values<DV, MR>(t, m0, std::min<int64_t>(MR, M - m0), inv, o, ldo);
  }
}

}  // namespace

bool window_attention_dim_ok(int64_t dim) {
  return dim == 16 || dim == 32 || dim == 64 || dim == 128;
}

void paged_window_attention_cpu(const float* q, const float* k, const float* v,
                                const int32_t* indptr, const int32_t* indices,
                                const int32_t* last_page_len, const int32_t* start,
                                int64_t batch, int64_t T, int64_t heads, int64_t kv_heads,
                                int64_t dim, int64_t block_size, int64_t window, float scale,
                                float* out, int threads) {
  const int64_t rep = heads / kv_heads, M = rep * T, Mp = (M + 15) / 16 * 16;
  const int64_t row_stride = kv_heads * dim, tasks = batch * kv_heads;
  parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t b = task / kv_heads, hk = task % kv_heads;
    const int32_t p0 = indptr[b];
    int64_t first;
    const int64_t n = live_rows(indptr, last_page_len, start, block_size, b, &first);
    // only the rows some query sees: from the first query's window start
    const int64_t j0 = std::max<int64_t>(0, n - T - window + 1), L = n - j0;
    thread_local std::vector<int64_t> row;
    thread_local std::vector<float> qt, s, lo, hi, inv, o;
    row.resize(L);
    for (int64_t j = 0; j < L; ++j) {
      const int64_t u = first + j0 + j;
      const int64_t page = indices[p0 + u / block_size];
      row[j] = (page * block_size + u % block_size) * row_stride + hk * dim;
    }
    qt.assign(dim * Mp, 0.0f);
    lo.assign(Mp, 1.0f);  // empty window (lo > hi) for the padding lanes
    hi.assign(Mp, 0.0f);
    for (int64_t m = 0; m < M; ++m) {  // lane m: query t = m % T of head hk * rep + m / T
      const int64_t t = m % T, h = hk * rep + m / T;
      const float* src = q + ((b * T + t) * heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) qt[d * Mp + m] = src[d];
      const int64_t last = n - T + t - j0;
      hi[m] = static_cast<float>(last);
      lo[m] = static_cast<float>(std::max<int64_t>(0, last - window + 1));
    }
    s.resize(L * Mp);
    inv.resize(Mp);
    o.resize(M * dim);
    const Task tk{row.data(), k, v, L, Mp, qt.data(), s.data(), lo.data(), hi.data()};
    scores(tk, dim, scale);
    softmax_lanes(tk, inv.data());
    switch (dim) {
      case 16: values<1>(tk, M, inv.data(), o.data(), dim); break;
      case 32: values<2>(tk, M, inv.data(), o.data(), dim); break;
      case 64: values<4>(tk, M, inv.data(), o.data(), dim); break;
      default: values<8>(tk, M, inv.data(), o.data(), dim); break;
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t t = m % T, h = hk * rep + m / T;
      std::copy(o.data() + m * dim, o.data() + (m + 1) * dim,
                out + ((b * T + t) * heads + h) * dim);
    }
  });
}

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
