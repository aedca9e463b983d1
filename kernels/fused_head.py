"""The AdaLN residual-MLP head (MAR / Pocket TTS ``SimpleMLPAdaLN``) as Triton kernels.

``head_triton`` runs the head over the packed weight layout of ``calm_fast.fast.head``
(``PackedHead``) in 3 + 2 x n_blocks launches: one for every adaLN modulation at once, and
per residual block one LayerNorm + modulation + linear + SiLU and one linear whose epilogue
adds the gated residual in place. The torch oracle is ``calm_fast.fast.head.head_ref``
(op for op the published module); ``head_cpu`` there is the CPU path. Timings:
benchmarks/results/fused_head.csv (``python benchmarks/bench_fused_head.py``).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch paths always work
    triton = None


# -- Triton -----------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _mma(acc, a, w, IEEE: tl.constexpr):
        """acc += a @ w: exact fp32 (ieee) for fp32 weights, else in the weights' dtype."""
        if IEEE:
            acc += tl.dot(a, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
        return acc

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, gate_ptr, out_ptr, M, N, K,
                       stride_x, stride_g, stride_o,
                       PRE_SILU: tl.constexpr, POST_SILU: tl.constexpr,
                       GATED_RES: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out = act(act_in(x) @ w + b), or res + gate * (x @ w + b). w is [K, N]."""
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
            if PRE_SILU:
                a = a * tl.sigmoid(a)
            w = tl.load(w_ptr + rk[:, None] * N + rn[None, :],
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = _mma(acc, a, w, IEEE)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if POST_SILU:
            acc = acc * tl.sigmoid(acc)
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        if GATED_RES:
            r = tl.load(res_ptr + rm[:, None] * stride_o + rn[None, :], mask=omask, other=0.0)
            g = tl.load(gate_ptr + rm[:, None] * stride_g + rn[None, :], mask=omask, other=0.0)
            acc = r.to(tl.float32) + g.to(tl.float32) * acc
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _ln_mod_linear_kernel(h_ptr, lnw_ptr, lnb_ptr, mod_ptr, w_ptr, b_ptr, out_ptr, M, N,
                              stride_mod, eps, W: tl.constexpr, AFFINE: tl.constexpr,
                              POST_SILU: tl.constexpr, IEEE: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out = act((LN(h) * (1 + scale) + shift) @ w + b); shift = mod[:, :W],
        scale = mod[:, W:2W]. LN statistics come from one pass over the row (W <= BK * k)."""
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        s1 = tl.zeros((BM,), tl.float32)
        s2 = tl.zeros((BM,), tl.float32)
        for k0 in range(0, W, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(h_ptr + rm[:, None] * W + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < W), other=0.0).to(tl.float32)
            s1 += tl.sum(a, axis=1)
            s2 += tl.sum(a * a, axis=1)
        mean = s1 / W
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / W - mean * mean, 0.0) + eps)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, W, BK):
            rk = k0 + tl.arange(0, BK)
            amask = (rm[:, None] < M) & (rk[None, :] < W)
            a = tl.load(h_ptr + rm[:, None] * W + rk[None, :], mask=amask, other=0.0)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if AFFINE:
                a = a * tl.load(lnw_ptr + rk, mask=rk < W, other=0.0)[None, :] \
                    + tl.load(lnb_ptr + rk, mask=rk < W, other=0.0)[None, :]
            shift = tl.load(mod_ptr + rm[:, None] * stride_mod + rk[None, :], mask=amask,
                            other=0.0).to(tl.float32)
            scale = tl.load(mod_ptr + rm[:, None] * stride_mod + W + rk[None, :], mask=amask,
                            other=0.0).to(tl.float32)
            a = a * (1.0 + scale) + shift
            w = tl.load(w_ptr + rk[:, None] * N + rn[None, :],
                        mask=(rk[:, None] < W) & (rn[None, :] < N), other=0.0)
            acc = _mma(acc, a, w, IEEE)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if POST_SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(M: int, N: int):
    BM = 16  # tl.dot needs >= 16 rows; small batches are masked
    BN = 32 if N >= 32 else 16
    return BM, BN, 32


def head_triton(p: PackedHead, c: torch.Tensor, x: torch.Tensor, times: tuple = ()) -> torch.Tensor:
    """Triton path: 3 + 2 * n_blocks launches (cond+time in torch on a cached embedding)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'calm_fast[triton]'")
    p.check(c, x)
    B, W = x.shape[0], p.width
    ieee = p.w_in.dtype == torch.float32
    y = torch.addmm(p.b_cond, c.to(p.w_cond.dtype), p.w_cond)
    if p.n_time:
        y = y + p.time_embedding_at(tuple(times))
    y = y.contiguous()
    n_mod = p.w_ada.shape[1]
    mods = torch.empty(B, n_mod, device=x.device, dtype=p.w_in.dtype)
    h = torch.empty(B, W, device=x.device, dtype=p.w_in.dtype)
    u = torch.empty_like(h)

    def linear(inp, w, b, out, pre=False, post=False, res=None, gate=None, stride_g=0):
        K, N = w.shape
        BM, BN, BK = _blocks(B, N)
        grid = (triton.cdiv(B, BM), triton.cdiv(N, BN))
        _linear_kernel[grid](inp, w, b, res if res is not None else out,
                             gate if gate is not None else out, out, B, N, K,
                             inp.stride(0), stride_g, out.stride(0),
                             PRE_SILU=pre, POST_SILU=post, GATED_RES=res is not None,
                             IEEE=ieee, BM=BM, BN=BN, BK=BK)

    def ln_linear(hin, i, mod, w, b, out, post):
        N = w.shape[1]
        BM, BN, BK = _blocks(B, N)
        grid = (triton.cdiv(B, BM), triton.cdiv(N, BN))
        affine = i is not None
        _ln_mod_linear_kernel[grid](hin, p.ln_w[i] if affine else b, p.ln_b[i] if affine else b,
                                    mod, w, b, out, B, N, mods.stride(0), p.ln_eps, W=W,
                                    AFFINE=affine, POST_SILU=post, IEEE=ieee,
                                    BM=BM, BN=BN, BK=BK)

    linear(y, p.w_ada, p.b_ada, mods, pre=True)
    linear(x.to(p.w_in.dtype).contiguous(), p.w_in, p.b_in, h)
    for i in range(p.n_blocks):
        m = mods[:, 3 * W * i:]
        ln_linear(h, i, m, p.w1[i], p.b1[i], u, post=True)
        # h <- h + gate * (u @ w2 + b2), in place: each program reads only its own tile of h
        linear(u, p.w2[i], p.b2[i], h, res=h, gate=m[:, 2 * W:], stride_g=mods.stride(0))
    out = torch.empty(B, p.out_dim, device=x.device, dtype=p.w_in.dtype)
    ln_linear(h, None, mods[:, 3 * W * p.n_blocks:], p.w_out, p.b_out, out, post=False)
    return out
