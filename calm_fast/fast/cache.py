"""PagedKVCache: per-layer K/V storage in torch, block bookkeeping in C++.

The manager (``calm_fast._C.KVManager``, or its pure-Python twin) owns only integers: which
blocks each stream holds, refcounts for shared prefixes, and the CSR page table. This class
owns the tensors and applies what the manager decides: it writes new K/V rows into the slots
the manager returns and performs the copy-on-write block copies it asks for.

Backend choice (ops.kv_manager): ``CALM_FAST_KV_BACKEND=python`` or ``CALM_FAST_FORCE_REF=1``
gives the twin; otherwise the C++ manager is used when the extension imports.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from calm_fast.errors import ArgumentError, CacheFullError, UnknownStreamError
from calm_fast import checks
from calm_fast.fast import ops
from calm_fast.fast.kv_manager_py import PyKVManager

__all__ = ["PagedKVCache", "make_manager", "CacheFullError", "UnknownStreamError"]


def make_manager(num_blocks: int, block_size: int, backend: str | None = None):
    """A block manager: ``backend`` is "cpp", "python" or None (env var, then cpp)."""
    backend = backend or os.environ.get("CALM_FAST_KV_BACKEND") or "auto"
    return ops.kv_manager(num_blocks, block_size, backend)


class PagedKVCache:
    """K/V pages for ``num_layers`` layers shared by many streams.

    Storage: ``k`` and ``v`` of shape [num_layers, num_blocks, block_size, kv_heads, head_dim].
    The page-table buffers (``indptr``, ``indices``, ``last_page_len``, ``start``) are
    allocated once, so their addresses never change (a captured CUDA graph can reuse them).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, *, dtype=torch.float32, device="cpu", max_streams: int = 256,
                 max_pages: int | None = None, backend: str | None = None):
        for name, val in (("num_layers", num_layers), ("kv_heads", kv_heads),
                          ("head_dim", head_dim), ("max_streams", max_streams)):
            checks.integer(name, val, 1)
        checks.integer("max_pages", max_pages, 1, none=True)
        self.manager = make_manager(num_blocks, block_size, backend)
        self.num_layers, self.block_size = num_layers, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_streams = max_streams
        # Forked streams list shared blocks once each, so the table can exceed num_blocks.
        max_pages = max_pages or 4 * num_blocks
        self.indptr = torch.zeros(max_streams + 1, dtype=torch.int32)
        self.indices = torch.zeros(max_pages, dtype=torch.int32)
        self.last_page_len = torch.zeros(max_streams, dtype=torch.int32)
        self.start = torch.zeros(max_streams, dtype=torch.int32)

    # -- stream life cycle ---------------------------------------------------------------
    def new_stream(self) -> int:
        return self.manager.new_stream()

    def fork(self, stream: int) -> int:
        """A new stream sharing every block of ``stream`` (copy-on-write on append)."""
        return self.manager.fork(checks.integer("stream", stream, 0))

    def free(self, stream: int) -> None:
        self.manager.free(checks.integer("stream", stream, 0))

    def truncate(self, stream: int, n: int) -> None:
        """Forget the last ``n`` rows of ``stream`` (rolling back a failed step)."""
        self.manager.truncate(checks.integer("stream", stream, 0), checks.integer("n", n, 0))

    def trim_front(self, stream: int, keep_last: int) -> None:
        """Sliding window: keep only the last ``keep_last`` rows of ``stream``."""
        self.manager.trim_front(checks.integer("stream", stream, 0),
                                checks.integer("keep_last", keep_last, 0))

    def length(self, stream: int) -> int:
        return self.manager.length(checks.integer("stream", stream, 0))

    def position(self, stream: int) -> int:
        """Rows ever appended to ``stream`` (the RoPE position of its next row)."""
        return self.manager.position(checks.integer("stream", stream, 0))

    def blocks_needed(self, streams, n: int) -> int:
        return sum(self.manager.blocks_needed(s, n) for s in streams)

    def can_append(self, streams, n: int) -> bool:
        return self.blocks_needed(streams, n) <= self.manager.num_free_blocks

    # -- writes --------------------------------------------------------------------------
    def reserve(self, streams, n: int) -> torch.Tensor:
        """Allocate ``n`` rows at the end of each stream; returns flat slots [len(streams), n].

        All or nothing: if the cache cannot hold every stream's rows, CacheFullError is
        raised before any stream changes.
        """
        n = checks.integer("n", n, 0)
        ids = np.asarray(list(streams), dtype=np.int64)
        slots, copies = self.manager.append_batch(ids, n)  # raises before changing anything
        for src, dst, rows in copies.tolist():
            self.k[:, dst, :rows] = self.k[:, src, :rows]
            self.v[:, dst, :rows] = self.v[:, src, :rows]
        out = slots.astype(np.int64)
        return torch.from_numpy(out).to(self.k.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write rows k, v [..., kv_heads, head_dim] at ``slots`` (same leading shape)."""
        flat = slots.reshape(-1)
        rows = (-1, self.kv_heads, self.head_dim)
        self.k[layer].view(rows).index_copy_(0, flat, k.reshape(rows).to(self.k.dtype))
        self.v[layer].view(rows).index_copy_(0, flat, v.reshape(rows).to(self.v.dtype))

    # -- reads ---------------------------------------------------------------------------
    def page_table(self, streams):
        """CSR page table of ``streams`` written into the fixed buffers; returns views."""
        ids = np.asarray(list(streams), dtype=np.int64)
        n = len(ids)
        if n > self.max_streams:
            raise ArgumentError(f"{n} streams exceed max_streams={self.max_streams}")
        self.manager.page_table(ids, self.indptr.numpy(), self.indices.numpy(),
                                self.last_page_len.numpy(), self.start.numpy())
        return self.indptr[:n + 1], self.indices, self.last_page_len[:n], self.start[:n]

    def attend(self, layer: int, q: torch.Tensor, streams, scale=None,
               table=None) -> torch.Tensor:
        """Decode attention of one query per stream, q [B, H, D], over the cached rows.
        ``table``: ``page_table(streams)`` already built for this step (layers share it)."""
        indptr, indices, last, start = self.page_table(streams) if table is None else table
        return ops.paged_decode_attention(q, self.k[layer], self.v[layer], indptr, indices,
                                          last, start, scale)

    def gather(self, layer: int, stream: int):
        """Contiguous (K, V) [length, kv_heads, head_dim] of one stream (for references)."""
        blocks = torch.tensor(self.manager.blocks(stream), dtype=torch.long)
        first = self.manager.start(stream)
        stop = first + self.manager.length(stream)
        rows = (-1, self.kv_heads, self.head_dim)
        k = self.k[layer, blocks.to(self.k.device)].reshape(rows)[first:stop]
        v = self.v[layer, blocks.to(self.v.device)].reshape(rows)[first:stop]
        return k, v

    def stats(self) -> dict:
        m = self.manager
        row_bytes = 2 * self.num_layers * self.kv_heads * self.head_dim * self.k.element_size()
        return {
            "num_blocks": m.num_blocks,
            "free_blocks": m.num_free_blocks,
            "used_blocks": m.num_blocks - m.num_free_blocks,
            "streams": m.num_streams,
            "block_size": m.block_size,
            "bytes_per_block": row_bytes * m.block_size,
            "backend": "python" if isinstance(m, PyKVManager) else "cpp",
        }
