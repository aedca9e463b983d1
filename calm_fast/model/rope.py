"""Rotary position embeddings as the published Kyutai / Pocket TTS stack uses them.

(real, imag) pairs interleaved along the head dimension, frequencies
max_period^(-2i/Dh), angles computed in float32 whatever the activation dtype (as
published, so the tables equal the peer's bit for bit). A leaf: the reference Transformer,
the fast backbone, the short-context ring and the VAE's windowed Transformer all rotate
through these two functions.
"""
from __future__ import annotations

import math

import torch


def rope_tables(head_dim: int, max_period: float, positions: torch.Tensor):
    """cos/sin tables [N, 1, Dh/2] for absolute positions [N]."""
    half = head_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                      * (-math.log(max_period) * 2 / head_dim))
    ang = positions.to(torch.float32)[:, None] * freqs[None]
    return torch.cos(ang)[:, None], torch.sin(ang)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., H, Dh] rotated by the tables (broadcast over the leading dims)."""
    xr, xi = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = xr * cos - xi * sin
    out[..., 1::2] = xr * sin + xi * cos
    return out
