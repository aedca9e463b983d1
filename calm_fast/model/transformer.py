"""The causal pre-LN RoPE Transformer, as an nn.Module (training and the dense oracle).

Same math and key names as the published Kyutai / Pocket TTS ``StreamingTransformer``
(``layers.{i}.self_attn.in_proj``, ``out_proj``, ``norm1``, ``norm2``, ``linear1``,
``linear2``, optional ``layer_scale_{1,2}.scale``), so a Pocket TTS state dict loads as is.

Generation does not run this module frame by frame: ``calm_fast.fast.backbone.pack``
lays the same weights out for the fast prefill and step over a paged KV cache, which equal
``forward`` over the whole sequence (python_tests/fast/test_backbone.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_fast.model.config import TransformerConfig
from calm_fast.model.rope import apply_rope, rope_tables


def _call(mod, x):
    return mod(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.scale


class Attention(nn.Module):
    """The projections of self-attention (the attention itself is in TransformerLayer)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.in_proj = nn.Linear(cfg.d_model, (H + 2 * Hk) * D, bias=False)
        self.out_proj = nn.Linear(H * D, cfg.d_model, bias=False)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
        ls = cfg.layer_scale
        self.layer_scale_1 = nn.Identity() if ls is None else LayerScale(d, ls)
        self.layer_scale_2 = nn.Identity() if ls is None else LayerScale(d, ls)

    def project(self, x, cos=None, sin=None, lin=_call):
        """q [..., H, D] and k, v [..., Hkv, D] of norm1(x), RoPE applied (none without cos,
        sin: for kernels that rotate themselves). The cached paths (short-context ring, VAE
        window) call this and ``finish`` around their own attention; ``lin(module, x)``
        runs each linear (a fast path may pass packed copies)."""
        c = self.self_attn.cfg
        H, Hk, D = c.num_heads, c.kv_heads, c.head_dim
        q, k, v = lin(self.self_attn.in_proj, self.norm1(x)).split([H * D, Hk * D, Hk * D],
                                                                   dim=-1)
        q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hk, D)), v.unflatten(-1, (Hk, D))
        if cos is None:
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x, attn, lin=_call):
        """The residual attention update (attn [..., H * D]) and the feed-forward block."""
        x = x + self.layer_scale_1(lin(self.self_attn.out_proj, attn))
        h = lin(self.linear2, F.gelu(lin(self.linear1, self.norm2(x)), approximate="tanh"))
        return x + self.layer_scale_2(h)

    def forward(self, x, cos, sin, mask):
        """x [B, T, d]; mask [T, T] or [B, 1, T, T] bool."""
        q, k, v = (t.transpose(1, 2) for t in self.project(x, cos, sin))  # [B, heads, T, D]
        rep = q.shape[1] // k.shape[1]
        if rep != 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.finish(x, a.transpose(1, 2).flatten(2))


def causal_mask(T: int, device=None, window: int | None = None) -> torch.Tensor:
    """[T, T] bool, True = may attend. ``window`` = K keeps only the last K positions
    (i - K < j <= i): the banded mask of the short-context Transformer."""
    i = torch.arange(T, device=device)
    m = i[None, :] <= i[:, None]
    if window is not None:
        m &= i[None, :] > i[:, None] - window
    return m


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] at positions 0..T-1; mask [T, T] or [B, 1, T, T] bool (default
        causal). Relative positions are all RoPE sees, so left padding (masked out as keys)
        leaves the real rows' outputs unchanged."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"transformer input must be [B, T, {self.cfg.d_model}], "
                             f"got {tuple(x.shape)}")
        T = x.shape[1]
        c = self.cfg
        cos, sin = rope_tables(c.head_dim, c.max_period, torch.arange(T, device=x.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if mask is None:
            mask = causal_mask(T, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x
