"""Int8 weights for the CPU fast paths: 8-bit rows times 8-bit weights, exact integer sums.

Weights are quantized once, per output column (symmetric: W = scale[n] * q, |q| <= 127);
each call quantizes its rows the same way, per row (scale max|x| / 127, round half to even).
The sums of products are exact integers, and one multiply per output turns them back:

    y[m, n] = float(sum_k xq[m, k] q[k, n]) * (sx[m] * scale[n]) + b[n]

At decode batch sizes the matmuls are bound by reading the weights, so a quarter of fp32's
bytes is most of the gain. The native kernel (``calm_fast._C.linear_i8``, csrc/gemm_cpu.cpp)
holds the weight as panels of 4-row quads (``pack_panels_i8``) and uses the CPU's
AVX512-VNNI dot products where it has them (``_C.has_int8_dot``), plain integer loops
elsewhere; ``reference`` below is the same arithmetic in torch (float64 sums of integers,
exact), so every path gives the same bits on any host and thread count. The error against
fp32 is that of 8-bit rows and weights, ~1% per projection on Gaussian rows
(python_tests/fast/test_int8.py bounds it). Timings: benchmarks/results/.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_fast.fast import ops

PANEL = 32  # output columns per panel (csrc/gemm_cpu.h)
# The kernel's int32 sums reach 255 * 127 * K (the rows go in shifted to unsigned): exact
# below 2^31 for K up to 66311.
MAX_IN = 65536


def quantize_weight(w_t: torch.Tensor):
    """[in, out] float -> (q int8 [in, out], scales fp32 [out]): per column, symmetric."""
    w = w_t.detach().float()
    scales = (w.abs().amax(0) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_rows(x: torch.Tensor):
    """x [M, K] fp32 -> (xq [M, K] as float integers, sx [M, 1]): what the kernel does. A row
    holding NaN or inf gets scale NaN, so its outputs are NaN (as the fp32 path's are)."""
    amax = x.abs().amax(1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    sx = torch.where(torch.isfinite(x).all(1, keepdim=True), sx, torch.full_like(sx, float("nan")))
    return torch.round(x * (1.0 / sx)).clamp_(-127, 127), sx


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 linear in torch, bit for bit the native kernel's result."""
    xq, sx = quantize_rows(x.float())
    acc = (xq.double() @ q.double()).float()  # exact: |sums| < 2^53, then one rounding
    y = acc * (sx * scales[None])
    return y if bias is None else y + bias


def pack_panels_i8(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] int8 -> panels [ceil(N / 32), 4 ceil(K / 4), 32] int8 whose memory is
    [panel, quad j, column c, byte b] = q[4j + b, 32 panel + c], zero past K and N."""
    K, N = q.shape
    K4, P = -(-K // 4), -(-N // PANEL)
    qp = F.pad(q, (0, P * PANEL - N, 0, 4 * K4 - K))
    return qp.view(K4, 4, P, PANEL).permute(2, 0, 3, 1).contiguous().view(P, 4 * K4, PANEL)


class Int8Linear:
    """y = x @ W (+ b) with W given as [in, out] fp32 (the packed layout), stored in int8."""

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None = None):
        if w_t.dim() != 2 or not w_t.is_floating_point():
            raise ValueError(f"Int8Linear needs a float [in, out] weight, got {tuple(w_t.shape)}")
        self.in_features, self.out_features = w_t.shape
        if self.in_features > MAX_IN:
            raise ValueError(f"Int8Linear sums at most {MAX_IN} products in int32, got "
                             f"{self.in_features} inputs")
        q, self.scales = quantize_weight(w_t)
        self.colsum = q.sum(0, dtype=torch.int32)
        self.b = None if bias is None else bias.detach().float().contiguous()
        self.native = ops.has_native("linear_i8")
        if self.native:
            self.panels = pack_panels_i8(q)
            # made once: every call hands them to the kernel (a .numpy() call is not free)
            self._arrays = (self.panels.numpy(), self.scales.numpy(), self.colsum.numpy())
        else:
            self.q = q

    def native_panels(self):
        """(panels, scales, colsum) as numpy arrays: what ``_C.linear_i8`` and the decode
        step read."""
        return self._arrays

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Int8Linear takes [rows, {self.in_features}], got {tuple(x.shape)}")
        if self.native and ops.native_ok(x, name="linear_i8", grad_mode=False):
            y = torch.empty(x.shape[0], self.out_features)
            ops.native().linear_i8(x.contiguous().numpy(), self.native_panels(), y.numpy(),
                                   torch.get_num_threads())
            return y if self.b is None else y.add_(self.b)  # as the reference adds it
        return reference(x.float(), self.weight_q(), self.scales, self.b).to(x.dtype)

    def weight_q(self) -> torch.Tensor:
        """The int8 [in, out] weight (a copy when packed)."""
        if not self.native:
            return self.q
        K, N = self.in_features, self.out_features
        P = self.panels.shape[0]
        q = self.panels.view(P, -1, PANEL, 4).permute(1, 3, 0, 2).reshape(-1, P * PANEL)
        return q[:K, :N]

    def nbytes(self) -> int:
        w = self.in_features * self.out_features + 8 * self.out_features
        return w + (0 if self.b is None else 4 * self.b.numel())
