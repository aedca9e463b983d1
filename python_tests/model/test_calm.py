"""The CALM module: presets, prefix layout, training forward, VP noise, errors."""
import pytest
import torch

from calm_fast.errors import CheckpointError
from calm_fast.model.weights import load_weights
from calm_fast.model.config import preset
from calm_fast.model.calm import CALM
from golden import perturbed


@pytest.fixture(scope="module")
def tts():
    torch.manual_seed(0)
    return perturbed(CALM(preset("tiny")))


def test_presets_have_the_published_shapes():
    p = preset("pocket")
    b = p.backbone
    assert (b.d_model, b.num_layers, b.num_heads, b.dim_feedforward) == (1024, 6, 16, 4096)
    assert (p.head.width, p.head.depth, p.head.kind) == (512, 6, "lsd")
    assert (p.latent_dim, p.text_bins, p.frame_rate) == (32, 4000, 12.5)
    assert preset("paper_tts").backbone.num_layers == 24
    m = preset("music")
    assert m.short_context is not None and m.short_context.context == 10 and m.vp_noise
    assert m.head.kind == "consistency"
    n = sum(p.numel() for p in CALM(preset("pocket")).parameters())
    assert 85e6 < n < 95e6  # the flow LM of the "100M-parameter" Pocket TTS (Mimi is the rest)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_prefix_layout(tts):
    voice = torch.randn(3, 8)
    tokens = torch.tensor([5, 6])
    p = tts.prefix(voice=voice, tokens=tokens)
    assert p.shape == (1 + 3 + 2, 64)
    torch.testing.assert_close(p[0], tts.bos_before_voice[0, 0])
    torch.testing.assert_close(p[1:4], voice @ tts.speaker_proj_weight.t())
    torch.testing.assert_close(p[4:], tts.conditioner.embed.weight[[5, 6]])
    torch.testing.assert_close(tts.null_prefix(), p[:1])


def test_prefix_errors(tts):
    with pytest.raises(ValueError, match="voice prompt must be"):
        tts.prefix(voice=torch.randn(3, 5))
    with pytest.raises(ValueError, match="empty"):
        tts.prefix(voice=torch.randn(0, 8))
    with pytest.raises(ValueError, match="NaN"):
        tts.prefix(voice=torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="empty text"):
        tts.prefix(tokens=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="no music tags"):
        tts.prefix(tags=["genre:jazz"])
    with pytest.raises(ValueError, match="does not fit the context"):
        tts.prefix(tokens=torch.zeros(600, dtype=torch.long))
    music = CALM(preset("tiny_music"))
    with pytest.raises(ValueError, match="no voice"):
        music.prefix(voice=torch.randn(2, 8))


def test_forward_with_left_padded_ragged_prefixes(tts):
    a, b = tts.prefix(tokens=torch.arange(2)), tts.prefix(tokens=torch.arange(5))
    lat = torch.randn(2, 4, 8)
    pre = torch.zeros(2, 6, 64)
    pre[0, 3:], pre[1] = a, b
    mask = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    with torch.no_grad():
        z, eos = tts(lat, pre, mask)
        za, ea = tts(lat[:1], a[None])
        zb, _ = tts(lat[1:], b[None])
    torch.testing.assert_close(z[0], za[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[1], zb[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eos[0], ea[0], rtol=1e-5, atol=1e-5)


def test_vp_noise_only_in_training_and_only_where_enabled():
    torch.manual_seed(0)
    music = perturbed(CALM(preset("tiny_music")))
    pre = music.prefix(tags=["genre:jazz"])[None]
    lat = torch.randn(1, 6, 8)
    with torch.no_grad():
        clean = music(lat, pre)[0]
        music.train()
        noisy = music(lat, pre, generator=torch.Generator().manual_seed(1))[0]
        music.eval()
    torch.testing.assert_close(noisy[:, 0], clean[:, 0])  # BOS input is never noised
    assert (noisy[:, 1:] - clean[:, 1:]).abs().max() > 1e-3
    torch.manual_seed(0)
    tts = perturbed(CALM(preset("tiny")))  # vp_noise off
    with torch.no_grad():
        e = tts(lat, tts.null_prefix()[None])[0]
        tts.train()
        t = tts(lat, tts.null_prefix()[None])[0]
    torch.testing.assert_close(e, t)


def test_normalisation_round_trip(tts):
    with torch.no_grad():
        tts.emb_std.uniform_(0.5, 2)
        tts.emb_mean.normal_()
    x = torch.randn(4, 8)
    torch.testing.assert_close(tts.denormalize(tts.normalize(x)), x)


def test_forward_errors(tts):
    pre = tts.null_prefix()[None]
    with pytest.raises(ValueError, match=r"\[..., frames, 8\]"):
        tts(torch.randn(1, 4, 7), pre)
    with pytest.raises(ValueError, match="NaN"):
        tts(torch.full((1, 4, 8), float("nan")), pre)
    with pytest.raises(ValueError, match="prefix holds NaN"):
        tts(torch.randn(1, 4, 8), torch.full((1, 1, 64), float("inf")))
    with pytest.raises(ValueError, match="exceed the context"):
        tts(torch.randn(1, 600, 8), pre)
    with pytest.raises(ValueError, match="share B"):
        tts(torch.randn(2, 4, 8), pre)


def test_load_weights_lists_bad_keys(tts):
    sd = dict(tts.state_dict())
    sd.pop("bos_emb")
    sd["stray"] = torch.zeros(1)
    sd["out_eos.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        load_weights(CALM(preset("tiny")), sd)
    msg = str(e.value)
    assert "missing keys ['bos_emb']" in msg and "unexpected keys ['stray']" in msg
    assert "out_eos.weight: (3, 3) vs (1, 64)" in msg


def test_a_model_without_a_bos_row_before_the_voice():
    """english_2026-01's layout: the prefix starts at the voice (of voice_dim features),
    an empty prefix or latent CFG's null prefix are refused by name."""
    m = CALM(preset("tiny").with_(bos_before_voice=False, voice_dim=12))
    assert "bos_before_voice" not in m.state_dict()
    assert m.speaker_proj_weight.shape == (64, 12)
    v = torch.randn(3, 12)
    torch.testing.assert_close(m.prefix(voice=v), v @ m.speaker_proj_weight.t())
    assert m.prefix(voice=v, tokens=torch.tensor([1, 2])).shape == (5, 64)
    with pytest.raises(ValueError, match=r"voice prompt must be \[frames, 12\]"):
        m.prefix(voice=torch.randn(3, 8))
    with pytest.raises(ValueError, match="no BOS row before the voice: give a voice"):
        m.prefix()
    with pytest.raises(ValueError, match="no unconditioned prefix for latent CFG"):
        m.null_prefix()
