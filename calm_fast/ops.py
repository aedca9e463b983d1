"""One dispatch point for every op that has a fast path.

Rule: Triton on CUDA tensors (kernels/), the C++/torch fast path on CPU, and the plain
torch reference when ``CALM_FAST_FORCE_REF=1`` (or when no fast path applies). The rest of
calm_fast calls these functions, never a kernel directly.
"""
from __future__ import annotations

import os

import torch

from .kernels import fused_head as _fh
from .kernels import paged_attention as _pa
from .kernels import short_context_step as _sc
from .kernels.paged_attention import paged_decode_attention_ref  # noqa: F401 (re-export)

try:
    from . import _C
except ImportError:  # the extension is optional at import time; the reference still runs
    _C = None


def force_reference() -> bool:
    return os.environ.get("CALM_FAST_FORCE_REF", "0") not in ("", "0", "false", "False")


# -- paged single-query decode attention ---------------------------------------------------
def _triton_ok(t: torch.Tensor) -> bool:
    return t.is_cuda and _pa.triton is not None and not force_reference()


def paged_decode_attention(q, k_cache, v_cache, indptr, indices, last_page_len,
                           start=None, scale=None, out=None):
    """Single-query attention of a ragged batch over paged K/V (see the reference)."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if _triton_ok(q):
        dev = q.device
        return _pa.paged_decode_attention_triton(
            q, k_cache, v_cache, indptr.to(dev), indices.to(dev), last_page_len.to(dev),
            None if start is None else start.to(dev), scale, out)
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


# -- the whole backbone decode step, fp32 CPU, 1-4 rows ---------------------------------------
NATIVE_STEP_MAX_ROWS = 4


def native_decode_step_ok(x: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``native_decode_step`` applies: the extension is built, the reference is not
    forced, and x / the cache are fp32 CPU tensors with 1-4 rows and no autograd."""
    return (_C is not None and hasattr(_C, "decode_step") and not force_reference()
            and x.device.type == "cpu" and x.dtype == torch.float32
            and k_cache.dtype == torch.float32 and 1 <= x.shape[0] <= NATIVE_STEP_MAX_ROWS
            and not x.requires_grad)


def native_decode_step(layers, heads, kv_heads, eps, x, cos, sin, k_cache, v_cache, slots,
                       table) -> torch.Tensor:
    """Every layer of one backbone decode step in one C++ call (csrc/decode_step_cpu.cpp):
    ``layers`` as numpy tuples (fast_backbone.native_layers), x [B, d] (copied, then
    updated), cos/sin [B, Dh/2], the full [layers, blocks, ...] K/V pools, int64 ``slots``
    [B] and ``table`` = cache.page_table(...). Returns the new x."""
    out = x.detach().clone(memory_format=torch.contiguous_format)
    indptr, indices, last, start = table
    _C.decode_step(layers, heads, kv_heads, eps, out.numpy(), cos.contiguous().numpy(),
                   sin.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                   slots.to(torch.int64).contiguous().numpy(), indptr.numpy(),
                   indices.numpy(), last.numpy(), None if start is None else start.numpy(),
                   torch.get_num_threads())
    return out


# -- short-context ring step attention ---------------------------------------------------------
def ring_attention(q, k, v, ring_k, ring_v, slots, pos, max_period=10_000.0):
    """RoPE + ring write + attention of one short-context step (kernels/short_context_step)."""
    if q.is_cuda and _sc.triton is not None and not force_reference():
        return _sc.ring_attention_triton(q, k, v, ring_k, ring_v, slots, pos, max_period)
    return _sc.ring_attention_ref(q, k, v, ring_k, ring_v, slots, pos, max_period)


# -- the AdaLN head ------------------------------------------------------------------------------
def head(p, c, x, times=()):
    """The packed head at scalar times: Triton on CUDA, the fused torch path on CPU (and
    for packed int8 / split weights), the op-for-op reference when forced."""
    if force_reference():
        ts = [torch.full((x.shape[0], 1), float(t), dtype=x.dtype, device=x.device)
              for t in times]
        return _fh.head_ref(p, c, x, ts)
    if x.is_cuda and _fh.triton is not None and isinstance(p.w_in, torch.Tensor):
        return _fh.head_triton(p, c, x, times)
    return _fh.head_cpu(p, c, x, times)
