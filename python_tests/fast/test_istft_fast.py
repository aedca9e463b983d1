"""fast/istft.py against the iSTFT VAE reference: offline, streamed in uneven chunks, a state
handed between the two paths, through DecodeSlots, and the fallbacks."""
import pytest
import torch

from calm_fast.codec.istft import ISTFTVAE, ISTFTVAEConfig
from calm_fast.fast import istft as fast_istft
from calm_fast.fast import vae as fast_vae
from calm_fast.runtime.decode_slots import DecodeSlots


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    m = ISTFTVAE(ISTFTVAEConfig(enc_dim=64, dec_dim=64, dec_blocks=3, enc_blocks_low=1,
                                mlp_mult=2)).eval()
    for mod in m.modules():
        if hasattr(mod, "gamma"):
            mod.gamma.data.fill_(0.5)
    return m


def close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@torch.no_grad()
def test_offline_equals_reference(vae):
    z = torch.randn(3, 9, 32)
    assert fast_istft.applies(vae, z)
    assert close(fast_istft.decode(vae, z), vae.decode(z))
    assert close(fast_vae.decode(vae, z), vae.decode(z))  # the one dispatch point


@torch.no_grad()
def test_streaming_in_uneven_chunks_and_mixed_paths(vae):
    z = torch.randn(2, 11, 32)
    ref = vae.decode(z)
    st = vae.init_state(2)
    outs, a = [], 0
    for i, n in enumerate([1, 3, 2, 1, 4]):
        step = fast_istft.decode if i % 2 == 0 else vae.decode  # the state is shared
        outs.append(step(vae, z[:, a:a + n], st) if step is fast_istft.decode
                    else step(z[:, a:a + n], st))
        a += n
    assert close(torch.cat(outs, -1), ref)


@torch.no_grad()
def test_decode_slots_use_it(vae):
    slots = DecodeSlots(vae, 4, max_frames_per_call=2)
    z = torch.randn(2, 6, 32)
    ref = vae.decode(z)
    slots.open(1)
    slots.open(3)
    got = [slots.decode([1, 3], z[:, j:j + 2]) for j in range(0, 6, 2)]
    assert close(torch.cat(got, -1), ref)


def test_falls_back_with_grad_and_on_other_dtypes(vae, monkeypatch):
    z = torch.randn(1, 2, 32)
    assert not fast_istft.applies(vae, z.double())
    with torch.enable_grad():
        assert not fast_istft.applies(vae, z)
    monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    assert not fast_istft.applies(vae, z)
    with torch.no_grad():
        assert close(fast_istft.decode(vae, z), vae.decode(z))
    with pytest.raises(ValueError, match="streams"):
        monkeypatch.delenv("CALM_FAST_FORCE_REF")
        fast_istft.decode(vae, z, vae.init_state(2))
    with pytest.raises(ValueError, match="latents must be"):
        fast_istft.decode(vae, torch.randn(1, 2, 31))
