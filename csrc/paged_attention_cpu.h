#pragma once
#include <cstdint>

#include "isa.h"

namespace calm_fast {
inline namespace CALM_FAST_ISA {  // isa.h

// Live rows of stream b in a CSR page table (pages indptr[b] .. indptr[b + 1], the last one
// holding last_page_len[b] rows, the first starting at row start[b]; start may be null);
// *first: that first row.
inline int64_t live_rows(const int32_t* indptr, const int32_t* last_page_len,
                         const int32_t* start, int64_t block_size, int64_t b, int64_t* first) {
  const int32_t p0 = indptr[b], p1 = indptr[b + 1];
  *first = (start != nullptr && p1 > p0) ? start[b] : 0;
  return p1 > p0 ? (int64_t)(p1 - p0 - 1) * block_size + last_page_len[b] - *first : 0;
}

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

}  // inline namespace CALM_FAST_ISA
}  // namespace calm_fast
