"""The iSTFT-decoder VAE (calm_fast/codec/istft.py): shapes, exact streaming in uneven chunks, causality, a tiny overfit."""
import math

import pytest
import torch

from calm_fast.codec.istft import (ISTFTVAE, ISTFTVAEConfig, ISTFTVAELossConfig, KLController,
                                   kl_per_element, mel_filterbank, vae_loss)


def small_cfg(**kw):
    base = dict(enc_dim=64, dec_dim=64, dec_blocks=2, enc_blocks_low=1, mlp_mult=2)
    base.update(kw)
    return ISTFTVAEConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ISTFTVAE(small_cfg()).eval()
    # a non-trivial layer scale, so every block matters in the comparisons
    for mod in m.modules():
        if hasattr(mod, "gamma"):
            mod.gamma.data.fill_(0.5)
    return m


def test_default_config_shapes():
    cfg = ISTFTVAEConfig()
    assert cfg.frame_size == 1920 and cfg.frame_rate == 12.5 and cfg.delay == 720
    m = ISTFTVAE(cfg)
    x = torch.randn(2, 3 * 1920 + 100)
    mean, logvar = m.posterior(x)
    assert mean.shape == logvar.shape == (2, 32, 3)
    y = m.decoder(mean)
    assert y.shape == (2, 3 * 1920)
    assert m.decoder.out.out_features == 2 * 481
    assert ISTFTVAEConfig.from_dict(cfg.to_dict()) == cfg
    n = sum(p.numel() for p in m.parameters())
    assert 1e6 < n < 2e7


def test_mel_filterbank_is_sane():
    fb = mel_filterbank(24_000, 960, 80)
    assert fb.shape == (80, 481) and (fb >= 0).all()
    assert (fb.sum(1) > 0).all()  # no empty filter


def chunks(total, sizes):
    out, i, k = [], 0, 0
    while i < total:
        n = min(sizes[k % len(sizes)], total - i)
        out.append((i, i + n))
        i, k = i + n, k + 1
    return out


@torch.no_grad()
def test_decode_step_equals_offline_in_uneven_chunks(model):
    torch.manual_seed(1)
    z = torch.randn(2, 32, 13)
    ref = model.decoder(z)
    st = model.decoder.init_state(2)
    outs = []
    for a, b in chunks(13, [1, 3, 0, 2, 5, 1]):
        y, st = model.decoder.step(z[..., a:b], st)
        assert y.shape == (2, (b - a) * 1920)
        outs.append(y)
    y, st = model.decoder.step(z[..., :0], st)  # an empty chunk is a no-op
    assert y.shape == (2, 0)
    got = torch.cat(outs, -1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())
    # the state has fixed sizes (a CUDA graph can capture a frame step)
    st0 = model.decoder.init_state(2)
    assert {k: v.shape for k, v in st.items()} == {k: v.shape for k, v in st0.items()}


@torch.no_grad()
def test_encode_step_equals_offline_in_uneven_chunks(model):
    torch.manual_seed(2)
    x = 0.3 * torch.randn(2, 9 * 1920 + 777)
    ref_m, ref_lv = model.posterior(x)
    st = model.encoder.init_state(2)
    ms, lvs = [], []
    for a, b in chunks(x.shape[-1], [1000, 17, 5000, 240, 3333, 1]):
        m, lv, st = model.encoder.step(x[..., a:b], st)
        ms.append(m)
        lvs.append(lv)
    m, lv = torch.cat(ms, -1), torch.cat(lvs, -1)
    assert m.shape == ref_m.shape == (2, 32, 9)
    assert (m - ref_m).abs().max() < 1e-5 and (lv - ref_lv).abs().max() < 1e-5


@torch.no_grad()
def test_streaming_round_trip_frame_by_frame(model):
    """Encode then decode one 1920-sample frame at a time == offline round trip."""
    torch.manual_seed(3)
    x = 0.3 * torch.randn(1, 6 * 1920)
    ref = model.decoder(model.posterior(x)[0])
    est, dst = model.encoder.init_state(1), model.decoder.init_state(1)
    out = []
    for j in range(6):
        m, _, est = model.encoder.step(x[..., j * 1920:(j + 1) * 1920], est)
        assert m.shape[-1] == 1  # a latent is emitted as soon as its 1920 samples are in
        y, dst = model.decoder.step(m, dst)
        out.append(y)
    assert (torch.cat(out, -1) - ref).abs().max() < 1e-5


