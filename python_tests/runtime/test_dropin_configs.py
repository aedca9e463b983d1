"""calm_fast.accelerate on the package's newer configs: each is built offline with random
weights (its own shapes, a locally trained tokenizer); the same seed, text and voice prompt
must give the package's audio through ``generate_audio``, and leave the global RNG where the
package leaves it. The 6-layer English model's own drop-in tests are in test_dropin.py."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.peer

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog"]
WORDS = ("hello world the quick brown fox jumps over a lazy dog and then some more text "
         "to say out loud in a sentence with numbers one two three").split()


def _peer(tmp, config):
    pytest.importorskip("pocket_tts")
    from pocket_fixtures import random_tts_model

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    model = random_tts_model(tmp, config=config, vocab_size=60, texts=lines)
    with torch.no_grad():
        model.flow_lm.out_eos.bias.fill_(-3.0)  # EOS after a few frames, not at once
    return model


@pytest.fixture(scope="module")
def voice():
    g = torch.Generator().manual_seed(3)
    t = torch.arange(24_000 * 2) / 24_000
    wav = 0.3 * torch.sin(2 * torch.pi * 180 * t) * (1 + 0.5 * torch.sin(5 * t))
    return (wav + 0.01 * torch.randn(wav.shape, generator=g))[None]


def _same_audio_and_rng(peer, voice):
    import calm_fast

    fast = calm_fast.accelerate(peer, max_streams=4, cache_mb=64)
    for text in TEXTS:
        torch.manual_seed(11)
        want = peer.generate_audio(peer.get_state_for_audio_prompt(voice), text)
        after_peer = torch.get_rng_state()
        torch.manual_seed(11)
        got = fast.generate_audio(fast.get_state_for_audio_prompt(voice), text)
        assert got.shape == want.shape and want.shape[0] > 6 * 1920, (got.shape, want.shape)
        assert want.abs().max() > 1e-3  # a silent peer would compare nothing
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(torch.get_rng_state(), after_peer)
    return fast


def test_drifting_head_gives_the_package_audio(tmp_path, voice):
    """english_drifting_26-09: a one-step head without time input (x = F(c, noise))."""
    peer = _peer(tmp_path, "english_drifting_26-09")
    assert peer.flow_lm.flow_type == "drifting" and peer.flow_lm.flow_net.num_time_conds == 0
    fast = _same_audio_and_rng(peer, voice)
    assert fast.engine.sched.head_steps == 1  # one step, whatever sampler_decode_steps says
