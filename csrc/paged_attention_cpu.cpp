#include "paged_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace calm_fast {

namespace {
// Dot product with 8 independent partial sums: without -ffast-math the compiler may not
// reorder a single float reduction, so it would stay scalar; 8 lanes map onto one AVX
// register (or two SSE ones) and vectorise.
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
}  // namespace

void paged_decode_attention_cpu(const float* q, const float* k, const float* v,
                                const int32_t* indptr, const int32_t* indices,
                                const int32_t* last_page_len, const int32_t* start,
                                int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t block_size, float scale, float* out) {
  const int64_t group = heads / kv_heads;
  const int64_t row_stride = kv_heads * dim;  // floats between consecutive cache rows
  // One task per (stream, kv head): each K/V row is read once for all query heads of its
  // group, which is what makes grouped-query attention cheaper than per-head loops.
#ifdef CALM_FAST_OPENMP
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
#endif
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int32_t p0 = indptr[b], p1 = indptr[b + 1];
      const int64_t first = (start != nullptr && p1 > p0) ? start[b] : 0;
      const int64_t rows =
          p1 > p0 ? (int64_t)(p1 - p0 - 1) * block_size + last_page_len[b] - first : 0;
      float* o = out + (b * heads + g * group) * dim;
      if (rows <= 0) {
        std::fill(o, o + group * dim, 0.0f);
        continue;
      }
      const float* qg = q + (b * heads + g * group) * dim;
      std::vector<float> scores(group * rows);
      // Pass 1: scores for every live row, walking the pages in order.
      int64_t t = 0;
      for (int32_t p = p0; p < p1; ++p) {
        const int64_t r0 = (p == p0) ? first : 0;
        const int64_t r1 = (p == p1 - 1) ? last_page_len[b] : block_size;
        const float* kp = k + (int64_t)indices[p] * block_size * row_stride + g * dim;
        for (int64_t r = r0; r < r1; ++r, ++t) {
          const float* kr = kp + r * row_stride;
          for (int64_t h = 0; h < group; ++h) {
            scores[h * rows + t] = dot(qg + h * dim, kr, dim) * scale;
          }
        }
      }
      // Softmax per head.
      for (int64_t h = 0; h < group; ++h) {
        float* s = scores.data() + h * rows;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < rows; ++i) m = std::max(m, s[i]);
        float sum = 0.0f;
        for (int64_t i = 0; i < rows; ++i) {
          s[i] = std::exp(s[i] - m);
          sum += s[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < rows; ++i) s[i] *= inv;
      }
      // Pass 2: weighted sum of V rows.
      std::fill(o, o + group * dim, 0.0f);
      t = 0;
      for (int32_t p = p0; p < p1; ++p) {
        const int64_t r0 = (p == p0) ? first : 0;
        const int64_t r1 = (p == p1 - 1) ? last_page_len[b] : block_size;
        const float* vp = v + (int64_t)indices[p] * block_size * row_stride + g * dim;
        for (int64_t r = r0; r < r1; ++r, ++t) {
          const float* vr = vp + r * row_stride;
          for (int64_t h = 0; h < group; ++h) {
            const float w = scores[h * rows + t];
            float* oh = o + h * dim;
            for (int64_t d = 0; d < dim; ++d) oh[d] += w * vr[d];
          }
        }
      }
    }
  }
}

}  // namespace calm_fast
