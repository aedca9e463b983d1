"""Pure-Python twin of the C++ ``calm_fast._C.KVManager``.

Same behaviour, same block order, same errors; used when the extension is missing or when
``CALM_FAST_KV_BACKEND=python`` asks for it, and as the second oracle in the property tests.
See ``csrc/kv_manager.cpp`` for the reasoning behind each rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calm_fast.errors import ArgumentError, CacheFullError, UnknownStreamError

_INT32_MAX = 2**31 - 1


@dataclass
class _Stream:
    blocks: list[int] = field(default_factory=list)
    start: int = 0  # first live row inside blocks[0]
    length: int = 0  # live rows
    position: int = 0  # rows ever appended


class PyKVManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or num_blocks > _INT32_MAX // max(block_size, 1):
            raise ArgumentError(f"num_blocks must be in [1, 2^31 / block_size), got {num_blocks}")
        if block_size <= 0:
            raise ArgumentError(f"block_size must be positive, got {block_size}")
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        self._free = list(range(num_blocks - 1, -1, -1))  # top of the stack is block 0
        self._ref = [0] * num_blocks
        self._streams: dict[int, _Stream] = {}
        self._next_id = 0

    # -- helpers -------------------------------------------------------------------------
    def _get(self, sid: int) -> _Stream:
        try:
            return self._streams[sid]
        except KeyError:
            raise UnknownStreamError(f"unknown stream {sid}") from None

    def _take(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free.append(b)

    # -- operations ----------------------------------------------------------------------
    def new_stream(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._streams[sid] = _Stream()
        return sid

    def fork(self, stream: int) -> int:
        src = self._get(stream)
        for b in src.blocks:
            self._ref[b] += 1
        sid = self._next_id
        self._next_id += 1
        self._streams[sid] = _Stream(list(src.blocks), src.start, src.length, src.position)
        return sid

    def blocks_needed(self, stream: int, n: int) -> int:
        if n < 0:
            raise ArgumentError(f"cannot append a negative number of rows: {n}")
        s = self._get(stream)
        if n == 0:
            return 0
        bs = self._block_size
        room = len(s.blocks) * bs - (s.start + s.length)
        fresh = -(-(n - room) // bs) if n > room else 0
        cow = room > 0 and self._ref[s.blocks[-1]] > 1
        return fresh + int(cow)

    def append(self, stream: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        needed = self.blocks_needed(stream, n)
        if needed > len(self._free):
            raise CacheFullError(
                f"KV cache full: stream {stream} needs {needed} more block(s) to append {n} "
                f"row(s), but only {len(self._free)} of {self._num_blocks} blocks are free "
                f"(block_size {self._block_size})"
            )
        s = self._get(stream)
        copies: list[tuple[int, int, int]] = []
        if n == 0:
            return np.zeros(0, np.int32), np.zeros((0, 3), np.int32)
        bs = self._block_size
        used = s.start + s.length
        if len(s.blocks) * bs > used and self._ref[s.blocks[-1]] > 1:
            src = s.blocks[-1]
            dst = self._take()
            copies.append((src, dst, used - (len(s.blocks) - 1) * bs))
            self._release(src)
            s.blocks[-1] = dst
        slots = np.empty(n, np.int32)
        for i in range(n):
            if used == len(s.blocks) * bs:
                s.blocks.append(self._take())
            slots[i] = s.blocks[used // bs] * bs + used % bs
            used += 1
        s.length += n
        s.position += n
        return slots, np.asarray(copies, np.int32).reshape(-1, 3)

    def append_batch(self, streams, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(streams)
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise ArgumentError(f"streams has dtype {ids.dtype}, expected int64 (1-D)")
        ids = ids.tolist()
        dup = sorted(i for i in set(ids) if ids.count(i) > 1)
        if dup:
            raise ArgumentError(f"stream {dup[0]} is listed twice")
        needed = sum(self.blocks_needed(s, n) for s in ids)
        if needed > len(self._free):
            raise CacheFullError(
                f"KV cache full: {len(ids)} stream(s) need {needed} more block(s) to append "
                f"{n} row(s) each, but only {len(self._free)} of {self._num_blocks} blocks are "
                f"free (block_size {self._block_size})")
        slots = np.empty((len(ids), n), np.int32)
        copies = []
        for i, s in enumerate(ids):
            slots[i], c = self.append(s, n)
            copies.append(c)
        return slots, np.concatenate(copies or [np.zeros((0, 3), np.int32)]).reshape(-1, 3)

    def trim_front(self, stream: int, keep_last: int) -> None:
        if keep_last < 0:
            raise ArgumentError(f"keep_last must be >= 0, got {keep_last}")
        s = self._get(stream)
        if s.length <= keep_last:
            return
        first = s.start + (s.length - keep_last)
        drop = first // self._block_size
        for b in s.blocks[:drop]:
            self._release(b)
        del s.blocks[:drop]
        s.start = first % self._block_size
        s.length = keep_last

    def truncate(self, stream: int, n: int) -> None:
        """Drop the last ``n`` rows (a failed step's rows); blocks past the new end are
        released (a shared one only loses this stream's reference)."""
        s = self._get(stream)
        if n < 0 or n > s.length:
            raise ArgumentError(f"truncate: n must be in [0, {s.length}] (the stream's rows), got {n}")
        used = s.start + s.length - n
        keep = 0 if (s.length - n == 0 and s.start == 0) else -(-used // self._block_size)
        for b in s.blocks[keep:]:
            self._release(b)
        del s.blocks[keep:]
        s.length -= n
        s.position -= n

    def free(self, stream: int) -> None:
        s = self._get(stream)
        for b in s.blocks:
            self._release(b)
        del self._streams[stream]

    def page_table(self, streams, indptr, indices, last_page_len, start=None) -> int:
        for name, buf in (("indptr", indptr), ("indices", indices),
                          ("last_page_len", last_page_len), ("start", start)):
            if buf is not None and (buf.dtype != np.int32 or buf.ndim != 1):
                raise ArgumentError(f"{name} has dtype {buf.dtype}, expected int32 (1-D)")
        ids = np.asarray(streams)
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise ArgumentError(f"streams has dtype {ids.dtype}, expected int64 (1-D)")
        n = len(ids)
        if start is not None and len(start) < n:
            raise ArgumentError("start buffer too small")
        if len(indptr) < n + 1:
            raise ArgumentError(f"indptr holds {len(indptr)} entries, needs {n + 1}")
        if len(last_page_len) < n:
            raise ArgumentError(f"last_page_len holds {len(last_page_len)} entries, needs {n}")
        ss = [self._get(int(i)) for i in ids]
        total = sum(len(s.blocks) for s in ss)
        if total > len(indices):
            raise ArgumentError(
                f"page table needs {total} indices but the buffer holds {len(indices)}"
            )
        pos = 0
        indptr[0] = 0
        for i, s in enumerate(ss):
            nb = len(s.blocks)
            indices[pos:pos + nb] = s.blocks
            pos += nb
            indptr[i + 1] = pos
            last_page_len[i] = 0 if nb == 0 else s.start + s.length - (nb - 1) * self._block_size
            if start is not None:
                start[i] = s.start
        return total

    # -- inspection ----------------------------------------------------------------------
    def blocks(self, stream: int) -> list[int]:
        return list(self._get(stream).blocks)

    def length(self, stream: int) -> int:
        return self._get(stream).length

    def start(self, stream: int) -> int:
        return self._get(stream).start

    def position(self, stream: int) -> int:
        return self._get(stream).position

    def has_stream(self, stream: int) -> bool:
        return stream in self._streams

    def streams(self) -> list[int]:
        return sorted(self._streams)

    def refcount(self, block: int) -> int:
        if not 0 <= block < self._num_blocks:
            raise ArgumentError(f"block {block} out of range [0, {self._num_blocks})")
        return self._ref[block]

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_streams(self) -> int:
        return len(self._streams)
