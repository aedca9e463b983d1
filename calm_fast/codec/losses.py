"""Training the VAE (paper Eq. 2):

    L = l_t |x - x^|_1 + l_f L_stft + l_mel L_mel + l_adv L_adv + l_feat L_feat
        + l_kl KL + l_distill L_distill

* multi-resolution STFT loss: spectral convergence + log-magnitude L1 per resolution;
* mel loss: L1 between log-mel spectrograms (filterbank built here, HTK mel scale);
* a multi-scale STFT discriminator (EnCodec/Mimi style: 2-D convs over the complex STFT at
  several resolutions) with hinge adversarial losses and relative L1 feature matching;
* KL of the Gaussian bottleneck, weight 0.01 (paper);
* optional distillation: cosine similarity between projected latents and the features of a
  teacher the user supplies (WavLM in the paper, weight 25), time-aligned by interpolation.

The paper trains speech with no reconstruction terms (adversarial only) and music with them:
``VAELossConfig.speech()`` / ``.music()``. Other weights are not given; ours are Mimi-like.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VAELossConfig:
    time: float = 0.1
    stft: float = 1.0
    mel: float = 1.0
    adv: float = 1.0
    feat: float = 3.0
    kl: float = 0.01
    distill: float = 25.0
    resolutions: tuple[tuple[int, int], ...] = ((2048, 512), (1024, 256), (512, 128))
    n_mels: int = 64

    @classmethod
    def speech(cls) -> "VAELossConfig":
        return cls(time=0.0, stft=0.0, mel=0.0)

    @classmethod
    def music(cls) -> "VAELossConfig":
        return cls(distill=0.0)


def _stft(x, n_fft, hop):
    win = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    return torch.stft(x.reshape(-1, x.shape[-1]), n_fft, hop, window=win, return_complex=True,
                      center=True, pad_mode="constant")


def stft_loss(x, y, resolutions=((2048, 512), (1024, 256), (512, 128)), eps=1e-7):
    """Mean over resolutions of spectral convergence + L1 of log magnitudes. x, y [B, C, T]."""
    total = 0.0
    for n_fft, hop in resolutions:
        X, Y = _stft(x, n_fft, hop).abs(), _stft(y, n_fft, hop).abs()
        sc = torch.linalg.norm(Y - X) / (torch.linalg.norm(X) + eps)
        total = total + sc + (torch.log(X + eps) - torch.log(Y + eps)).abs().mean()
    return total / len(resolutions)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced on the HTK mel scale."""
    fmax = fmax or sample_rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    pts = torch.linspace(mel(fmin), mel(fmax), n_mels + 2)
    hz = 700.0 * (10 ** (pts / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def mel_loss(x, y, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 64,
             eps=1e-5):
    fb = mel_filterbank(sample_rate, n_fft, n_mels).to(x)
    X = fb @ _stft(x, n_fft, hop).abs()
    Y = fb @ _stft(y, n_fft, hop).abs()
    return (torch.log(X + eps) - torch.log(Y + eps)).abs().mean()


class STFTDiscriminator(nn.Module):
    """2-D convs over (real, imag) of one STFT resolution; returns (logits, features)."""

    def __init__(self, n_fft: int, channels: int = 32, in_channels: int = 1):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        c = channels
        self.convs = nn.ModuleList([
            nn.Conv2d(2 * in_channels, c, (3, 9), padding=(1, 4)),
            *[nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))
              for d in (1, 2, 4)],
            nn.Conv2d(c, c, (3, 3), padding=(1, 1)),
        ])
        self.out = nn.Conv2d(c, 1, (3, 3), padding=(1, 1))

    def forward(self, x):
        B = x.shape[0]
        z = _stft(x, self.n_fft, self.hop)  # [B*C, F, T]
        z = torch.view_as_real(z).permute(0, 3, 2, 1)  # [B*C, 2, T, F]
        z = z.reshape(B, -1, *z.shape[2:])
        feats = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            feats.append(z)
        return self.out(z), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts=(2048, 1024, 512), channels: int = 32, in_channels: int = 1):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, channels, in_channels) for n in n_ffts)

    def forward(self, x):
        return [d(x) for d in self.discs]


