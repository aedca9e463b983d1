"""One dispatch point for every op that has a fast path.

Rule: Triton on CUDA tensors (kernels/), the C++/torch fast path on CPU, and the plain
torch reference when ``CALM_FAST_FORCE_REF=1`` (or when no fast path applies). The rest of
calm_fast calls these functions, never a kernel directly.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    from . import _C
except ImportError:  # the extension is optional at import time; the reference still runs
    _C = None


def force_reference() -> bool:
    return os.environ.get("CALM_FAST_FORCE_REF", "0") not in ("", "0", "false", "False")


# -- paged single-query decode attention ---------------------------------------------------
def paged_decode_attention_ref(q, k_cache, v_cache, indptr, indices, last_page_len,
                               start=None, scale=None):
    """Torch oracle: gather each stream's live rows from its pages, then SDPA.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; CSR page table as in
    ``PagedKVCache.page_table``. Returns [B, H, D]; a stream with no live rows gives zeros.
    """
    B, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        p0, p1 = int(indptr[b]), int(indptr[b + 1])
        if p1 == p0:
            continue
        pages = indices[p0:p1].long().to(k_cache.device)
        first = int(start[b]) if start is not None else 0
        stop = (p1 - p0 - 1) * bs + int(last_page_len[b])
        k = k_cache[pages].reshape(-1, hkv, D)[first:stop]  # [L, Hkv, D]
        v = v_cache[pages].reshape(-1, hkv, D)[first:stop]
        if k.shape[0] == 0:
            continue
        k = k.repeat_interleave(H // hkv, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.repeat_interleave(H // hkv, dim=1).transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b, :, None], k, v, scale=scale)[:, 0]
    return out


def paged_decode_attention(q, k_cache, v_cache, indptr, indices, last_page_len,
                           start=None, scale=None, out=None):
    """Single-query attention of a ragged batch over paged K/V (see the reference)."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    cpu_fast = (
        _C is not None and not force_reference() and q.device.type == "cpu"
        and q.dtype == torch.float32 and k_cache.dtype == torch.float32
        and v_cache.dtype == torch.float32
    )
    if not cpu_fast:
        res = paged_decode_attention_ref(q, k_cache, v_cache, indptr, indices,
                                         last_page_len, start, scale)
        if out is None:
            return res
        out.copy_(res)
        return out
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    _C.paged_decode_attention(
        q.numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
        indptr.numpy(), indices.numpy(), last_page_len.numpy(),
        None if start is None else start.numpy(), out.numpy(), scale,
    )
    return out
