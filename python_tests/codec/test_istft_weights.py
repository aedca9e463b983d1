"""The shipped speech iSTFT VAE (calm_fast/assets/default/vae.safetensors, trained by
scripts/train_istft_vae.py) loads as an export and runs both ways; its quality is measured
by `calm-fast eval` on held-out speech (benchmarks/results/training.md), not here."""
from pathlib import Path

import torch

import calm_fast
from calm_fast.codec.istft import ISTFTVAE
from calm_fast.runtime.export import load_model

VAE_FILE = Path(calm_fast.__file__).parent / "assets" / "default" / "vae.safetensors"


@torch.no_grad()
def test_shipped_speech_vae_loads_and_round_trips():
    vae = load_model(VAE_FILE, expect="vae")
    assert isinstance(vae, ISTFTVAE) and vae.cfg.frame_rate == 12.5
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # stored fp16, run fp32
    t = torch.arange(24_000) / 24_000
    wav = (0.3 * torch.sin(2 * torch.pi * 200 * t))[None, None]
    z = vae.encode(vae.pad(wav))
    assert z.shape == (1, 13, vae.cfg.latent_dim) and torch.isfinite(z).all()
    y, x = vae.align(vae.decode(z), wav)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # a 200 Hz tone (far from the speech it was trained on) comes back with its energy
    # peak in the voice-pitch range, not as noise or silence
    spec = torch.fft.rfft(y[0, 2400:]).abs()
    peak_hz = int(spec.argmax()) / y[0, 2400:].shape[-1] * 24_000
    assert 150 < peak_hz < 300 and y[0, 2400:].abs().max() > 0.01
