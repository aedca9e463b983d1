"""The short-context Transformer: a small causal Transformer over the last K clean latents,
whose output is added to the backbone's (paper section 2.3: decisive for music).

Its input at frame n is the latent fed to the backbone at that step (BOS, then x^{n-1}),
un-noised. Training runs it over the whole sequence with a banded causal mask (row n sees
rows n-K+1..n, i.e. latents x^{n-K}..x^{n-1}); generation keeps, per layer, a ring of the
last K keys/values. Each layer's row is computed once, under the same band, so the ring step
equals the banded pass exactly (python_tests/test_short_context.py), for any number of
layers. Positions are absolute (RoPE), so only relative offsets matter in both paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_fast.model.config import ShortContextConfig
from calm_fast.model.rope import apply_rope, rope_tables
from calm_fast.model.transformer import Transformer, causal_mask


def _rope(x, pos, max_period):
    """RoPE at per-row positions, in fp32: x [B, heads, D], pos [B]."""
    cos, sin = rope_tables(x.shape[-1], max_period, pos)
    return apply_rope(x.float(), cos, sin).to(x.dtype)


def check_ring(q, k, v, ring_k, ring_v, slots, pos):
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


def ring_attention(q, k, v, ring_k, ring_v, slots, pos, max_period=10_000.0):
    """q [B, H, D], k, v [B, Hkv, D] of the new rows (RoPE NOT applied); ring_k, ring_v
    [slots, K, Hkv, D] one layer's rings (views are fine: written in place); slots, pos [B]
    long: each row's ring and its position. Returns attention [B, H, D]."""
    check_ring(q, k, v, ring_k, ring_v, slots, pos)
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



@dataclass
class ShortContextState:
    """Fixed-address ring buffers for ``slots`` streams: k, v [slots, layers, K, Hkv, Dh]."""

    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor  # [slots] rows seen so far

    def reset(self, slots) -> None:
        self.count[torch.as_tensor(slots, dtype=torch.long)] = 0


class ShortContext(nn.Module):
    def __init__(self, cfg: ShortContextConfig, latent_dim: int, out_dim: int):
        super().__init__()
        if cfg.context < 1:
            raise ValueError(f"short context K must be >= 1, got {cfg.context}")
        self.cfg = cfg
        d = cfg.transformer.d_model
        self.in_proj = nn.Linear(latent_dim, d, bias=False)
        self.transformer = Transformer(cfg.transformer)
        self.out_norm = nn.LayerNorm(d, eps=1e-5)
        self.out_proj = nn.Linear(d, out_dim, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # starts as a no-op on top of the backbone

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, S, latent_dim] (BOS-substituted, clean) -> [B, S, out_dim]."""
        S = inputs.shape[1]
        mask = causal_mask(S, inputs.device, window=self.cfg.context)
        return self.out_proj(self.out_norm(self.transformer(self.in_proj(inputs), mask)))

    def init_state(self, slots: int, dtype=torch.float32, device="cpu") -> ShortContextState:
        c = self.cfg.transformer
        shape = (slots, c.num_layers, self.cfg.context, c.kv_heads, c.head_dim)
        return ShortContextState(torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(slots, dtype=torch.long, device=device))

    @torch.no_grad()
    def step(self, state: ShortContextState, slots, x: torch.Tensor,
             attend=ring_attention) -> torch.Tensor:
        """One new row per stream: x [B, latent_dim] for ring ``slots`` [B] -> [B, out_dim].
        RoPE, the ring write and the attention are one call per layer, ``attend`` (this
        module's ``ring_attention``; the frame step passes ops.ring_attention, a single
        Triton launch on GPU)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=x.device)
        pos = state.count[slots]
        period = self.transformer.cfg.max_period
        h = self.in_proj(x)
        for li, layer in enumerate(self.transformer.layers):
            q, k, v = layer.project(h)  # RoPE is applied inside ring_attention
            a = attend(q, k, v, state.k[:, li], state.v[:, li], slots, pos, period)
            h = layer.finish(h, a.flatten(1))
        state.count[slots] += 1
        return self.out_proj(self.out_norm(h))
