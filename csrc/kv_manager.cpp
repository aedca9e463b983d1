#include "kv_manager.h"

#include <algorithm>

namespace calm_fast {

namespace {
std::string stream_name(int64_t id) { return "stream " + std::to_string(id); }
}  // namespace

KVManager::KVManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX / std::max<int64_t>(block_size, 1)) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31 / block_size), got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument("block_size must be positive, got " +
                                std::to_string(block_size));
  }
  // A stack whose top is block 0: a fresh manager hands out 0, 1, 2, ... and a released
  // block is the next one reused (warm in cache). The Python twin mirrors this order.
  free_.reserve(num_blocks);
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  refcount_.assign(num_blocks, 0);
}

Stream& KVManager::get(int64_t id) {
  auto it = streams_.find(id);
  if (it == streams_.end()) throw UnknownStreamError("unknown " + stream_name(id));
  return it->second;
}

const Stream& KVManager::stream(int64_t id) const {
  auto it = streams_.find(id);
  if (it == streams_.end()) throw UnknownStreamError("unknown " + stream_name(id));
  return it->second;
}

std::vector<int64_t> KVManager::stream_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(streams_.size());
  for (const auto& kv : streams_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t KVManager::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::invalid_argument("block " + std::to_string(block) + " out of range [0, " +
                                std::to_string(num_blocks_) + ")");
  }
  return refcount_[block];
}

int32_t KVManager::take() {
  int32_t b = free_.back();
  free_.pop_back();
  refcount_[b] = 1;
  return b;
}

void KVManager::release(int32_t block) {
  if (--refcount_[block] == 0) free_.push_back(block);
}

int64_t KVManager::new_stream() {
  int64_t id = next_id_++;
  streams_.emplace(id, Stream{});
  return id;
}

int64_t KVManager::fork(int64_t src) {
  const Stream copy = get(src);  // validate before allocating an id
  for (int32_t b : copy.blocks) ++refcount_[b];
  int64_t id = next_id_++;
  streams_.emplace(id, copy);
  return id;
}

int64_t KVManager::blocks_needed(int64_t id, int64_t n) const {
  if (n < 0) throw std::invalid_argument("cannot append a negative number of rows: " +
                                         std::to_string(n));
  const Stream& s = stream(id);
  if (n == 0) return 0;
  const int64_t nb = static_cast<int64_t>(s.blocks.size());
  const int64_t used = s.start + s.length;  // rows occupied from the start of blocks[0]
  const int64_t room = nb * block_size_ - used;
  const int64_t fresh = n > room ? (n - room + block_size_ - 1) / block_size_ : 0;
  // Writing into a block that another stream also reads needs a private copy first.
  const bool cow = room > 0 && refcount_[s.blocks.back()] > 1;
  return fresh + (cow ? 1 : 0);
}

AppendResult KVManager::append(int64_t id, int64_t n) {
  const int64_t needed = blocks_needed(id, n);  // validates id and n
  if (needed > num_free_blocks()) {
    throw CacheFullError("KV cache full: " + stream_name(id) + " needs " +
                         std::to_string(needed) + " more block(s) to append " +
                         std::to_string(n) + " row(s), but only " +
                         std::to_string(num_free_blocks()) + " of " +
                         std::to_string(num_blocks_) + " blocks are free (block_size " +
                         std::to_string(block_size_) + ")");
  }
  Stream& s = get(id);
  AppendResult out;
  if (n == 0) return out;
  const int64_t nb = static_cast<int64_t>(s.blocks.size());
  int64_t used = s.start + s.length;
  if (nb * block_size_ > used && refcount_[s.blocks.back()] > 1) {
    const int32_t src = s.blocks.back();
    const int32_t dst = take();
    out.copies.push_back({src, dst, static_cast<int32_t>(used - (nb - 1) * block_size_)});
    release(src);
    s.blocks.back() = dst;
  }
  out.slots.reserve(n);
  for (int64_t i = 0; i < n; ++i, ++used) {
    if (used == static_cast<int64_t>(s.blocks.size()) * block_size_) s.blocks.push_back(take());
    out.slots.push_back(static_cast<int32_t>(s.blocks[used / block_size_] * block_size_ +
                                             used % block_size_));
  }
  s.length += n;
  s.position += n;
  return out;
}

