"""The speech iSTFT VAE weights in calm_fast/assets (a warm start from this project's own
training run, scripts/train_istft_vae.py) load strictly and run both ways (their quality is measured by the training run's
whisper / STOI eval on held-out speech, not here)."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import calm_fast
from calm_fast.codec.istft import ISTFTVAE, ISTFTVAEConfig

ASSETS = Path(calm_fast.__file__).parent / "assets"


@torch.no_grad()
def test_shipped_speech_vae_loads_and_round_trips():
    cfg = ISTFTVAEConfig(**json.loads((ASSETS / "speech_vae_istft.json").read_text())["model"])
    vae = ISTFTVAE(cfg).eval()
    sd = load_file(str(ASSETS / "speech_vae_istft.safetensors"))
    vae.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    t = torch.arange(24_000) / 24_000
    wav = 0.3 * torch.sin(2 * torch.pi * 200 * t)[None]
    mean, logvar = vae.encode(wav)
    assert mean.shape == (1, cfg.latent_dim, 12) and torch.isfinite(mean).all()
    y, x = vae.align(vae.decode(mean), wav)
    assert y.shape == x.shape and torch.isfinite(y).all()
