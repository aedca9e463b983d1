"""Int8 weights for the CPU fast paths (fbgemm dynamic quantization).

Weights are quantized once, per output channel (symmetric int8), and prepacked for fbgemm;
activations are quantized per call. At decode batch sizes the matmuls are weight-read
bound, so a 4x smaller weight is most of the gain (fbgemm's int8 kernel also handles small
batches far better than fp32 sgemm). The error comes mostly from the per-call activation
quantization (fbgemm keeps 7 bits of range per tensor); use it where a few percent is
acceptable, as the published package's own quantized mode does. Timings and errors:
benchmarks/results/design_notes.md.
"""
from __future__ import annotations

import torch


class Int8Linear:
    """y = x @ W (+ b) with W given as [in, out] fp32 (the packed layout), stored in int8."""

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None = None):
        if w_t.dim() != 2 or not w_t.is_floating_point():
            raise ValueError(f"Int8Linear needs a float [in, out] weight, got {tuple(w_t.shape)}")
        w = w_t.t().contiguous().float()  # [out, in], what fbgemm expects
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        q = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long),
                                       0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(
            q, None if bias is None else bias.float())
        self.in_features, self.out_features = w_t.shape
        self._nbytes = w.numel() + 8 * w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed)

    def nbytes(self) -> int:
        return self._nbytes

