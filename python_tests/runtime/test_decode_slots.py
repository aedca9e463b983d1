"""DecodeSlots: streams that join and leave at any frame, decoded as one batch."""
import pytest
import torch

from calm_fast.codec.vae import VAE, vae_preset


@pytest.mark.parametrize("force_ref", [False, True])
def test_decode_slots_join_and_leave_equal_offline_decode(force_ref, monkeypatch):
    """Streams that start at different frames, decoded together one frame at a time through
    DecodeSlots (past the attention window), equal each stream's offline decode, on the
    fast path and on the forced reference."""
    if force_ref:
        monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    from calm_fast.runtime.decode_slots import DecodeSlots

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny")).eval()
    C = vae.cfg.latent_dim
    starts, lengths = [0, 2, 5], [9, 6, 4]  # window 12 rows = 6 frames: all pass it
    lat = [torch.randn(1, L, C) for L in lengths]
    with torch.no_grad():
        ref = [vae.decode(x)[0] for x in lat]
    slots = DecodeSlots(vae, 4)
    got = [[] for _ in lat]
    for t in range(12):
        live = [k for k in range(3) if starts[k] <= t < starts[k] + lengths[k]]
        for k in live:
            if t == starts[k]:
                slots.open(k + 1)  # slots need not match stream order
        if live:
            out = slots.decode([k + 1 for k in live],
                               torch.cat([lat[k][:, t - starts[k]:t - starts[k] + 1] for k in live]))
            for j, k in enumerate(live):
                got[k].append(out[j])
        for k in live:
            if t == starts[k] + lengths[k] - 1:
                slots.close(k + 1)
    for k in range(3):
        torch.testing.assert_close(torch.cat(got[k], -1), ref[k], rtol=1e-4, atol=1e-5)
    assert slots.open_slots == []
    assert (slots.cache is None) == force_ref
    if slots.cache is not None:
        assert slots.cache.manager.num_streams == 0
    with pytest.raises(ValueError, match="open slots"):
        slots.decode([0], torch.randn(1, 1, C))
