// Paged KV-cache bookkeeping: integers only, no tensors, no torch.
//
// The manager hands out fixed-size blocks of cache rows to streams. Tensor storage lives
// in torch (calm_fast/cache.py); this class only decides which rows a stream owns, so
// it can be shared by the CPU and GPU paths and exported as a CSR page table.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace calm_fast {

// Raised when an operation needs more free blocks than exist. State is left unchanged.
struct CacheFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Raised for a stream id the manager does not know.
struct UnknownStreamError : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// A block copy the caller must perform on every layer's K/V storage (copy-on-write).
struct BlockCopy {
  int32_t src;
  int32_t dst;
  int32_t rows;  // rows [0, rows) of src go to the same rows of dst
};

struct Stream {
  std::vector<int32_t> blocks;
  int64_t start = 0;     // offset of the first live row inside blocks[0]
  int64_t length = 0;    // live rows
  int64_t position = 0;  // rows ever appended (absolute position of the next row)
};

struct AppendResult {
  std::vector<int32_t> slots;  // block * block_size + row, one per appended row
  std::vector<BlockCopy> copies;
};

class KVManager {
 public:
  KVManager(int64_t num_blocks, int64_t block_size);

  int64_t new_stream();
  int64_t fork(int64_t stream);
  AppendResult append(int64_t stream, int64_t n);
  // n rows for every listed stream, all or nothing: either each stream gets its rows
  // (slots stream-major, [n_streams * n]) or CacheFullError leaves everything unchanged.
  AppendResult append_batch(const int64_t* streams, int64_t n_streams, int64_t n);
  // Keeps only the last `keep_last` rows; whole blocks that fall out are released.
  void trim_front(int64_t stream, int64_t keep_last);
  // Drop the last n rows (a failed step's rows): blocks past the new end are released.
  void truncate(int64_t stream, int64_t n);
  void free(int64_t stream);

  // How many blocks `append(stream, n)` would take from the free list right now.
  int64_t blocks_needed(int64_t stream, int64_t n) const;

  // CSR export into caller-owned buffers. Returns the number of page indices written.
  int64_t page_table(const int64_t* streams, int64_t n_streams, int32_t* indptr,
                     int32_t* indices, int64_t indices_capacity, int32_t* last_page_len,
                     int32_t* start) const;

  const Stream& stream(int64_t id) const;
  bool has_stream(int64_t id) const { return streams_.count(id) != 0; }
  std::vector<int64_t> stream_ids() const;
  int32_t refcount(int32_t block) const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_streams() const { return static_cast<int64_t>(streams_.size()); }

 private:
  Stream& get(int64_t id);
  void release(int32_t block);
  int32_t take();

  int64_t num_blocks_;
  int64_t block_size_;
  int64_t next_id_ = 0;
  std::vector<int32_t> free_;  // stack; lowest ids are handed out first
  std::vector<int32_t> refcount_;
  std::unordered_map<int64_t, Stream> streams_;
};

}  // namespace calm_fast
