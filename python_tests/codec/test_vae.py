"""The causal VAE: offline == streaming, windowed attention, errors, Pocket TTS Mimi parity."""
import pytest
import torch

from calm_fast.errors import CheckpointError
from calm_fast.codec.vae import VAE, vae_preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VAE(vae_preset("tiny")).eval()


def chunks(x, n, dim):
    return torch.split(x, n, dim=dim)


@torch.no_grad()
def test_streaming_equals_offline_for_a_batch(tiny):
    c = tiny.cfg
    assert c.stride * 2 > c.context  # 3 frames overflow the attention window: trim is used
    wav = torch.randn(3, 1, c.frame_size * 7)
    z = tiny.encode(wav)
    st = tiny.init_state(3)
    zs = torch.cat([tiny.encode_step(w, st) for w in chunks(wav, c.frame_size, -1)], 1)
    torch.testing.assert_close(zs, z, rtol=1e-5, atol=1e-5)
    y = tiny.decode(z)
    assert y.shape == (3, 1, c.frame_size * 7)
    st = tiny.init_state(3)
    ys = torch.cat([tiny.decode_step(f, st) for f in chunks(z, 1, 1)], -1)
    torch.testing.assert_close(ys, y, rtol=1e-5, atol=1e-5)
    st = tiny.init_state(3)  # chunks of several frames too
    ys = torch.cat([tiny.decode_step(f, st) for f in chunks(z, 3, 1)], -1)
    torch.testing.assert_close(ys, y, rtol=1e-5, atol=1e-5)
    # the state keeps only the window: bounded memory for endless streams
    k = st.tensors[(tiny.decoder_transformer, "k")]
    assert k.shape[:3] == (3, tiny.decoder_transformer.transformer.cfg.num_layers, c.context - 1)
    assert st.tensors[(tiny.decoder_transformer, "n")].tolist() == [c.context - 1] * 3


@torch.no_grad()
def test_causality_and_padding(tiny):
    c = tiny.cfg
    wav = torch.randn(1, 1, c.frame_size * 4)
    other = wav.clone()
    other[..., -10:] += 1.0
    a, b = tiny.encode(wav), tiny.encode(other)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # the future does not leak
    assert tiny.encode(wav[..., :c.frame_size * 3 + 5]).shape[1] == 4  # partial frame kept


@torch.no_grad()
def test_posterior_sampling_and_kl(tiny):
    wav = torch.randn(2, 1, tiny.cfg.frame_size * 2)
    mean, logvar = tiny.posterior(wav)
    torch.testing.assert_close(logvar, torch.zeros_like(logvar))  # init: unit variance
    g = torch.Generator().manual_seed(0)
    s = tiny.encode(wav, sample=True, generator=g)
    assert (s - mean.transpose(1, 2)).std() > 0.5
    recon, kl, _ = tiny(wav, generator=g)
    assert recon.shape == wav.shape and kl.item() == pytest.approx(0.5 * (mean ** 2).mean().item())


def test_bad_inputs(tiny):
    c = tiny.cfg
    for wav, msg in [(torch.randn(1, c.frame_size), r"\[B, 1, T\]"),
                     (torch.randn(1, 2, c.frame_size), r"\[B, 1, T\]"),
                     (torch.randn(1, 1, 0), "empty"),
                     (torch.full((1, 1, c.frame_size), float("nan")), "NaN")]:
        with pytest.raises(ValueError, match=msg):
            tiny.encode(wav)
    with pytest.raises(ValueError, match="whole frames"):
        tiny.encode_step(torch.randn(1, 1, c.frame_size + 1), tiny.init_state(1))
    with pytest.raises(ValueError, match="latents must be"):
        tiny.decode(torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="2 streams"):
        tiny.decode_step(torch.randn(1, 1, 8), tiny.init_state(2))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae_preset("huge")


def test_presets():
    p = vae_preset("paper_speech")
    assert p.hop == 1920 and p.stride == 1 and p.encoder_layers == 8
    m = vae_preset("music")
    assert (m.sample_rate, m.frame_rate, m.latent_dim, m.hop) == (32000, 25.0, 128, 1280)
    VAE(vae_preset("paper_speech"))  # builds with a stride of 1 (no resampling conv)


# -- Pocket TTS Mimi parity --------------------------------------------------------------------
@pytest.fixture(scope="module")
def peer_mimi():
    pytest.importorskip("pocket_tts")
    from importlib.resources import files

    from pocket_tts.models.mimi import build_mimi
    from pocket_tts.modules.stateful_module import StatefulModule
    from pocket_tts.utils.config import load_config

    cfg = load_config(files("pocket_tts") / "config" / "english.yaml")
    torch.manual_seed(0)
    mimi = build_mimi(cfg.mimi).eval()
    with torch.no_grad():
        for p in mimi.parameters():
            p.mul_(1.0 + 0.1 * torch.randn_like(p))
    for name, mod in mimi.named_modules():
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    return mimi


@pytest.mark.peer
@torch.no_grad()
def test_pocket_mimi_parity(peer_mimi, tmp_path):
    from pocket_tts.modules.stateful_module import increment_steps, init_states
    from safetensors.torch import save_file

    from calm_fast.codec.mimi import load_pocket_mimi

    path = tmp_path / "tts.safetensors"
    save_file({f"mimi.{k}": v.contiguous() for k, v in peer_mimi.state_dict().items()}, str(path))
    ours = load_pocket_mimi(path)
    torch.manual_seed(1)
    wav = 0.1 * torch.randn(2, 1, 1920 * 3 + 700)
    want = peer_mimi.encode_to_latent(wav)
    torch.testing.assert_close(ours.encode(wav), want, rtol=1e-4, atol=1e-5)
    lat = torch.randn(2, 4, 32)
    state = init_states(peer_mimi, batch_size=2, sequence_length=256)
    st = ours.init_state(2)
    for i in range(4):
        w = peer_mimi.decode_from_latent(lat[:, i:i + 1], state)
        increment_steps(peer_mimi, state, increment=16)
        torch.testing.assert_close(ours.decode_step(lat[:, i:i + 1], st), w, rtol=1e-4, atol=1e-5)


@pytest.mark.peer
def test_bad_mimi_checkpoints(peer_mimi, tmp_path):
    from calm_fast.codec.mimi import load_pocket_mimi

    sd = dict(peer_mimi.state_dict())
    sd.pop("quantizer.output_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \['quantizer.output_proj.weight'\]"):
        load_pocket_mimi(sd)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_pocket_mimi(peer_mimi.state_dict(), vae_preset("tiny"))
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_pocket_mimi(tmp_path / "x.safetensors")


@pytest.mark.parametrize("groups,T", [(1, 5), (1, 400), (16, 5)])
def test_transposed_conv_fast_paths_equal_torch(groups, T):
    from calm_fast.codec.vae import CausalConvTranspose

    torch.manual_seed(0)
    m = CausalConvTranspose(16, 16, 8, 4, groups=groups, bias=groups == 1)
    x = torch.randn(2, 16, T)
    with torch.no_grad():
        want = m.convtr(x)[..., :-4]
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_streamed_chunks_longer_than_the_first_one(tiny):
    """The windowed Transformer's cache is sized by a state's first call; a later, longer
    chunk is processed in pieces and decodes exactly as offline."""
    z = torch.randn(2, 9, tiny.cfg.latent_dim)
    want = tiny.decode(z)
    st = tiny.init_state(2)
    ys = [tiny.decode_step(z[:, :1], st), tiny.decode_step(z[:, 1:9], st)]
    torch.testing.assert_close(torch.cat(ys, -1), want, rtol=1e-5, atol=1e-5)
