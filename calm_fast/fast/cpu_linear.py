"""fp32 linears on CPU that use every thread at decode and prefill sizes.

torch's CPU ``x @ W`` with a handful of rows runs on ONE thread (sgemm with m = 1..8 is not
split), and on AVX2-class hosts its small-row sgemm is far from the machine's peak.
``SplitLinear`` holds the weight once, packed as panels
[ceil(out / 32), in, 32] (zero past ``out``), and calls the C++ kernel
(``calm_fast._C.linear``, csrc/gemm_cpu.cpp): each thread streams whole panels (at 1 row,
one sequential read per thread, as a plain sum does), through a 6-row x 32-column register
block (8 rows when 8 divides them). Timings: benchmarks/results/design_notes.md.

Without the extension it keeps the plain [in, out] weight and runs one batched matmul over
views of it: row blocks for 1-2 rows (the partial products summed), column blocks
otherwise (torch parallelises over the blocks).

Each output is the same dot product as ``x @ W`` up to fp32 rounding.

``bf16=True`` keeps the weight rounded to bf16 (panels of int16 bit patterns on the native
path): half the bytes, which is what a batch-1 step is bound by. The rows are rounded to
bf16 too (nearest even), and products and sums stay fp32, so each output is
``x.bfloat16().float() @ W.bfloat16().float()`` up to fp32 rounding, on every host and path:
the C++ kernel uses the CPU's AVX512-BF16 dot products where it has them
(``_C.has_bf16_dot``; half the multiply-add instructions of fp32 for a prefill block, and
no widening of weights in the batch-1 loop), fp32 multiply-adds on the same rounded numbers
elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_fast.fast import ops

PANEL = 32  # output columns per packed panel (csrc/gemm_cpu.h)


def _blocks(size: int, want: int) -> int:
    """At most ``want`` equal blocks of ``size``, each of at least 32: uneven or tiny blocks
    give fewer."""
    while want > 1 and (size % want or size // want < 32):
        want -= 1
    return want


def pack_panels(w_t: torch.Tensor) -> torch.Tensor:
    """[in, out] -> panels [ceil(out / 32), in, 32], zero past ``out``."""
    K, N = w_t.shape
    P = -(-N // PANEL)
    return F.pad(w_t, (0, P * PANEL - N)).view(K, P, PANEL).transpose(0, 1).contiguous()


class SplitLinear:
    """y = x @ W (+ b) for W given as an fp32 [in, out] tensor (the packed layout)."""

    ROW_BLOCK_MAX_ROWS = 2

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                 parts: int | None = None, bf16: bool = False):
        if w_t.dim() != 2 or not w_t.is_floating_point():
            raise ValueError(f"SplitLinear needs a float [in, out] weight, got {tuple(w_t.shape)}")
        K, N = w_t.shape
        self.in_features, self.out_features = K, N
        self.b = None if bias is None else bias.detach().contiguous()
        self.bf16 = bool(bf16)
        w_t = w_t.detach()
        self.native = ops.has_native("linear") and ops.native_ok(w_t, grad_mode=False)
        if self.bf16:  # the rounding every path shares
            w_t = w_t.to(torch.bfloat16).float()
        if self.native:
            self.panels = pack_panels(w_t)
            if self.bf16:  # exact: the low halves are zero after the rounding above
                self.panels = self.panels.to(torch.bfloat16).view(torch.int16)
            return
        want = parts or max(1, torch.get_num_threads())
        parts, kparts = _blocks(N, want), _blocks(K, want)
        self.parts, self.kparts = parts, kparts
        self.w = w_t.contiguous()
        n = N // parts
        self.cols = self.w.as_strided((parts, K, n), (n, N, 1))  # column blocks (views)
        self.rows = self.w.view(kparts, K // kparts, N)  # row blocks (views)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, K, N = x.shape[0], self.in_features, self.out_features
        if self.native and ops.native_ok(x, name="linear", grad_mode=False):  # rounds x itself
            y = torch.empty(B, N)
            ops.native().linear(x.contiguous().numpy(), self.panels.numpy(),
                    None if self.b is None else self.b.numpy(), y.numpy(),
                    torch.get_num_threads())
            return y
        if self.bf16:  # the rows' rounding the native kernel does
            x = x.bfloat16().to(x.dtype)
        if self.native:  # autograd, another dtype or the forced reference: plain matmul
            y = x @ self.weight().to(x.dtype)
            return y if self.b is None else y + self.b.to(x.dtype)
        if self.kparts > 1 and B <= self.ROW_BLOCK_MAX_ROWS:
            xs = x.reshape(B, self.kparts, K // self.kparts).transpose(0, 1)
            y = torch.bmm(xs, self.rows).sum(0)
        else:
            y = torch.bmm(x.expand(self.parts, B, K), self.cols)
            y = y.reshape(B, N) if (self.parts == 1 or B == 1) else \
                y.transpose(0, 1).reshape(B, N)
        return y if self.b is None else y.add_(self.b)

    def nbytes(self) -> int:
        """Bytes of the weight and bias (the packed panels' zero columns not counted)."""
        w = self.in_features * self.out_features
        b = 0 if self.b is None else self.b.numel() * 4
        if self.native:
            return w * self.panels.element_size() + b
        return w * self.w.element_size() + b  # bf16 without the extension: rounded fp32

    def weight(self) -> torch.Tensor:
        """The [in, out] weight (tests and repacking; a copy when packed)."""
        if self.native:
            K, N = self.in_features, self.out_features
            p = self.panels.view(torch.bfloat16).float() if self.bf16 else self.panels
            return p.transpose(0, 1).reshape(K, -1)[:, :N]
        return self.w


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w (+ b) for a plain [in, out] tensor or a packed callable (SplitLinear, Int8Linear:
    those carry their bias, so ``b`` must be None for them)."""
    if isinstance(w, torch.Tensor):
        return x @ w if b is None else torch.addmm(b, x, w)
    return w(x)


def cached_for(owner, name: str, tensors, make):
    """``make()``, kept on ``owner`` under ``name`` and remade when one of ``tensors`` (the
    weights it was made from; None entries allowed) is replaced or changed in place (an
    optimizer step bumps a tensor's version): packed inference copies of trainable
    weights."""
    key = tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, make())
        owner.__dict__[name] = cached
    return cached[1]
