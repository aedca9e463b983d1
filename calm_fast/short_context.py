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

from . import ops
from .config import ShortContextConfig
from .transformer import Transformer, causal_mask


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
    def step(self, state: ShortContextState, slots, x: torch.Tensor) -> torch.Tensor:
        """One new row per stream: x [B, latent_dim] for ring ``slots`` [B] -> [B, out_dim].
        RoPE, the ring write and the attention are one op per layer (ops.ring_attention:
        a single Triton launch on GPU)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=x.device)
        pos = state.count[slots]
        period = self.transformer.packed_shape().max_period
        h = self.in_proj(x)
        for li, layer in enumerate(self.transformer.layers):
            q, k, v = layer.project(h)  # RoPE is applied inside ring_attention
            a = ops.ring_attention(q, k, v, state.k[:, li], state.v[:, li], slots, pos, period)
            h = layer.finish(h, a.flatten(1))
        state.count[slots] += 1
        return self.out_proj(self.out_norm(h))
