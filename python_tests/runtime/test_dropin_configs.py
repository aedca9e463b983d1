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
    from pocket_fixtures import voice_prompt

    return voice_prompt()


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


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    return _peer(tmp_path_factory.mktemp("drifting"), "english_drifting_26-09")


def test_drifting_head_gives_the_package_audio(drifting, voice):
    """english_drifting_26-09: a one-step head without time input (x = F(c, noise))."""
    peer = drifting
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
    from calm_fast.errors import ArgumentError

    # each VAE holds one side's weights only: the other side is refused, not run at random
    with pytest.raises(ArgumentError, match="only the decoder side"):
        fast.vae.encode(torch.zeros(1, 1, 1920))
    with pytest.raises(ArgumentError, match="only the encoder side"):
        fast.encoder.decode(torch.zeros(1, 2, 32))
    assert fast.engine.sched.head_steps == 1


@pytest.mark.parametrize("config", ["english_7m_2026-10", "english_7m_refl_2026-10",
                                    "english_2m_2026-10", "english_2m_refl_2026-10"])
def test_small_models_with_wide_attention_give_the_package_audio(tmp_path, voice, config):
    """The 7M (drifting) and 2M (pointwise) models: on top of the 18M ones' z_proj and
    decoder side, attention wider than d_model (attn_dim) with grouped K/V heads, a
    low-rank text table and (2M) a feed-forward narrower than d_model."""
    from calm_fast.model.wide_attention import WideAttentionConfig

    peer = _peer(tmp_path, config)
    t = peer.config.flow_lm.transformer
    assert t.attn_dim != t.d_model and peer.config.flow_lm.lookup_table.rank is not None
    fast = _same_audio_and_rng(peer, voice)
    c = fast.lm.cfg.backbone
    assert isinstance(c, WideAttentionConfig) and c.attn_dim == t.attn_dim
    assert (c.num_heads, c.kv_heads) == (t.num_heads, t.num_kv_heads)
    assert c.dim_feedforward == (t.dim_feedforward or t.d_model * t.hidden_scale)


def test_flow_matching_is_refused_by_name(drifting, monkeypatch):
    """A flow-matching head (Euler steps of a one-time head) has no engine path: refused
    in one line, not run as the consistency head its weights look like."""
    import calm_fast
    from calm_fast.errors import CheckpointError

    monkeypatch.setattr(drifting.flow_lm, "flow_type", "flow_matching")
    with pytest.raises(CheckpointError, match="flow type 'flow_matching' are not supported"):
        calm_fast.accelerate(drifting, max_streams=4, cache_mb=64)


def test_a_voice_exported_by_a_small_model_gives_its_audio(tmp_path, voice):
    """The package's exported voice state (its attention cache: 64-wide heads, one K/V head,
    under a 112-wide model) goes into the engine as is and gives the package's audio."""
    import calm_fast
    from pocket_tts.models.model_state import export_model_state

    peer = _peer(tmp_path, "english_2m_2026-10")
    fast = calm_fast.accelerate(peer, max_streams=4, cache_mb=64)
    path = tmp_path / "voice.safetensors"
    export_model_state(peer.get_state_for_audio_prompt(voice), path)
    torch.manual_seed(11)
    want = peer.generate_audio(peer.get_state_for_audio_prompt(path), TEXTS[1])
    after_peer = torch.get_rng_state()
    torch.manual_seed(11)
    got = fast.generate_audio(fast.get_state_for_audio_prompt(path), TEXTS[1])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), after_peer)


def test_the_doors_speak_a_small_model_with_a_voice_prompt(tmp_path, voice, monkeypatch):
    """`calm-fast tts`-level code on english_2m_2026-10 (a Mimi with its own decoder side,
    a pointwise head): from the package's object (``from_pocket_package``) and from the
    config name (``load_synth``, its files in the local hub cache), a voice prompt is
    encoded by the encoding VAE and frames decoded by the decoding one, with one head
    step; both routes give the same audio."""
    import soundfile as sf
    from safetensors.torch import save_file

    from calm_fast.serve import models
    from calm_fast.serve.commands import tts

    name = "english_2m_2026-10"
    peer = _peer(tmp_path, name)
    synth = models.from_pocket_package(peer)
    assert synth.encoder is not synth.vae and synth.head_steps == 1
    assert synth.eos_threshold == -1.0  # the config's default_eos_threshold, as the package
    sf.write(str(tmp_path / "me.wav"), voice[0].numpy(), 24_000)
    got = []
    for s in (synth, None):
        if s is None:  # the same weights as the package's model file, found by config name
            sd = {f"flow_lm.{k}": v for k, v in peer.flow_lm.state_dict().items()}
            sd.update({f"mimi.{k}": v for k, v in peer.mimi.state_dict().items()})
            save_file({k: v.detach().clone().contiguous() for k, v in sd.items()},
                      str(tmp_path / "model.safetensors"))
            files = {"model.safetensors": tmp_path / "model.safetensors",
                     "tokenizer.model": tmp_path / "spm60.model"}
            monkeypatch.setattr(models, "_hf_cached",
                                lambda url: files[url.split("@")[0].rsplit("/", 1)[1]])
            s = models.load_synth(name)
            assert s.encoder is not s.vae and s.head_steps == 1 and s.name == name
            assert s.eos_threshold == -1.0
        out = tmp_path / f"{len(got)}.wav"
        res = tts(s, "Hello world.", str(out), voice=str(tmp_path / "me.wav"), seed=0,
                  quiet=True)
        wav, sr = sf.read(str(out))
        assert sr == 24_000 and len(wav) >= 1920 and abs(wav).max() > 1e-3, res
        got.append(wav)
    assert got[0].shape == got[1].shape and abs(got[0] - got[1]).max() < 1e-4
