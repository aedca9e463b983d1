// The backbone's decode step at batch 1-4 streams nothing but weights: 302 MB for the
// `pocket` shapes, ~9-10 ms at this host's 30-35 GB/s. Run op by op from Python, the ~20
// small torch calls per layer around the four projections (LayerNorm, RoPE, cache writes,
// residual adds, GELU, dispatch) cost 2.5-3.5 ms per frame on top. Here the whole step is
// one call: the projections are gemm_panels_any (fp32 panels, or bf16 ones: half the
// bytes), attention is the paged CPU kernel, and the rest is a few loops over B x d floats.
#include "decode_step_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemm_cpu.h"
#include "paged_attention_cpu.h"
#include "simd.h"
#include "window_attention_cpu.h"


namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

namespace {

// The loops over rows below run on the GEMMs' threads from 8 rows up (the VAE's Transformer
// steps 256 rows at once: GELU over 256 x 2048 alone took ~1.8 ms on one thread).
template <typename Fn>
void each_row(int64_t B, int nt, Fn&& fn) {
  parallel_for(B, B >= 8 ? nt : 1, fn);
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t B, int64_t d,
                float eps, int nt) {
  each_row(B, nt, [&](int64_t r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += xr[i];
    mean /= static_cast<double>(d);
    for (int64_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float m = static_cast<float>(mean);
    const float inv = 1.0f / std::sqrt(static_cast<float>(var / static_cast<double>(d)) + eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - m) * inv * w[i] + b[i];
  });
}

// GELU, tanh approximation, in place: 0.5 v (1 + tanh(u)), tanh(u) = (e - 1) / (e + 1) with
// e = exp(2u).
void gelu_tanh(float* v, int64_t B, int64_t n, int nt) {
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  each_row(B, nt, [&](int64_t r) {
    float* vr = v + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float x = vr[i];
      const float e = exp_approx(2.0f * k0 * (x + 0.044715f * x * x * x));
      vr[i] = 0.5f * x * (1.0f + (e - 1.0f) / (e + 1.0f));
    }
  });
}

// x += ls * upd (ls may be null).
void residual(float* x, const float* upd, const float* ls, int64_t B, int64_t d, int nt) {
  each_row(B, nt, [&](int64_t r) {
    for (int64_t i = 0; i < d; ++i) x[r * d + i] += ls ? ls[i] * upd[r * d + i] : upd[r * d + i];
  });
}

}  // namespace

