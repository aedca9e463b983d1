"""calm_fast.runtime.tts (text + voice audio -> audio from exported models) and calm_fast.evaluate
(WER, and the bundled whisper ASR on real engine speech)."""
import shutil

import pytest
import torch

from calm_fast.model.conditioning import ByteTokenizer
from calm_fast.model.config import preset
from calm_fast.evaluate import normalize_text, wer, word_errors
from calm_fast.runtime.export import export_model, load_model
from calm_fast.model.calm import CALM
from calm_fast.runtime.tts import TTS
from calm_fast.codec.vae import VAE, vae_preset


@pytest.fixture(scope="module")
def tiny_tts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tts")
    torch.manual_seed(0)
    lm = CALM(preset("tiny").with_(text_bins=256), ByteTokenizer())
    vae = VAE(vae_preset("tiny"))
    export_model(d / "lm.safetensors", lm)
    export_model(d / "vae.safetensors", vae)
    return TTS.from_files(d / "lm.safetensors", d / "vae.safetensors"), lm, vae


def test_batch_equals_one_by_one_and_lengths_follow_frames(tiny_tts):
    tts, lm, vae = tiny_tts
    voice = 0.3 * torch.sin(torch.arange(1600) / 5.0)[None]  # 1 s at the tiny VAE's 1.6 kHz
    texts = ["hello there", "a much longer sentence to say", "ok"]
    kw = dict(voice=voice, max_seconds=1.2, seed=3, eos_threshold=0.0)
    batch = tts.synthesize(texts, **kw)
    for i, t in enumerate(texts):  # request i uses seed + i
        one = tts.synthesize([t], **{**kw, "seed": 3 + i})[0]
        assert batch[i].shape == one.shape
        torch.testing.assert_close(batch[i], one, rtol=1e-4, atol=1e-5)
    assert all(len(w) % vae.cfg.frame_size == 0 for w in batch)
    assert len({len(w) for w in batch}) > 1  # EOS at different frames: the cut is per stream


def test_exported_models_round_trip(tiny_tts, tmp_path):
    _, lm, vae = tiny_tts
    for m, kind in ((lm, "calm"), (vae, "vae")):
        export_model(tmp_path / f"{kind}.safetensors", m)
        back = load_model(tmp_path / f"{kind}.safetensors", expect=kind)
        assert back.cfg == m.cfg
        for k, v in m.state_dict().items():
            torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds a calm model, expected a vae"):
        load_model(tmp_path / "calm.safetensors", expect="vae")


def test_tts_errors(tiny_tts):
    tts, lm, vae = tiny_tts
    with pytest.raises(ValueError, match="no text"):
        tts.synthesize([])
    with pytest.raises(ValueError, match="empty text"):
        tts.synthesize(["   "])
    with pytest.raises(ValueError, match="shorter than one frame"):
        tts.synthesize(["hi"], voice=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="voice audio must be"):
        tts.synthesize(["hi"], voice=torch.zeros(2, 1600))
    with pytest.raises(FileNotFoundError):
        tts.synthesize(["hi"], voice="/nonexistent.wav")
    other = CALM(preset("tiny").with_(latent_dim=4, text_bins=256), ByteTokenizer())
    with pytest.raises(ValueError, match="4-dim latents, the VAE takes 8"):
        TTS(other, vae)


def test_word_error_rate():
    assert normalize_text("Hello, World-wide  it's 3 PM!") == "hello world wide it's pm"
    assert word_errors("the cat sat", "the cat sat") == (0, 3)
    assert word_errors("the cat sat", "the bat sat on") == (2, 3)  # 1 sub + 1 ins
    assert word_errors("the cat sat", "") == (3, 3)
    assert wer(["a b c d", "e f"], ["a b c d", "x"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        wer(["a"], [])
    with pytest.raises(ValueError, match="no words"):
        wer(["..."], ["a"])


@pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed")
def test_whisper_transcribes_engine_speech():
    pytest.importorskip("faster_whisper")
    from calm_fast.data.speech import Speaker, SAMPLE_RATE, synthesize
    from calm_fast.evaluate import WhisperASR

    text = "The quick brown fox jumps over the lazy dog."
    wav = torch.from_numpy(synthesize(Speaker("flite-slt", "flite", "slt"), text))
    asr = WhisperASR(threads=2)
    hyp = asr.transcribe(wav, SAMPLE_RATE)
    assert wer([text], [hyp]) <= 0.2, hyp
    assert wer([text], [asr.transcribe(0.01 * torch.randn(SAMPLE_RATE), SAMPLE_RATE)]) > 0.8
