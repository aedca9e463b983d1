"""VAE losses, the STFT discriminator, and the train step on the tiny preset (CPU)."""
import math

import pytest
import torch

from calm_fast.codec.vae import VAE, vae_preset
from calm_fast.codec.losses import (DistillProjection, MultiScaleSTFTDiscriminator, VAELossConfig, feature_matching_loss, hinge_d_loss, hinge_g_loss, mel_filterbank, mel_loss, stft_loss, vae_train_step)

RES = ((256, 64), (128, 32), (64, 16))


def signal(B=2, T=1536, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / 1600
    f = 100 + 300 * torch.rand(B, 1, 1, generator=g)
    return 0.5 * torch.sin(2 * math.pi * f * t) + 0.05 * torch.randn(B, 1, T, generator=g)


def test_reconstruction_losses_are_zero_on_equal_and_grow_with_error():
    x = signal()
    assert stft_loss(x, x, RES).item() == pytest.approx(0.0, abs=1e-6)
    assert mel_loss(x, x, 1600, 128, 32, 16).item() == pytest.approx(0.0, abs=1e-6)
    small, big = x + 0.01 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
    assert 0 < stft_loss(x, small, RES) < stft_loss(x, big, RES)
    assert 0 < mel_loss(x, small, 1600, 128, 32, 16) < mel_loss(x, big, 1600, 128, 32, 16)


def test_mel_filterbank_shape_and_coverage():
    fb = mel_filterbank(24000, 1024, 64)
    assert fb.shape == (64, 513) and (fb >= 0).all() and (fb <= 1).all()
    assert (fb.sum(0)[5:-5] > 0).all()  # every inner frequency bin is covered
    peaks = fb.argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all()  # filters in increasing frequency


def test_discriminator_losses_and_gradients():
    disc = MultiScaleSTFTDiscriminator((256, 128), channels=8)
    x, y = signal(), signal(seed=1).requires_grad_()
    real, fake = disc(x), disc(y)
    assert len(real) == 2 and len(real[0][1]) == 5
    d = hinge_d_loss(real, fake)
    d.backward(retain_graph=True)
    # (the output bias gets none while every logit is inside the hinge margin: -1 + 1 = 0)
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if n.endswith("weight"))
    g = hinge_g_loss(fake) + feature_matching_loss(real, fake)
    g.backward()
    assert y.grad.abs().sum() > 0
    assert feature_matching_loss(real, real).item() == 0.0


def test_distillation_projection_against_a_teacher():
    proj = DistillProjection(8, 16)
    lat = torch.randn(2, 8, 5)
    feats = torch.randn(2, 11, 16)
    loss = proj(lat, feats)
    assert 0 <= loss.item() <= 2
    with pytest.raises(ValueError, match="teacher features"):
        proj(lat, torch.randn(11, 16))


def test_train_steps_reduce_reconstruction_on_a_fixed_signal():
    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny"))
    disc = MultiScaleSTFTDiscriminator((256, 128), channels=8)
    teacher_w = torch.randn(1, 16)
    teacher = lambda wav: wav.unfold(-1, 64, 64)[:, 0] @ torch.ones(64, 1) @ teacher_w  # noqa: E731
    distill = DistillProjection(8, 16)
    opt_g = torch.optim.Adam([*vae.parameters(), *distill.parameters()], 3e-3)
    opt_d = torch.optim.Adam(disc.parameters(), 1e-4)
    cfg = VAELossConfig(resolutions=RES, n_mels=16, adv=0.1, feat=0.3)
    x = signal()
    with torch.no_grad():
        before = stft_loss(x, vae(x)[0], RES).item()
    logs = [vae_train_step(vae, disc, opt_g, opt_d, x, cfg, teacher=teacher, distill=distill,
                           generator=torch.Generator().manual_seed(i)) for i in range(30)]
    vae.eval()
    with torch.no_grad():
        after = stft_loss(x, vae.decode(vae.encode(x)), RES).item()
    assert set(logs[0]) >= {"d", "kl", "time", "stft", "mel", "adv", "feat", "distill", "loss"}
    assert all(math.isfinite(v) for log in logs for v in log.values())
    assert after < 0.8 * before, (before, after)
