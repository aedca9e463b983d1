#include "paged_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef CALM_FAST_OPENMP
#include <omp.h>
#endif

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

namespace {

// Dot product with 8 independent partial sums: without -ffast-math the compiler may not
// reorder a single float reduction, so it would stay scalar; 8 lanes map onto one AVX
// register (or two SSE ones) and vectorise (measured 2x on the whole kernel).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

struct Args {
  const float *q, *k, *v;
  const int32_t *indptr, *indices, *last_page_len, *start;
  int64_t heads, kv_heads, dim, block_size;
  float scale;
  float* out;
};

// Calls fn(t, row) for the live rows t0 <= t < t1 of stream b in order (t counts from the
// stream's first live row); row is the row's offset in floats into the K (or V) cache.
template <typename Fn>
inline void for_each_row(const Args& a, int64_t b, int64_t first, int64_t t0, int64_t t1,
                         Fn&& fn) {
  const int64_t row_stride = a.kv_heads * a.dim;
  const int32_t p0 = a.indptr[b], p1 = a.indptr[b + 1];
  int64_t t = t0;
  while (t < t1) {  // t1 <= live rows, so p stays below p1
    const int64_t u = first + t;  // offset from the start of the stream's first page
    const int32_t p = p0 + static_cast<int32_t>(u / a.block_size);
    const int64_t r1 = (p == p1 - 1) ? a.last_page_len[b] : a.block_size;
    const int64_t base = (int64_t)a.indices[p] * a.block_size * row_stride;
    for (int64_t r = u % a.block_size; r < r1 && t < t1; ++r, ++t) fn(t, base + r * row_stride);
  }
}



// Attention of stream b (its live rows starting ``first`` rows into its first page) over
// rows [t0, t1), every head, unnormalised: o[h] = sum_t exp(s_t - m[h]) v_t and
// l[h] = sum_t exp(s_t - m[h]). Within a row all heads are handled together, so each cache
// row is read as one contiguous run.
void attend_part(const Args& a, int64_t b, int64_t first, int64_t t0, int64_t t1, float* o,
                 float* m, float* l) {
  const int64_t group = a.heads / a.kv_heads, nh = a.heads;
  std::fill(o, o + nh * a.dim, 0.0f);
  std::fill(m, m + nh, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nh, 0.0f);
  const int64_t rows = t1 - t0;
  if (rows <= 0) return;
  const float* qb = a.q + b * a.heads * a.dim;
  thread_local std::vector<float> scores;  // reused across calls: no per-task allocation
  scores.resize(nh * rows);
  for_each_row(a, b, first, t0, t1, [&](int64_t t, int64_t row) {
    const float* krow = a.k + row;
    for (int64_t h = 0; h < nh; ++h) {
      scores[h * rows + t - t0] = dot(qb + h * a.dim, krow + (h / group) * a.dim, a.dim) * a.scale;
    }
  });
  for (int64_t h = 0; h < nh; ++h) {
    float* s = scores.data() + h * rows;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < rows; ++i) mx = std::max(mx, s[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < rows; ++i) {
      s[i] = std::exp(s[i] - mx);
      sum += s[i];
    }
    m[h] = mx;
    l[h] = sum;
  }
  for_each_row(a, b, first, t0, t1, [&](int64_t t, int64_t row) {
    const float* vrow = a.v + row;
    for (int64_t h = 0; h < nh; ++h) {
      const float w = scores[h * rows + t - t0];
      const float* vr = vrow + (h / group) * a.dim;
      float* oh = o + h * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) oh[d] += w * vr[d];
    }
  });
}

}  // namespace

void paged_decode_attention_cpu(const float* q, const float* k, const float* v,
                                const int32_t* indptr, const int32_t* indices,
                                const int32_t* last_page_len, const int32_t* start,
                                int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t block_size, float scale, float* out) {
  const Args a{q, k, v, indptr, indices, last_page_len, start, heads, kv_heads, dim,
               block_size, scale, out};
  // Each stream's live rows are cut into chunks of CHUNK_ROWS (the last one shorter), one
  // task each (split-K, as flash-decoding does); the partial softmaxes are then merged in
  // chunk order. The cut depends on the stream's own row count only, never on the thread
  // count or on the other streams, so a stream's output has the same bits on any number of
  // threads and in any batch (the engine may change the LM's threads between steps).
  // Contiguous runs of whole cache rows: splitting by head instead had each thread read a
  // 256-byte piece of every 4 KB row, 12 GB/s against ~30 (`pocket`, ctx 512, batch 1).
  constexpr int64_t CHUNK_ROWS = 64;
  std::vector<int64_t> first(batch), rows(batch), task0(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    rows[b] = live_rows(a.indptr, a.last_page_len, a.start, a.block_size, b, &first[b]);
    task0[b + 1] = task0[b] + std::max<int64_t>(1, (rows[b] + CHUNK_ROWS - 1) / CHUNK_ROWS);
  }
  const int64_t tasks = task0[batch];
  std::vector<float> po(tasks * heads * dim), pm(tasks * heads), pl(tasks * heads);
#ifdef CALM_FAST_OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = std::upper_bound(task0.begin(), task0.end(), t) - task0.begin() - 1;
    const int64_t c = t - task0[b];
    const int64_t t0 = std::min(rows[b], c * CHUNK_ROWS);
    const int64_t t1 = std::min(rows[b], t0 + CHUNK_ROWS);
    attend_part(a, b, first[b], t0, t1, po.data() + t * heads * dim, pm.data() + t * heads,
                pl.data() + t * heads);
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t chunks = task0[b + 1] - task0[b];
    for (int64_t h = 0; h < heads; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, pm[(task0[b] + c) * heads + h]);
      float* o = out + (b * heads + h) * dim;
      std::fill(o, o + dim, 0.0f);
      float sum = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (task0[b] + c) * heads + h;
        if (pl[i] == 0.0f) continue;  // an empty chunk (or a stream with no live rows)
        const float w = std::exp(pm[i] - mx);
        sum += w * pl[i];
        for (int64_t d = 0; d < dim; ++d) o[d] += w * po[i * dim + d];
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
    }
  }
}

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
