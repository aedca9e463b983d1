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
    with torch.no_grad():  # EOS after a few frames, not at once (nor never)
        model.flow_lm.out_eos.bias.fill_(model.eos_threshold + 1.0)
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
    torch.manual_seed(12)  # the audio does depend on the draws: the comparison is not vacuous
    other = fast.generate_audio(fast.get_state_for_audio_prompt(voice), text)
    n = min(len(other), len(got))
    assert (other[:n] - got[:n]).abs().max() > 1e-3
    return fast


def test_drifting_head_gives_the_package_audio(tmp_path, voice):
    """english_drifting_26-09: a one-step head without time input (x = F(c, noise))."""
    peer = _peer(tmp_path, "english_drifting_26-09")
    assert peer.flow_lm.flow_type == "drifting" and peer.flow_lm.flow_net.num_time_conds == 0
    fast = _same_audio_and_rng(peer, voice)
    assert fast.engine.sched.head_steps == 1  # one step, whatever sampler_decode_steps says


@pytest.mark.parametrize("config", ["english_18m_2026-10", "english_18m_refl_2026-10"])
def test_z_space_drifting_models_with_their_own_decoder_give_the_package_audio(
        tmp_path, voice, config):
    """The 18M models: a drifting head and EOS layer reading a 64-dim z_proj of the
    backbone, and a Mimi whose decoder side has its own SEANet and Transformer shapes."""
    peer = _peer(tmp_path, config)
    assert peer.flow_lm.z_proj is not None and peer.config.mimi.decoder_seanet is not None
    fast = _same_audio_and_rng(peer, voice)
    assert fast.vae is not fast.encoder
    assert fast.vae.cfg.dimension == peer.config.mimi.decoder_seanet.dimension
    assert fast.engine.sched.head_steps == 1


@pytest.mark.parametrize("config", ["english_7m_2026-10", "english_7m_refl_2026-10",
                                    "english_2m_2026-10", "english_2m_refl_2026-10"])
def test_attention_wider_than_the_model_is_refused_by_name(tmp_path, config):
    """The 7M and 2M models attend at a width (attn_dim) other than d_model, which calm_fast's
    Transformer does not express: accelerate() says so in one line instead of running them."""
    import calm_fast
    from calm_fast.errors import CheckpointError

    peer = _peer(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"attention width \(attn_dim \d+\) differs "
                                              r"from d_model \d+ are not supported"):
        calm_fast.accelerate(peer, max_streams=4, cache_mb=64)
