// At decode sizes a linear is a matrix-vector product that only streams its weight. torch's
// sgemm with 1-8 rows runs on one thread; cpu_linear.SplitLinear's batched matmul over two
// row slabs uses both cores but reaches ~25-28 GB/s where a plain sum reads 34-54 GB/s on
// the same host. Here each thread streams its own contiguous slab of rows of W once,
// four rows per pass (one load and store of the accumulator per four weight rows), into a
// private accumulator that stays in L1/L2, and the partial sums are added at the end.
#include "gemv_cpu.h"

#include <algorithm>
#include <vector>

#ifdef CALM_FAST_OPENMP
#include <omp.h>
#endif

namespace calm_fast {

namespace {

template <int B>
void slab(const float* x, const float* w, float* acc, int64_t K, int64_t N, int64_t k0,
          int64_t k1) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* w0 = w + k * N;
    const float* w1 = w0 + N;
    const float* w2 = w1 + N;
    const float* w3 = w2 + N;
    for (int b = 0; b < B; ++b) {
      const float a0 = x[b * K + k], a1 = x[b * K + k + 1], a2 = x[b * K + k + 2],
                  a3 = x[b * K + k + 3];
      float* o = acc + b * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
    }
  }
  for (; k < k1; ++k) {
    const float* wk = w + k * N;
    for (int b = 0; b < B; ++b) {
      const float a = x[b * K + k];
      float* o = acc + b * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) o[n] += a * wk[n];
    }
  }
}

template <int B>
void run(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
         int threads) {
#ifdef CALM_FAST_OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
  const int T = std::max(1, std::min<int>(threads, static_cast<int>(K / 64)));
#else
  (void)threads;
  const int T = 1;
#endif
  std::vector<float> acc(static_cast<size_t>(T) * B * N, 0.0f);
#ifdef CALM_FAST_OPENMP
#pragma omp parallel for num_threads(T) schedule(static, 1)
#endif
  for (int t = 0; t < T; ++t) {
    const int64_t k0 = K * t / T, k1 = K * (t + 1) / T;
    slab<B>(x, w, acc.data() + static_cast<size_t>(t) * B * N, K, N, k0, k1);
  }
  for (int b = 0; b < B; ++b) {
    float* out = y + b * N;
    const float* a0 = acc.data() + b * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) out[n] = (bias ? bias[n] : 0.0f) + a0[n];
    for (int t = 1; t < T; ++t) {
      const float* at = acc.data() + static_cast<size_t>(t) * B * N + b * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) out[n] += at[n];
    }
  }
}

}  // namespace

void gemv_rows_f32(const float* x, const float* w, const float* bias, float* y, int64_t B,
                   int64_t K, int64_t N, int threads) {
  switch (B) {
    case 1: return run<1>(x, w, bias, y, K, N, threads);
    case 2: return run<2>(x, w, bias, y, K, N, threads);
    case 3: return run<3>(x, w, bias, y, K, N, threads);
    case 4: return run<4>(x, w, bias, y, K, N, threads);
    default: break;
  }
}

}  // namespace calm_fast
