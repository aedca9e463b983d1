"""The AdaLN residual-MLP head (MAR ``SimpleMLPAdaLN``, as in Pocket TTS) and its two
parametrisations.

    y = cond_embed(Z) + mean_i time_embed_i(t_i)
    h = input_proj(x);  per block: h += gate * MLP(LN(h) * (1 + scale) + shift)
    F = final_linear(LN(h) * (1 + scale) + shift)          (shift/scale/gate from SiLU(y))

Key names equal the published module's, so a Pocket TTS ``flow_net.*`` loads unchanged.
LayerNorm is written out (mean / biased variance) so ``torch.func.jvp`` can differentiate
through it: the consistency and LSD objectives need forward-mode tangents.

Parametrisations (``calm_fast.objectives`` trains them, ``calm_fast.sampling`` samples them):
* TrigFlow consistency (one time t in [0, pi/2], sigma_d = 1):
  f(x_t, t) = cos(t) x_t - sin(t) F(x_t, t);  x_t = cos(t) x + sin(t) eps.
* LSD flow map (two times s <= t in [0, 1], noise at 0, data at 1 as in Pocket TTS):
  X(s -> t) = x_s + (t - s) F(x_s, s, t).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from calm_fast.model.config import HeadConfig


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight + self.bias if hasattr(self, "weight") else x


class RMSNorm(nn.Module):
    """As published: x * alpha / sqrt(eps + var(x)) with the unbiased variance."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * (self.alpha * torch.rsqrt(self.eps + x.var(-1, keepdim=True)))


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, n_freq: int = 256, max_period: float = 10_000.0):
        super().__init__()
        half = n_freq // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half))
        self.mlp = nn.Sequential(nn.Linear(n_freq, width), nn.SiLU(), nn.Linear(width, width),
                                 RMSNorm(width))

    def forward(self, t):  # t [B, 1]
        args = t * self.freqs.to(t.dtype)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class ResBlock(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.in_ln = LayerNorm(w)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, -1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, w: int, out: int):
        super().__init__()
        self.norm_final = LayerNorm(w, affine=False)
        self.linear = nn.Linear(w, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class AdaLNHead(nn.Module):
    """F(c, *times, x): c [B, cond_dim], times [B, 1] each, x [B, latent_dim]."""

    def __init__(self, cfg: HeadConfig, latent_dim: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_embed = nn.ModuleList(TimestepEmbedder(w) for _ in range(cfg.num_time_conds))
        self.cond_embed = nn.Linear(cond_dim, w)
        self.input_proj = nn.Linear(latent_dim, w)
        self.res_blocks = nn.ModuleList(ResBlock(w) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(w, latent_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """DiT/MAR init: xavier Linears, N(0, 0.02) time MLPs, zero modulations and output
        (so the untrained head outputs 0 and every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in self.time_embed:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in [*self.res_blocks, self.final_layer]:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, c: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        *ts, x = args
        if len(ts) != len(self.time_embed):
            raise ValueError(f"the head takes {len(self.time_embed)} time input(s), got {len(ts)}")
        y = self.cond_embed(c)
        if ts:
            y = y + sum(emb(t) for emb, t in zip(self.time_embed, ts)) / len(ts)
        h = self.input_proj(x)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)


def consistency_fn(head, c, x_t, t):
    """TrigFlow consistency function f(x_t, t) = cos t x_t - sin t F(c, t, x_t); t [B, 1]."""
    return torch.cos(t) * x_t - torch.sin(t) * head(c, t, x_t)


def lsd_flow_map(head, c, x_s, s, t):
    """LSD flow map X(s -> t) = x_s + (t - s) F(c, s, t, x_s); s, t [B, 1]."""
    return x_s + (t - s) * head(c, s, t, x_s)

