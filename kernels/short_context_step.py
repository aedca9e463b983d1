"""The attention of one short-context generation step over its ring buffer, fused.

Per layer, a short-context step (calm_fast/short_context.py) is: projections (matmuls),
RoPE on the new q and k, writing k, v into the ring slot ``pos % K``, attention of the new
query over the valid ring entries (the first lap is partly empty), the out projection and
the MLP (matmuls). Everything between the two projection matmuls is small and
latency-bound: eager torch spends ~12 launches on it per layer (RoPE tables, two
rotations, two index_put writes, the validity mask, repeat_interleave for GQA, SDPA).
``ring_attention_triton`` does it in ONE launch, one program per (stream, head):
rotate q and k in registers, store the new k, v in the ring, attend over the K entries
(the new one from registers, so the programs of a GQA group never read a row that another
program is writing), write the output. The matmuls stay cuBLAS / the CPU fast path.

The torch oracle and CPU path is ``calm_fast.model.short_context.ring_attention``
(re-exported here as ``ring_attention_ref``), the model's own streaming step.
"""
from __future__ import annotations

import math

import torch

from calm_fast.model.short_context import check_ring as _check
from calm_fast.model.short_context import ring_attention as ring_attention_ref  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch path always works
    triton = None


if triton is not None:

    @triton.jit
    def _ring_attention_kernel(q_ptr, k_ptr, v_ptr, rk_ptr, rv_ptr, slots_ptr, pos_ptr,
                               out_ptr, stride_slot, log_period, scale,
                               H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                               K: tl.constexpr, HALF_P: tl.constexpr, KP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // (H // HKV)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        i = tl.arange(0, HALF_P)
        imask = i < D // 2
        # RoPE on the new q and k (pairs (2i, 2i + 1)), fp32
        ang = pos.to(tl.float32) * tl.exp(i.to(tl.float32) * (-2.0 * log_period / D))
        c = tl.cos(ang)
        s = tl.sin(ang)
        qb = q_ptr + (b * H + h) * D
        q_e = tl.load(qb + 2 * i, mask=imask, other=0.0).to(tl.float32)
        q_o = tl.load(qb + 2 * i + 1, mask=imask, other=0.0).to(tl.float32)
        qr = q_e * c - q_o * s
        qi = q_e * s + q_o * c
        kb = k_ptr + (b * HKV + kvh) * D
        k_e = tl.load(kb + 2 * i, mask=imask, other=0.0).to(tl.float32)
        k_o = tl.load(kb + 2 * i + 1, mask=imask, other=0.0).to(tl.float32)
        kr = k_e * c - k_o * s
        ki = k_e * s + k_o * c
        v_e = tl.load(v_ptr + (b * HKV + kvh) * D + 2 * i, mask=imask, other=0.0).to(tl.float32)
        v_o = tl.load(v_ptr + (b * HKV + kvh) * D + 2 * i + 1, mask=imask,
                      other=0.0).to(tl.float32)
        cur = pos % K
        ring = rk_ptr + slot * stride_slot  # this stream's ring, entry j at j * HKV * D
        ringv = rv_ptr + slot * stride_slot
        if h % (H // HKV) == 0:  # one writer per kv head
            row = cur * (HKV * D) + kvh * D
            tl.store(ring + row + 2 * i, kr.to(rk_ptr.dtype.element_ty), mask=imask)
            tl.store(ring + row + 2 * i + 1, ki.to(rk_ptr.dtype.element_ty), mask=imask)
            tl.store(ringv + row + 2 * i, v_e.to(rv_ptr.dtype.element_ty), mask=imask)
            tl.store(ringv + row + 2 * i + 1, v_o.to(rv_ptr.dtype.element_ty), mask=imask)
        # the other entries, from memory: valid once written (first lap) and not this row
        j = tl.arange(0, KP)
        jmask = (j < K) & (j <= pos) & (j != cur)
        rows = j[:, None] * (HKV * D) + kvh * D + 2 * i[None, :]
        m2 = jmask[:, None] & imask[None, :]
        r_e = tl.load(ring + rows, mask=m2, other=0.0).to(tl.float32)
        r_o = tl.load(ring + rows + 1, mask=m2, other=0.0).to(tl.float32)
        sc = tl.sum(r_e * qr[None, :] + r_o * qi[None, :], axis=1) * scale
        sc = tl.where(jmask, sc, float("-inf"))
        s_new = tl.sum(qr * kr + qi * ki, axis=0) * scale
        m = tl.maximum(tl.max(sc, axis=0), s_new)
        w = tl.exp(sc - m)
        w_new = tl.exp(s_new - m)
        den = tl.sum(w, axis=0) + w_new
        rv_e = tl.load(ringv + rows, mask=m2, other=0.0).to(tl.float32)
        rv_o = tl.load(ringv + rows + 1, mask=m2, other=0.0).to(tl.float32)
        o_e = (tl.sum(w[:, None] * rv_e, axis=0) + w_new * v_e) / den
        o_o = (tl.sum(w[:, None] * rv_o, axis=0) + w_new * v_o) / den
        ob = out_ptr + (b * H + h) * D
        tl.store(ob + 2 * i, o_e.to(out_ptr.dtype.element_ty), mask=imask)
        tl.store(ob + 2 * i + 1, o_o.to(out_ptr.dtype.element_ty), mask=imask)


def ring_attention_triton(q, k, v, ring_k, ring_v, slots, pos, max_period=10_000.0):
    """Same contract as ``ring_attention_ref``; one launch, grid (B, H). The ring views
    must have contiguous [K, Hkv, D] entries per slot (any slot stride)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'calm_fast[triton]'")
    _check(q, k, v, ring_k, ring_v, slots, pos)
    B, H, D = q.shape
    K, HKV = ring_k.shape[1], ring_k.shape[2]
    if ring_k.stride()[1:] != (HKV * D, D, 1) or ring_v.stride() != ring_k.stride():
        raise ValueError("ring views need contiguous [K, Hkv, D] entries and equal strides")
    out = torch.empty_like(q)
    _ring_attention_kernel[(B, H)](
        q.contiguous(), k.contiguous(), v.contiguous(), ring_k, ring_v, slots, pos, out,
        ring_k.stride(0), math.log(max_period), D ** -0.5,
        H=H, HKV=HKV, D=D, K=K, HALF_P=triton.next_power_of_2(D // 2),
        KP=triton.next_power_of_2(K))
    return out