void decode_step_f32(const std::vector<DecodeLayerWeights>& layers, const DecodeShape& s,
                     float* x, int64_t B, const float* cos, const float* sin, float* k_cache,
                     float* v_cache, int64_t num_blocks, const int64_t* slots,
                     const int32_t* indptr, const int32_t* indices,
                     const int32_t* last_page_len, const int32_t* start, int64_t queries,
                     int64_t window, bool last_kv_only, bool last_rows_only, int threads) {
  const int nt = team(threads, B);
  const int64_t d = s.d_model, H = s.heads, Hk = s.kv_heads, D = s.head_dim, half = D / 2;
  const int64_t nqkv = (H + 2 * Hk) * D, row = Hk * D;
  const int64_t layer_floats = num_blocks * s.block_size * row;
  thread_local std::vector<float> h, qkv, q, attn, upd, ff;
  h.resize(B * d);
  qkv.resize(B * nqkv);
  q.resize(B * H * D);
  attn.resize(B * H * D);
  upd.resize(B * d);
  ff.resize(B * s.ff);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (size_t li = 0; li < layers.size(); ++li) {
    const DecodeLayerWeights& L = layers[li];
    float* kc = k_cache + static_cast<int64_t>(li) * layer_floats;
    float* vc = v_cache + static_cast<int64_t>(li) * layer_floats;
    layer_norm(x, L.ln1_w, L.ln1_b, h.data(), B, d, s.eps, nt);
    gemm_panels_any(h.data(), B, d, L.w_qkv, nqkv, nullptr, qkv.data(), threads);
    // the buffers are thread_local: inside the parallel loop their names would be the
    // worker threads' own (empty) vectors, so the loop sees plain pointers
    const float* qkv_p = qkv.data();
    float* q_p = q.data();
    each_row(B, nt, [&](int64_t b) {
      // RoPE on q (into q) and k (straight into its cache row); v copied as is.
      const float* src = qkv_p + b * nqkv;
      const float* c = cos + b * half;
      const float* sn = sin + b * half;
      float* kdst = kc + slots[b] * row;
      for (int64_t hh = 0; hh < H + Hk; ++hh) {
        const float* in = src + hh * D;
        float* out = hh < H ? q_p + (b * H + hh) * D : kdst + (hh - H) * D;
        for (int64_t j = 0; j < half; ++j) {
          const float re = in[2 * j], im = in[2 * j + 1];
          out[2 * j] = re * c[j] - im * sn[j];
          out[2 * j + 1] = re * sn[j] + im * c[j];
        }
      }
      const float* vsrc = src + (H + Hk) * D;
      float* vdst = vc + slots[b] * row;
      for (int64_t i = 0; i < row; ++i) vdst[i] = vsrc[i];
    });
    if (last_kv_only && li + 1 == layers.size()) break;  // a prefix: nobody reads its output
    if (last_rows_only && li + 1 == layers.size()) {
      // Only each stream's last row is read (a prefill that also computes the first frame):
      // the rest of the layer runs on those S rows alone, as the one-query step runs it.
      const int64_t S = B / queries;
      thread_local std::vector<float> xl;
      xl.resize(S * d);
      for (int64_t b = 0; b < S; ++b) {
        const int64_t r = b * queries + queries - 1;
        if (r != b) std::copy(q.data() + r * H * D, q.data() + (r + 1) * H * D, q.data() + b * H * D);
        std::copy(x + r * d, x + (r + 1) * d, xl.data() + b * d);
      }
      paged_decode_attention_cpu(q.data(), kc, vc, indptr, indices, last_page_len, start, S, H,
                                 Hk, D, s.block_size, scale, attn.data());
      gemm_panels_any(attn.data(), S, H * D, L.w_o, d, nullptr, upd.data(), threads);
      residual(xl.data(), upd.data(), L.ls1, S, d, nt);
      layer_norm(xl.data(), L.ln2_w, L.ln2_b, h.data(), S, d, s.eps, nt);
      gemm_panels_any(h.data(), S, d, L.w1, s.ff, nullptr, ff.data(), threads);
      gelu_tanh(ff.data(), S, s.ff, nt);
      gemm_panels_any(ff.data(), S, s.ff, L.w2, d, nullptr, upd.data(), threads);
      residual(xl.data(), upd.data(), L.ls2, S, d, nt);
      for (int64_t b = 0; b < S; ++b) {
        const int64_t r = b * queries + queries - 1;
        std::copy(xl.data() + b * d, xl.data() + (b + 1) * d, x + r * d);
      }
      break;
    }
    if (queries == 1 && window == 0) {
      paged_decode_attention_cpu(q.data(), kc, vc, indptr, indices, last_page_len, start, B, H,
                                 Hk, D, s.block_size, scale, attn.data());
    } else {  // `queries` rows per stream, each over its last `window` rows (0: all)
      paged_window_attention_cpu(q.data(), kc, vc, indptr, indices, last_page_len, start,
                                 B / queries, queries, H, Hk, D, s.block_size,
                                 window > 0 ? window : (int64_t{1} << 40), scale, attn.data(),
                                 threads);
    }
    gemm_panels_any(attn.data(), B, H * D, L.w_o, d, nullptr, upd.data(), threads);
    residual(x, upd.data(), L.ls1, B, d, nt);
    layer_norm(x, L.ln2_w, L.ln2_b, h.data(), B, d, s.eps, nt);
    gemm_panels_any(h.data(), B, d, L.w1, s.ff, nullptr, ff.data(), threads);
    gelu_tanh(ff.data(), B, s.ff, nt);
    gemm_panels_any(ff.data(), B, s.ff, L.w2, d, nullptr, upd.data(), threads);
    residual(x, upd.data(), L.ls2, B, d, nt);
  }
}

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
