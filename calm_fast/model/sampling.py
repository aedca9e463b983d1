"""Sampling the next latent from the backbone output Z: Gaussian temperature, latent CFG,
n-step consistency and LSD decoding, and the EOS rule.

``F(c, x, times)`` below is any head evaluation: ``times`` is a tuple of Python floats
shared by the batch (the fused paths cache the time embedding per tuple). ``module_head``
wraps an ``AdaLNHead`` into that form; ``calm_fast.fast.head.head_cpu`` / ``head_triton``
with a packed head are the fast ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


HALF_PI = math.pi / 2


def module_head(head):
    def F(c, x, times):
        return head(c, *[torch.full((x.shape[0], 1), t, dtype=x.dtype, device=x.device)
                         for t in times], x)
    return F


def latent_cfg(z_cond: torch.Tensor, z_null: torch.Tensor, alpha: float) -> torch.Tensor:
    """Latent CFG: Z = Z_null + alpha (Z_cond - Z_null)."""
    return z_null + alpha * (z_cond - z_null)


def gaussian_noise(temps, dim: int, *, generators=None, clamp=None,
                   dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Gaussian temperature: one row per stream, N(0, tau I) (std sqrt(tau)), optionally
    truncated to [-clamp, clamp] (``clamp``: one value for all rows, or one per row, None =
    no truncation). ``generators``: one torch.Generator per row (reproducible per stream,
    whatever the batch), or None for the global RNG in row order (the draw the published
    Pocket TTS loop makes)."""
    temps = [float(t) for t in temps]
    if any(t < 0 or not math.isfinite(t) for t in temps):
        raise ValueError(f"temperatures must be finite and >= 0, got {temps}")
    clamps = list(clamp) if isinstance(clamp, (list, tuple)) else [clamp] * len(temps)
    if len(clamps) != len(temps):
        raise ValueError(f"{len(clamps)} noise clamps for {len(temps)} streams")
    if any(c is not None and c <= 0 for c in clamps):
        raise ValueError(f"noise clamp must be > 0, got {clamp}")
    if generators is not None and len(generators) != len(temps):
        raise ValueError(f"{len(generators)} generators for {len(temps)} streams")
    rows = []
    for i, (t, c) in enumerate(zip(temps, clamps)):
        g = None if generators is None else generators[i]
        r = torch.empty(dim, dtype=dtype)
        if c is None:
            r.normal_(0.0, t ** 0.5, generator=g)
        else:
            torch.nn.init.trunc_normal_(r, 0.0, t ** 0.5, -c, c, generator=g)
        rows.append(r)
    return torch.stack(rows).to(device)


def consistency_schedule(steps: int) -> list[float]:
    """TrigFlow times of n-step consistency sampling: t_i = (pi/2)(1 - i/n), i = 0..n-1.

    The paper does not give its intermediate times; evenly spaced angles put the re-noised
    point x_t = cos t x + sin t eps at signal/noise ratios cot(t) spread from 0 to cot(pi/2n).
    One step is f(eps, pi/2) = -F(eps, pi/2)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [HALF_PI * (1 - i / steps) for i in range(steps)]


def consistency_sample(F, c, noise, steps: int = 1, renoise=None) -> torch.Tensor:
    """n-step consistency sampling: x = f(noise, pi/2), then for each later t:
    x_t = cos t x + sin t eps' (eps' from ``renoise()``, drawn at the same temperature),
    x = f(x_t, t) with f(x, t) = cos t x - sin t F(x, t)."""
    ts = consistency_schedule(steps)
    if steps > 1 and renoise is None:
        raise ValueError("multi-step consistency sampling needs a renoise() draw")
    x = -F(c, noise, (ts[0],))  # cos(pi/2) = 0, sin(pi/2) = 1
    for t in ts[1:]:
        x_t = math.cos(t) * x + math.sin(t) * renoise()
        x = math.cos(t) * x_t - math.sin(t) * F(c, x_t, (t,))
    return x


def lsd_sample(F, c, noise, steps: int = 1) -> torch.Tensor:
    """n-step LSD flow-map decoding (Pocket TTS): x <- x + F(x, s, t) / n for
    (s, t) = (i/n, (i+1)/n), from x = noise at s = 0 to data at t = 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise
    for i in range(steps):
        x = x + F(c, x, (i / steps, (i + 1) / steps)) / steps
    return x


@dataclass
class EOSRule:
    """Stop when the EOS logit exceeds ``threshold`` (at or after ``min_frames``), then emit
    ``frames_after_eos`` more frames. As in Pocket TTS, the frame made at the EOS step counts
    as the first of those, so frames_after_eos=0 ends the stream before it."""

    threshold: float | None = -4.0  # None: never stop on EOS
    frames_after_eos: int = 0
    min_frames: int = 0
    eos_at: int | None = None

    def keep(self, step: int, logit: float) -> bool:
        """Whether the frame made at ``step`` is emitted (False: the stream is finished)."""
        if self.threshold is not None and self.eos_at is None and logit > self.threshold \
                and step >= self.min_frames:
            self.eos_at = step
        return self.eos_at is None or step < self.eos_at + self.frames_after_eos
