#pragma once
#include <cstdint>

#include "isa.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

// Causal sliding-window attention of T new rows per stream over a paged K/V cache (fp32):
// the VAE's windowed Transformer decoding a few frames of many streams at once.
//   q, out:  [batch, T, heads, dim]
//   k, v:    [num_blocks, block_size, kv_heads, dim]   (heads % kv_heads == 0)
//   page table as paged_attention_cpu.h (indptr, indices, last_page_len, start or null)
// Stream b's last T live rows hold the queries' own keys (written before the call); query t
// sees the live rows n_b - T + t - window + 1 .. n_b - T + t (n_b: its live rows, >= T).
// dim must be 16, 32, 64 or 128 (window_attention_dim_ok). Inputs must already be validated.
bool window_attention_dim_ok(int64_t dim);

void paged_window_attention_cpu(const float* q, const float* k, const float* v,
                                const int32_t* indptr, const int32_t* indices,
                                const int32_t* last_page_len, const int32_t* start,
                                int64_t batch, int64_t T, int64_t heads, int64_t kv_heads,
                                int64_t dim, int64_t block_size, int64_t window, float scale,
                                float* out, int threads);

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
