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

``SplitLinear`` stores the weight as ``parts`` column blocks [parts, in, out/parts]
(each block contiguous) and runs them as ONE batched matmul, which torch parallelises
over the blocks. Each output is the same dot product as in ``x @ W`` (equal to fp32
rounding: the summation blocking may differ).
"""
from __future__ import annotations

import torch


class SplitLinear:
    """y = x @ W (+ b) for W given as an fp32 [in, out] tensor (the packed layout)."""

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                 parts: int | None = None):
        if w_t.dim() != 2 or not w_t.is_floating_point():
            raise ValueError(f"SplitLinear needs a float [in, out] weight, got {tuple(w_t.shape)}")
        K, N = w_t.shape
        parts = parts or max(1, torch.get_num_threads())
        while parts > 1 and (N % parts or N // parts < 32):
            parts -= 1  # uneven or tiny column blocks: fewer parts
        self.parts, self.in_features, self.out_features = parts, K, N
        self.w = w_t.detach().reshape(K, parts, N // parts).permute(1, 0, 2).contiguous()
        self.b = None if bias is None else bias.detach().reshape(parts, 1, N // parts).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        xe = x.expand(self.parts, B, self.in_features)
        y = torch.bmm(xe, self.w) if self.b is None else torch.baddbmm(self.b, xe, self.w)
        if self.parts == 1 or B == 1:
            return y.reshape(B, self.out_features)  # a view: [parts, 1, n] is already [1, N]
        return y.transpose(0, 1).reshape(B, self.out_features)

    def nbytes(self) -> int:
        n = self.w.numel() + (0 if self.b is None else self.b.numel())
        return n * self.w.element_size()

    def weight(self) -> torch.Tensor:
        """The [in, out] weight back (tests and repacking)."""
        return self.w.permute(1, 0, 2).reshape(self.in_features, self.out_features)


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w (+ b) for a plain [in, out] tensor or a packed callable (SplitLinear, Int8Linear:
    those carry their bias, so ``b`` must be None for them)."""
    if isinstance(w, torch.Tensor):
        return x @ w if b is None else torch.addmm(b, x, w)
    return w(x)
