"""Single-query decode attention over a paged K/V cache (CSR page table), in Triton.

One program per (stream, query head) walks the stream's pages in order with an online
softmax, so a ragged batch needs no padding and reads each live K/V row exactly once per
head. The page table comes from the C++ manager (``PagedKVCache.page_table``) in fixed
buffers, so a CUDA graph can replay the launch while the table contents change.

``paged_decode_attention_ref`` is the torch oracle and the fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra; the reference always works
    triton = None


def paged_decode_attention_ref(q, k_cache, v_cache, indptr, indices, last_page_len,
                               start=None, scale=None):
    """Gather each stream's live rows from its pages, then SDPA.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; the page table as in
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


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, indptr_ptr, indices_ptr,
                                last_ptr, start_ptr, scale, H: tl.constexpr,
                                GROUP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                                BS: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_R: tl.constexpr, HAS_START: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        offs_d = tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, BLOCK_R)
        dmask = offs_d < D
        q = tl.load(q_ptr + (b * H + h) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        p0 = tl.load(indptr_ptr + b)
        p1 = tl.load(indptr_ptr + b + 1)
        last = tl.load(last_ptr + b)
        first = 0
        if HAS_START:
            first = tl.load(start_ptr + b)
        m = tl.full((), -1.0e30, tl.float32)
        denom = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for p in range(p0, p1):
            blk = tl.load(indices_ptr + p).to(tl.int64)
            lo = tl.where(p == p0, first, 0)
            hi = tl.where(p == p1 - 1, last, BS)
            rmask = (offs_r >= lo) & (offs_r < hi)
            rows = (blk * BS + offs_r) * (HKV * D) + kvh * D
            ptrs = rows[:, None] + offs_d[None, :]
            kv_mask = rmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + ptrs, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(rmask, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            w = tl.exp(s - m_new)
            v = tl.load(v_ptr + ptrs, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
            denom = denom * alpha + tl.sum(w, axis=0)
            m = m_new
        out = tl.where(denom > 0, acc / tl.maximum(denom, 1e-30), 0.0)
        tl.store(out_ptr + (b * H + h) * D + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=dmask)


def paged_decode_attention_triton(q, k_cache, v_cache, indptr, indices, last_page_len,
                                  start=None, scale=None, out=None):
    """Launch the kernel: grid (batch, heads). All tensors on one device, contiguous."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'calm_fast[triton]'")
    B, H, D = q.shape
    nb, bs, hkv, dk = k_cache.shape
    if dk != D or v_cache.shape != k_cache.shape or H % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit k/v caches {tuple(k_cache.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q) if out is None else out
    _paged_attention_kernel[(B, H)](
        q.contiguous(), k_cache, v_cache, out, indptr, indices, last_page_len,
        start if start is not None else last_page_len, scale,
        H=H, GROUP=H // hkv, HKV=hkv, D=D, BS=bs,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_R=triton.next_power_of_2(bs),
        HAS_START=start is not None,
    )
    return out
