// Every layer of a pre-LN RoPE Transformer over a paged K/V cache for a batch of new fp32
// rows, in one native call: the backbone's decode step, and the VAE's windowed Transformer.
#pragma once
#include <cstdint>
#include <vector>

#include "gemm_cpu.h"
#include "isa.h"

namespace calm_fast {

// Weights of one pre-LN layer; projections packed as fp32 or bf16 panels
// [ceil(out / 32), in, 32] (gemm_cpu.h), no biases (as published).
struct DecodeLayerWeights {
  const float *ln1_w, *ln1_b;
  Panels w_qkv, w_o;
  const float *ln2_w, *ln2_b;
  Panels w1, w2;
  const float *ls1, *ls2;  // layer scales, or nullptr
};

struct DecodeShape {
  int64_t d_model, heads, kv_heads, head_dim, ff, block_size;
  float eps;
};

inline namespace CALM_FAST_ISA {  // isa.h

// x [B, d] is updated in place through every layer. cos/sin [B, head_dim/2] rotate q and k
// ((real, imag) pairs interleaved). k_cache/v_cache: [layers, num_blocks, block_size,
// kv_heads, head_dim]; each row's new K/V goes to flat row slots[b] of every layer, then it
// attends over its page table (see paged_attention_cpu.h), which must include that row.
// queries > 1 or window > 0: the rows are B / queries streams of `queries` consecutive rows
// each (the page table has B / queries entries) and attend causally over their stream's
// last `window` rows (0: all of them; window_attention_cpu.h: a prefill). last_kv_only: the
// last layer stops once its K/V are written (x then holds the last layer's input).
// last_rows_only (window 0): the last layer finishes only each stream's last row (x's other
// rows then hold the last layer's input), as a one-query step would.
// Inputs must already be validated.
void decode_step_f32(const std::vector<DecodeLayerWeights>& layers, const DecodeShape& s,
                     float* x, int64_t B, const float* cos, const float* sin, float* k_cache,
                     float* v_cache, int64_t num_blocks, const int64_t* slots,
                     const int32_t* indptr, const int32_t* indices,
                     const int32_t* last_page_len, const int32_t* start, int64_t queries,
                     int64_t window, bool last_kv_only, bool last_rows_only,
                     int threads);

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
