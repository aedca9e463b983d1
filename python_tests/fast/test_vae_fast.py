"""The VAE decoder on the fast CPU paths (calm_fast/fast/vae.py) against the pure-torch
reference (codec/vae.py): offline, streamed in uneven chunks, streams at different
positions, bounded cache, and the reference when forced or when gradients are wanted."""
import pytest
import torch

from calm_fast.codec.vae import VAE, vae_preset
from calm_fast.fast import vae as fast_vae


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VAE(vae_preset("tiny")).eval()


@torch.no_grad()
def test_fast_decode_equals_the_reference_offline_and_streamed(tiny):
    c = tiny.cfg
    assert fast_vae.applies(tiny)
    z = torch.randn(2, 9, c.latent_dim)
    want = tiny.decode(z)
    torch.testing.assert_close(fast_vae.decode(tiny, z), want, rtol=1e-4, atol=1e-5)
    st = tiny.init_state(2)
    got = torch.cat([fast_vae.decode(tiny, f, st) for f in torch.split(z, [1, 3, 2, 3], 1)], -1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    cache, ids = st.caches[tiny.decoder_transformer]  # only the window is kept
    assert all(cache.length(s) == tiny.decoder_transformer.context - 1 for s in ids)
    with pytest.raises(ValueError, match="fast path"):  # a state keeps to its path
        tiny.decode_step(z[:, :1], st)


@torch.no_grad()
def test_reference_when_forced(tiny, monkeypatch):
    monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    assert not fast_vae.applies(tiny)
    z = torch.randn(1, 3, tiny.cfg.latent_dim)
    st = tiny.init_state(1)
    want = tiny.decode(z, tiny.init_state(1))  # the reference, streamed the same way
    torch.testing.assert_close(fast_vae.decode(tiny, z, st), want, rtol=0, atol=0)
    assert not st.caches  # the reference kept its own (tensor) state


def test_autograd_runs_the_reference(tiny):
    z = torch.randn(1, 2, tiny.cfg.latent_dim, requires_grad=True)
    fast_vae.decode(tiny, z).sum().backward()
    assert z.grad is not None
