#pragma once
#include <cstdint>

namespace calm_fast {

// Single-query decode attention for a ragged batch over a paged K/V cache (fp32).
//   q, out:       [batch, heads, dim]
//   k, v:         [num_blocks, block_size, kv_heads, dim]   (heads % kv_heads == 0)
//   indptr:       [batch + 1]   pages of stream b are indices[indptr[b] : indptr[b + 1]]
//   last_page_len:[batch]       live rows in the last page
//   start:        [batch]       first live row in the first page (sliding windows); may be null
// A stream with no live rows gets a zero output. Inputs must already be validated.
void paged_decode_attention_cpu(const float* q, const float* k, const float* v,
                                const int32_t* indptr, const int32_t* indices,
                                const int32_t* last_page_len, const int32_t* start,
                                int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t block_size, float scale, float* out);

}  // namespace calm_fast
