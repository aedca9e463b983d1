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

``ring_attention_ref`` is the torch oracle and the CPU path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch path always works
    triton = None


def _rope(x, pos, max_period):
    """The backbone's RoPE (fast_backbone.rope_tables / apply_rope) at per-row positions,
    in fp32: x [B, heads, D], pos [B]."""
    from calm_fast import fast_backbone as fb  # lazy: fast_backbone -> cache -> ops -> here

    shape = fb.PackedBackbone([], 0, 1, 1, x.shape[-1], max_period)
    cos, sin = fb.rope_tables(shape, pos)
    return fb.apply_rope(x.float(), cos, sin).to(x.dtype)


def _check(q, k, v, ring_k, ring_v, slots, pos):
    B, H, D = q.shape
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k.shape[1]} kv heads")
    if ring_k.shape != ring_v.shape or ring_k.dim() != 4 or ring_k.shape[2:] != k.shape[1:]:
        raise ValueError(f"ring {tuple(ring_k.shape)} does not fit k {tuple(k.shape)}")
    if slots.shape != (B,) or pos.shape != (B,):
        raise ValueError(f"slots {tuple(slots.shape)} and pos {tuple(pos.shape)} must be [{B}]")
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")


def ring_attention_ref(q, k, v, ring_k, ring_v, slots, pos, max_period=10_000.0):
    """q [B, H, D], k, v [B, Hkv, D] of the new rows (RoPE NOT applied); ring_k, ring_v
    [slots, K, Hkv, D] one layer's rings (views are fine: written in place); slots, pos [B]
    long: each row's ring and its position. Returns attention [B, H, D]."""
    _check(q, k, v, ring_k, ring_v, slots, pos)
    K = ring_k.shape[1]
    q, k = _rope(q, pos, max_period), _rope(k, pos, max_period)
    ring = pos % K
    ring_k[slots, ring] = k.to(ring_k.dtype)
    ring_v[slots, ring] = v.to(ring_v.dtype)
    valid = torch.arange(K, device=q.device)[None] <= pos[:, None]  # [B, K]
    rep = q.shape[1] // k.shape[1]
    Kr = ring_k[slots].repeat_interleave(rep, 2).transpose(1, 2)  # [B, H, K, D]
    Vr = ring_v[slots].repeat_interleave(rep, 2).transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], Kr.to(q.dtype), Vr.to(q.dtype),
                                          attn_mask=valid[:, None, None])[:, :, 0]


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
