"""Decode-size fp32 linears on CPU that use every thread.

At decode batch sizes a linear is a matrix-vector product: read bound. torch's CPU
``x @ W`` with a handful of rows runs on ONE thread (sgemm with m = 1..8 is not split),
so a second core adds nothing. Measured on the 2-core dev box, 2 threads, the 24
projections of the ``pocket`` backbone (302 MB of fp32 weights):

    rows   x @ W (one sgemm)   bmm over 2 column halves
      1        13.5 ms              9.6 ms   (22 -> 31 GB/s)
      8        35.3 ms             23.2 ms
     64        90.2 ms             69.7 ms
    256       257.6 ms            245.7 ms

``SplitLinear`` keeps the plain contiguous [in, out] weight (no packed copy) and picks:

* 1-4 rows: the C++ gemv (``calm_fast._C.gemv``, csrc/gemv_cpu.cpp): each thread streams
  its own contiguous slab of weight rows into a private accumulator. The 24 `pocket`
  projections at batch 1 in 10.3-11.0 ms (~29 GB/s, where a plain sum read 30 GB/s), at
  batch 2 in 12.7 ms (same run, 2 threads).
* without the extension, 1-2 rows: ONE batched matmul over row blocks
  [parts, in/parts, out] (contiguous slabs, views), the partial products summed:
  11.1-12.6 ms at batch 1 (18-21 ms at batch 2).
* more rows: one batched matmul over column blocks [parts, in, out/parts] (strided views,
  leading dimension ``out``), which torch parallelises over the blocks: 22-25 ms at
  batch 8 against 25-27 ms for row blocks.

Each output is the same dot product as ``x @ W`` up to fp32 rounding (the summation
blocking differs).
"""
from __future__ import annotations

import torch

try:  # the C++ decode gemv (csrc/gemv_cpu.cpp); without the extension, the bmm paths
    from ._C import gemv as _gemv
except ImportError:
    _gemv = None


def _blocks(size: int, want: int) -> int:
    """At most ``want`` equal blocks of ``size``, each of at least 32: uneven or tiny blocks
    give fewer."""
    while want > 1 and (size % want or size // want < 32):
        want -= 1
    return want


class SplitLinear:
    """y = x @ W (+ b) for W given as an fp32 [in, out] tensor (the packed layout)."""

    ROW_BLOCK_MAX_ROWS = 2

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                 parts: int | None = None):
        if w_t.dim() != 2 or not w_t.is_floating_point():
            raise ValueError(f"SplitLinear needs a float [in, out] weight, got {tuple(w_t.shape)}")
        K, N = w_t.shape
        want = parts or max(1, torch.get_num_threads())
        parts, kparts = _blocks(N, want), _blocks(K, want)
        self.parts, self.kparts, self.in_features, self.out_features = parts, kparts, K, N
        self.w = w_t.detach().contiguous()
        n = N // parts
        self.cols = self.w.as_strided((parts, K, n), (n, N, 1))  # column blocks (views)
        self.rows = self.w.view(kparts, K // kparts, N)  # row blocks (views)
        self.b = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, K, N = x.shape[0], self.in_features, self.out_features
        if _gemv is not None and B <= 4 and x.dtype == torch.float32 and not x.requires_grad:
            y = torch.empty(B, N)
            _gemv(x.contiguous().numpy(), self.w.numpy(),
                  None if self.b is None else self.b.numpy(), y.numpy(),
                  torch.get_num_threads())
            return y
        if self.kparts > 1 and B <= self.ROW_BLOCK_MAX_ROWS:
            xs = x.reshape(B, self.kparts, K // self.kparts).transpose(0, 1)
            y = torch.bmm(xs, self.rows).sum(0)
        else:
            y = torch.bmm(x.expand(self.parts, B, K), self.cols)
            y = y.reshape(B, N) if (self.parts == 1 or B == 1) else \
                y.transpose(0, 1).reshape(B, N)
        return y if self.b is None else y.add_(self.b)

    def nbytes(self) -> int:
        n = self.w.numel() + (0 if self.b is None else self.b.numel())
        return n * self.w.element_size()

    def weight(self) -> torch.Tensor:
        """The [in, out] weight (tests and repacking)."""
        return self.w


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w (+ b) for a plain [in, out] tensor or a packed callable (SplitLinear, Int8Linear:
    those carry their bias, so ``b`` must be None for them)."""
    if isinstance(w, torch.Tensor):
        return x @ w if b is None else torch.addmm(b, x, w)
    return w(x)