@torch.no_grad()
def test_causality(model):
    torch.manual_seed(4)
    x = 0.3 * torch.randn(1, 8 * 1920)
    x2 = x.clone()
    x2[..., 5 * 1920:] = torch.randn(3 * 1920)  # change the future from latent 5 on
    m1, m2 = model.posterior(x)[0], model.posterior(x2)[0]
    assert torch.allclose(m1[..., :5], m2[..., :5], atol=1e-6, rtol=0)
    assert not torch.allclose(m1[..., 5:], m2[..., 5:])
    x3 = x.clone()
    x3[..., 5 * 1920 - 120] += 1.0  # in the last hop that latent 4 sees
    m3 = model.posterior(x3)[0]
    assert torch.allclose(m1[..., :4], m3[..., :4], atol=1e-6, rtol=0)
    assert not torch.allclose(m1[..., 4], m3[..., 4])
    z = torch.randn(1, 32, 8)
    z2 = z.clone()
    z2[..., 4:] += 1.0
    y1, y2 = model.decoder(z), model.decoder(z2)
    assert torch.allclose(y1[..., :4 * 1920], y2[..., :4 * 1920], atol=1e-6, rtol=0)
    assert not torch.allclose(y1[..., 4 * 1920:], y2[..., 4 * 1920:])


def test_align_and_delay(model):
    x = torch.arange(4 * 1920, dtype=torch.float32)[None]
    y = torch.zeros(1, 4 * 1920)
    ya, xa = model.align(y, x)
    assert ya.shape == xa.shape == (1, 4 * 1920 - 720)
    assert xa[0, 0] == 0 and xa[0, -1] == 4 * 1920 - 721


def test_kl_controller_moves_toward_target():
    c = KLController(weight=1e-2, target=1.5)
    w0 = c.weight
    c.update(5.0)
    assert c.weight > w0
    c2 = KLController(weight=1e-2, target=1.5)
    c2.update(0.1)
    assert c2.weight < 1e-2
    c3 = KLController()
    c3.load_state_dict(c.state_dict())
    assert c3 == c
    m, lv = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    assert kl_per_element(m, lv).item() == 0.0
    assert kl_per_element(m + 1, lv).item() == pytest.approx(0.5)


def test_tiny_overfit_loss_falls():
    """A small model on one 0.5 s tone+chirp clip: the loss must fall clearly."""
    torch.manual_seed(0)
    cfg = small_cfg(enc_dim=48, dec_dim=48)
    m = ISTFTVAE(cfg)
    t = torch.arange(5 * 1920) / 24_000
    x = (0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
         + 0.1 * torch.sin(2 * math.pi * (500 + 2000 * t) * t))[None].repeat(2, 1)
    lc = ISTFTVAELossConfig(kl_weight=1e-3, kl_target=None)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = vae_loss(m, x, lc)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        assert all(math.isfinite(v.item()) for v in out.values())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@torch.no_grad()
def test_codec_protocol_matches_the_seanet_vae(model):
    """encode/decode/pad/init_state speak the codec.vae.VAE protocol ([B, 1, T] audio,
    [B, frames, C] latents) so TTS, the engine and the latent cache take either family;
    streaming through a state equals the offline call."""
    torch.manual_seed(5)
    x = 0.3 * torch.randn(2, 1, 5 * 1920 + 300)
    xp = model.pad(x)
    assert xp.shape[-1] == 6 * 1920
    z = model.encode(xp)
    assert z.shape == (2, 6, 32)
    assert torch.allclose(z, model.posterior(xp)[0].transpose(1, 2))
    y = model.decode(z)
    assert y.shape == (2, 1, 6 * 1920)
    est, dst = model.init_state(2), model.init_state(2)
    zs = [model.encode_step(xp[..., a:b], est) for a, b in chunks(6 * 1920, [1920, 3840, 5760])]
    assert (torch.cat(zs, 1) - z).abs().max() < 1e-5
    ys = [model.decode_step(z[:, a:b], dst) for a, b in chunks(6, [1, 2, 3])]
    assert (torch.cat(ys, -1) - y).abs().max() < 1e-5
    assert model.encode(xp, sample=True, generator=torch.Generator().manual_seed(0)).shape == z.shape
    for bad, msg in [(torch.randn(2, 100), r"\[B, 1, T\]"), (torch.zeros(1, 1, 0), "empty"),
                     (torch.full((1, 1, 1920), float("nan")), "NaN")]:
        with pytest.raises(ValueError, match=msg):
            model.encode(bad)
    for bad, msg in [(torch.randn(1, 3, 31), "latents must be"), (torch.randn(1, 0, 32), "latents must be"),
                     (torch.full((1, 2, 32), float("inf")), "NaN or Inf")]:
        with pytest.raises(ValueError, match=msg):
            model.decode(bad)
    with pytest.raises(ValueError, match="streams"):
        model.decode(z, model.init_state(3))
    with pytest.raises(ValueError, match="batch"):
        model.init_state(0)
