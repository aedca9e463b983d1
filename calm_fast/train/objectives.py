"""CALM training objectives, each a function of plain tensors and a head callable.

Head calling convention (the published ``SimpleMLPAdaLN``): ``head(c, *times, x)`` where c
is the backbone output Z [N, d], each time is [N, 1] and x is [N, C]. Consistency and plain
flow matching take one time, LSD takes two (s, t). Formulas follow
shared/research/paper.md §2.4-2.6 and §3; every constant that the paper leaves open is
named below with the value chosen and why.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jvp

from calm_fast.model.calm import vp_noise_injection  # noqa: F401 (the backbone's input corruption)
from calm_fast.model.sampling import latent_cfg

HALF_PI = math.pi / 2


# -- data-side tricks -----------------------------------------------------------------------------
def condition_dropout(batch: int, p_text: float = 0.2, p_voice: float = 0.2,
                      generator=None, device=None):
    """Independent boolean drop masks [B] for the text and the voice condition (CFG training).
    The paper drops conditions 20% of the time, text and voice independently."""
    for name, p in (("p_text", p_text), ("p_voice", p_voice)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    u = torch.rand(2, batch, generator=generator, device=device)
    return u[0] < p_text, u[1] < p_voice


def head_batch_multiplier(z: torch.Tensor, x: torch.Tensor, n: int):
    """Repeat each (backbone output, target latent) pair n times, so the head loss sees n
    independent noise/time draws per backbone pass. z [N, d], x [N, C] -> [n N, ...]."""
    if n < 1:
        raise ValueError(f"head batch multiplier must be >= 1, got {n}")
    return z.repeat(n, 1), x.repeat(n, 1)


# -- time proposals -------------------------------------------------------------------------------
def trigflow_times(n: int, p_mean: float = -0.8, p_std: float = 1.6, generator=None,
                   device=None) -> torch.Tensor:
    """t = arctan(exp(tau)) with tau ~ N(p_mean, p_std) (sCM's log-normal proposal, sigma_d=1).
    P_mean -0.8 / P_std 1.6 are sCM's ImageNet values; CALM does not state its own."""
    tau = torch.randn(n, 1, generator=generator, device=device) * p_std + p_mean
    return torch.atan(tau.exp())


def logit_normal(n: int, mean: float = 0.4, std: float = 1.0, generator=None, device=None):
    """sigmoid(N(mean, std)): Pocket TTS's LSD time proposal (0.4, 1.0)."""
    return torch.sigmoid(torch.randn(n, 1, generator=generator, device=device) * std + mean)


# -- adaptive weight ------------------------------------------------------------------------------
class AdaptiveWeight(nn.Module):
    """Learned log-weight w(t) (or w(s, t)) of the uncertainty-weighted losses:
    loss = exp(-w) * term / D + w. A small ReLU MLP on Fourier features of the times; only
    the last layer starts at zero (w = 0 at init), unlike an all-zero MLP, whose hidden
    layers could never leave zero and which reduces to a learned scalar."""

    def __init__(self, n_times: int = 1, hidden: int = 32, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq) * math.pi / 2)
        self.net = nn.Sequential(nn.Linear(2 * n_freq * n_times, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, *times: torch.Tensor) -> torch.Tensor:
        feats = [f(t * self.freqs) for t in times for f in (torch.sin, torch.cos)]
        return self.net(torch.cat(feats, dim=-1))


def _weighted(term: torch.Tensor, dim: int, weight: AdaptiveWeight | None, *times):
    """Mean over the batch of exp(-w) term / D + w (or term / D when weight is None)."""
    if weight is None:
        return (term / dim).mean()
    w = weight(*times).squeeze(-1)
    return (torch.exp(-w) * term / dim + w).mean()


# -- TrigFlow consistency (sCT) -----------------------------------------------------------------
def consistency_loss(head, c, x0, *, eps=None, t=None, weight: AdaptiveWeight | None = None,
                     warmup: float = 1.0, tangent_clip: float = 0.1, generator=None):
    """Continuous-time consistency training in TrigFlow (CALM Eq. 3, sCT tangent).

    x_t = cos t x0 + sin t eps,  f(x_t, t) = cos t x_t - sin t F(x_t, t)   (sigma_d = 1)
    dx_t/dt = cos t eps - sin t x0
    (F-, dF-/dt) = jvp of the stop-gradient head at (x_t, t) along (dx_t/dt, 1), Z fixed
    g = cos t * df-/dt = -cos^2 t (F- - dx_t/dt) - r cos t sin t (x_t + dF-/dt)
    g <- g / (||g|| + 0.1)                      (tangent normalisation)
    loss = exp(-w(t))/D ||F(x_t, t) - F- - g||^2 + w(t)
    ``warmup`` is r in [0, 1] (tangent warm-up: ramp it from 0 to 1 over early training).
    Gradients reach the backbone through c in the F term only.
    """
    n, dim = x0.shape
    eps = torch.randn(x0.shape, generator=generator, device=x0.device) if eps is None else eps
    t = trigflow_times(n, generator=generator, device=x0.device) if t is None else t
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    x_t = cos_t * x0 + sin_t * eps
    dxt_dt = cos_t * eps - sin_t * x0
    c_fixed = c.detach()
    with torch.no_grad():
        f_minus, df_dt = jvp(lambda xx, tt: head(c_fixed, tt, xx), (x_t, t),
                             (dxt_dt, torch.ones_like(t)))
        g = -cos_t * cos_t * (f_minus - dxt_dt) - warmup * cos_t * sin_t * (x_t + df_dt)
        g = g / (g.norm(dim=-1, keepdim=True) + tangent_clip)
        target = f_minus + g
    term = ((head(c, t, x_t) - target) ** 2).sum(-1)
    return _weighted(term, dim, weight, t)


def flow_matching_loss(head, c, x0, *, eps=None, t=None, generator=None):
    """TrigFlow flow matching (the many-step teacher baseline):
    x_t = cos t x0 + sin t eps, target velocity dx_t/dt = -sin t x0 + cos t eps; t ~ U(0, pi/2).
    Sampling integrates dx/dt = F from t = pi/2 (noise) down to 0."""
    n, dim = x0.shape
    eps = torch.randn(x0.shape, generator=generator, device=x0.device) if eps is None else eps
    t = torch.rand(n, 1, generator=generator, device=x0.device) * HALF_PI if t is None else t
    x_t = torch.cos(t) * x0 + torch.sin(t) * eps
    target = -torch.sin(t) * x0 + torch.cos(t) * eps
    return ((head(c, t, x_t) - target) ** 2).sum(-1).mean() / dim


# -- LSD (Pocket TTS) ----------------------------------------------------------------------------
def lsd_loss(head, c, x1, *, eps=None, diag_weight: float = 0.75, distill_weight: float = 0.25,
             weight: AdaptiveWeight | None = None, generator=None):
    """Lagrangian self-distillation of a two-time flow map F(c, s, t, x) (Pocket TTS).

    Convention: noise at time 0, data at 1: x_t = t x1 + (1 - t) e, velocity v = x1 - e.
    diagonal (flow matching): || F(t, t, x_t) - v ||^2,         t ~ logit-normal(0.4, 1)
    self-distillation, s <= t from two logit-normal draws:
        X(t) = x_s + (t - s) F(s, t, x_s);  dX/dt = F(s,t,x_s) + (t - s) dF/dt  (jvp in t)
        || dX/dt - sg(F(t, t, X)) ||^2
    total = diag_weight * diag + distill_weight * distill, each uncertainty-weighted.
    Decoding: x <- x + F(i/N, (i+1)/N, x) / N from x ~ N(0, tau I).
    """
    n, dim = x1.shape
    dev = x1.device
    e = torch.randn(x1.shape, generator=generator, device=dev) if eps is None else eps
    v = x1 - e
    t = logit_normal(n, generator=generator, device=dev)
    x_t = t * x1 + (1 - t) * e
    diag = ((head(c, t, t, x_t) - v) ** 2).sum(-1)
    total = diag_weight * _weighted(diag, dim, weight, t, t)
    if distill_weight > 0:
        a = logit_normal(n, generator=generator, device=dev)
        b = logit_normal(n, generator=generator, device=dev)
        s, t2 = torch.minimum(a, b), torch.maximum(a, b)
        x_s = s * x1 + (1 - s) * e
        v_st, dv_dt = jvp(lambda tt: head(c, s, tt, x_s), (t2,), (torch.ones_like(t2),))
        X = x_s + (t2 - s) * v_st
        dX_dt = v_st + (t2 - s) * dv_dt
        with torch.no_grad():
            u = head(c, t2, t2, X)
        distill = ((dX_dt - u) ** 2).sum(-1)
        total = total + distill_weight * _weighted(distill, dim, weight, s, t2)
    return total


# -- EOS and distillation -------------------------------------------------------------------------
def eos_loss(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """BCE on the EOS logit: label 1 at the first frame after the end (index = length),
    0 before it; frames after that one are masked. logits [B, T], lengths [B] (< T)."""
    B, T = logits.shape
    if (lengths < 0).any() or (lengths >= T).any():
        raise ValueError(f"lengths must be in [0, {T - 1}] so the EOS frame exists, "
                         f"got {lengths.tolist()}")
    idx = torch.arange(T, device=logits.device)[None]
    target = (idx == lengths[:, None]).to(logits.dtype)
    mask = (idx <= lengths[:, None]).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * mask).sum() / mask.sum()


def guided_attention_loss(logits: torch.Tensor, text_len: torch.Tensor,
                          audio_len: torch.Tensor, text_end: int,
                          sigma: float = 0.2) -> torch.Tensor:
    """Guided attention (Tachibana et al. 2017, DCTTS): a push towards a monotonic, roughly
    diagonal text-to-audio alignment in chosen attention heads, which a decoder-only TTS
    otherwise finds only after many steps (the 2800-step speech run never found it).

    logits [B, h, S, T]: the attention logits of the S audio queries (query s predicts
    frame s) over all T keys, -inf where attention is not allowed. Row b's text keys are
    ``text_end - text_len[b] .. text_end - 1`` (the prefix is left-padded and ends with the
    text); its queries s < ``audio_len[b]`` count. The penalty of attending key j from
    query s is 1 - exp(-(s/L - t/N)^2 / 2 sigma^2) for the text key t of N, and 1 for every
    other key (voice, BOS, past audio), so the head both reads the text and reads it in
    order. Rows without text (dropped for CFG) or audio are left out. Returns the mean
    penalty per (row, head, query), in [0, 1]."""
    B, h, S, T = logits.shape
    if text_len.shape != (B,) or audio_len.shape != (B,):
        raise ValueError(f"text_len and audio_len must be [{B}], got {tuple(text_len.shape)} "
                         f"and {tuple(audio_len.shape)}")
    if not 0 < sigma:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    dev = logits.device
    att = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    j = torch.arange(T, device=dev)
    n = text_len.to(dev).float().clamp(min=1)[:, None]
    t = j[None] - (text_end - text_len.to(dev)[:, None])           # [B, T] text index
    in_text = (t >= 0) & (j[None] < text_end)
    s = torch.arange(S, device=dev).float()[None, :, None]          # [1, S, 1]
    L = audio_len.to(dev).float().clamp(min=1)[:, None, None]
    d = (s + 0.5) / L - ((t.float() + 0.5) / n)[:, None, :]          # [B, S, T]
    w = torch.where(in_text[:, None, :], 1 - torch.exp(-d ** 2 / (2 * sigma ** 2)),
                    torch.ones((), device=dev))
    rows = (s[..., 0] < audio_len.to(dev)[:, None].float()) & (text_len.to(dev) > 0)[:, None]
    per_query = (att * w[:, None]).sum(-1)                            # [B, h, S]
    m = rows[:, None].expand_as(per_query).to(per_query.dtype)
    if m.sum() == 0:
        return logits.new_zeros(())
    return (per_query * m).sum() / m.sum()


def latent_distillation_loss(z_student, z_teacher_cond, z_teacher_null, alpha: float,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over channels of (z_student - sg(Z_cfg))^2, masked to valid frames and averaged.
    z_*: [B, T, d]; mask [B, T] (True = valid)."""
    target = latent_cfg(z_teacher_cond, z_teacher_null, alpha).detach()
    err = ((z_student - target) ** 2).mean(-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    if m.sum() == 0:
        raise ValueError("latent distillation mask selects no frame")
    return (err * m).sum() / m.sum()