def hinge_d_loss(real, fake):
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for (r, _), (f, _) in zip(real, fake)) / len(real)


def hinge_g_loss(fake):
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)


def feature_matching_loss(real, fake):
    """Relative L1 between the discriminator features of real and generated audio."""
    terms = [(fr.detach() - ff).abs().mean() / (fr.detach().abs().mean() + 1e-8)
             for (_, real_f), (_, fake_f) in zip(real, fake) for fr, ff in zip(real_f, fake_f)]
    return sum(terms) / len(terms)


class DistillProjection(nn.Module):
    """Latents [B, latent_dim, frames] -> teacher space; cosine loss against teacher(wav)."""

    def __init__(self, latent_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Conv1d(latent_dim, teacher_dim, 1)

    def forward(self, latents, teacher_feats):
        """teacher_feats [B, frames', teacher_dim], resampled in time to the latent frames."""
        if teacher_feats.dim() != 3 or teacher_feats.shape[0] != latents.shape[0]:
            raise ValueError(f"teacher features must be [B, frames, dim], got "
                             f"{tuple(teacher_feats.shape)}")
        t = F.interpolate(teacher_feats.transpose(1, 2), size=latents.shape[-1], mode="linear",
                          align_corners=False)
        return (1 - F.cosine_similarity(self.proj(latents), t.detach(), dim=1)).mean()


def reconstruction_loss(x, recon, kl, cfg: VAELossConfig, sample_rate: int):
    """KL + time-domain L1 + multi-resolution STFT + mel terms (weights from ``cfg``).
    Returns (loss, {term: tensor})."""
    loss = cfg.kl * kl
    logs = {"kl": kl}
    if cfg.time:
        logs["time"] = (x - recon).abs().mean()
        loss = loss + cfg.time * logs["time"]
    if cfg.stft:
        logs["stft"] = stft_loss(x, recon, cfg.resolutions)
        loss = loss + cfg.stft * logs["stft"]
    if cfg.mel:
        n_fft, hop = cfg.resolutions[len(cfg.resolutions) // 2]
        logs["mel"] = mel_loss(x, recon, sample_rate, n_fft, hop, cfg.n_mels)
        loss = loss + cfg.mel * logs["mel"]
    return loss, logs


def vae_train_step(vae, disc, opt_g, opt_d, wav, cfg: VAELossConfig = VAELossConfig(), *,
                   teacher=None, distill: DistillProjection | None = None, generator=None):
    """One generator + discriminator update on a batch wav [B, C, T]. Returns the losses."""
    x = vae.pad(wav)
    recon, kl, mean = vae(x, generator=generator)
    use_adv = disc is not None and (cfg.adv > 0 or cfg.feat > 0)
    logs = {}
    if use_adv:
        opt_d.zero_grad(set_to_none=True)
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
        d_loss.backward()
        opt_d.step()
        logs["d"] = d_loss.item()
    loss, rec_logs = reconstruction_loss(x, recon, kl, cfg, vae.cfg.sample_rate)
    logs |= rec_logs
    if use_adv:
        fake = disc(recon)
        with torch.no_grad():
            real = disc(x)
        logs["adv"], logs["feat"] = hinge_g_loss(fake), feature_matching_loss(real, fake)
        loss = loss + cfg.adv * logs["adv"] + cfg.feat * logs["feat"]
    if teacher is not None and cfg.distill:
        if distill is None:
            raise ValueError("a teacher needs a DistillProjection (in opt_g's parameters)")
        with torch.no_grad():
            feats = teacher(x)
        logs["distill"] = distill(mean, feats)
        loss = loss + cfg.distill * logs["distill"]
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    logs["loss"] = loss
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