AppendResult KVManager::append_batch(const int64_t* ids, int64_t n_streams, int64_t n) {
  int64_t needed = 0;
  std::vector<int64_t> seen(ids, ids + n_streams);
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) {
    throw std::invalid_argument("stream " + std::to_string(*std::adjacent_find(
                                    seen.begin(), seen.end())) + " is listed twice");
  }
  for (int64_t i = 0; i < n_streams; ++i) needed += blocks_needed(ids[i], n);
  if (needed > num_free_blocks()) {
    throw CacheFullError("KV cache full: " + std::to_string(n_streams) + " stream(s) need " +
                         std::to_string(needed) + " more block(s) to append " +
                         std::to_string(n) + " row(s) each, but only " +
                         std::to_string(num_free_blocks()) + " of " +
                         std::to_string(num_blocks_) + " blocks are free (block_size " +
                         std::to_string(block_size_) + ")");
  }
  AppendResult out;
  out.slots.reserve(n_streams * n);
  for (int64_t i = 0; i < n_streams; ++i) {
    AppendResult r = append(ids[i], n);
    out.slots.insert(out.slots.end(), r.slots.begin(), r.slots.end());
    out.copies.insert(out.copies.end(), r.copies.begin(), r.copies.end());
  }
  return out;
}

void KVManager::trim_front(int64_t id, int64_t keep_last) {
  if (keep_last < 0) {
    throw std::invalid_argument("keep_last must be >= 0, got " + std::to_string(keep_last));
  }
  Stream& s = get(id);
  if (s.length <= keep_last) return;
  const int64_t first = s.start + (s.length - keep_last);
  const int64_t drop_blocks = first / block_size_;
  for (int64_t i = 0; i < drop_blocks; ++i) release(s.blocks[i]);
  s.blocks.erase(s.blocks.begin(), s.blocks.begin() + drop_blocks);
  s.start = first % block_size_;
  s.length = keep_last;
}

void KVManager::truncate(int64_t id, int64_t n) {
  Stream& s = get(id);
  if (n < 0 || n > s.length) {
    throw std::invalid_argument("truncate: n must be in [0, " + std::to_string(s.length) +
                                "] (the stream's rows), got " + std::to_string(n));
  }
  const int64_t used = s.start + s.length - n;
  const int64_t keep = s.length - n == 0 && s.start == 0 ? 0 : (used + block_size_ - 1) / block_size_;
  for (size_t i = static_cast<size_t>(keep); i < s.blocks.size(); ++i) release(s.blocks[i]);
  s.blocks.resize(static_cast<size_t>(keep));
  s.length -= n;
  s.position -= n;
}

void KVManager::free(int64_t id) {
  Stream& s = get(id);
  for (int32_t b : s.blocks) release(b);
  streams_.erase(id);
}

int64_t KVManager::page_table(const int64_t* ids, int64_t n_streams, int32_t* indptr,
                              int32_t* indices, int64_t indices_capacity,
                              int32_t* last_page_len, int32_t* start) const {
  // Validate everything first so a failing call writes nothing.
  int64_t total = 0;
  for (int64_t i = 0; i < n_streams; ++i) total += stream(ids[i]).blocks.size();
  if (total > indices_capacity) {
    throw std::invalid_argument("page table needs " + std::to_string(total) +
                                " indices but the buffer holds " +
                                std::to_string(indices_capacity));
  }
  int32_t pos = 0;
  indptr[0] = 0;
  for (int64_t i = 0; i < n_streams; ++i) {
    const Stream& s = stream(ids[i]);
    const int64_t nb = static_cast<int64_t>(s.blocks.size());
    std::copy(s.blocks.begin(), s.blocks.end(), indices + pos);
    pos += static_cast<int32_t>(nb);
    indptr[i + 1] = pos;
    last_page_len[i] =
        nb == 0 ? 0 : static_cast<int32_t>(s.start + s.length - (nb - 1) * block_size_);
    if (start != nullptr) start[i] = static_cast<int32_t>(s.start);
  }
  return total;
}

}  // namespace calm_fast
