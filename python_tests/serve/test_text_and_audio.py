"""Text plans (sentence chunks, [pause:Ns], SSML <break>), the audio encoders, tempo, and
the service's chunk continuity (one decoder state through every chunk of a job)."""
import numpy as np
import pytest
import torch

from calm_fast.runtime.text_chunks import Pause, Say, plan, split_sentences
from serve_helpers import decode_audio, export_tiny


def test_plan_pauses_and_ssml():
    assert plan('Hello there. [pause:1.5s] How are you?<break time="300ms"/> Fine.') == [
        Say("Hello there."), Pause(1.5), Say("How are you?"), Pause(0.3), Say("Fine.")]
    assert plan("<speak><p>One.</p><break/><s>Two &amp; three.</s></speak>") == [
        Say("One."), Pause(0.5), Say("Two & three.")]
    assert plan('a [pause:200ms] [pause:0.3] b <break strength="strong"/>') == [
        Say("a"), Pause(0.5), Say("b"), Pause(0.8)]
    assert plan("   ") == [] and plan("[pause:1s]") == []
    with pytest.raises(ValueError, match="outside"):
        plan("hi [pause:11s]")
    with pytest.raises(ValueError, match="strength"):
        plan('hi <break strength="huge"/>')


def test_split_sentences_packs_and_cuts():
    assert split_sentences("One. Two! Three? Four.", 11) == ["One. Two!", "Three?", "Four."]
    long = "word " * 40
    parts = split_sentences(long, 30)
    assert all(len(p) <= 30 for p in parts) and " ".join(parts).split() == long.split()
    assert split_sentences("a\n\nb", 100) == ["a b"]


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_encoders_stream_and_decode(fmt):
    from calm_fast.serve.audio_out import encoder

    enc = encoder(fmt, 24000)
    x = (0.3 * np.sin(np.arange(24000) / 7)).astype(np.float32)
    data = b"".join(enc.write(x[i:i + 1920]) for i in range(0, len(x), 1920)) + enc.close()
    y, rate = decode_audio(data)
    assert abs(len(y) / rate - 1.0) < 0.1


def test_tempo_keeps_length_ratio():
    from calm_fast.serve.audio_out import Tempo

    t = Tempo(2.0, 16000)
    x = (0.3 * np.sin(np.arange(32000) / 7)).astype(np.float32)
    y = np.concatenate([t.process(x[i:i + 1600]) for i in range(0, len(x), 1600)] + [t.flush()])
    assert abs(len(y) - 16000) < 800
    with pytest.raises(ValueError, match="speed"):
        Tempo(5.0, 16000)


def test_chunks_continue_one_decoder_state(tmp_path):
    """Two sentence chunks decode through one VAE state: the audio equals decoding all the
    frames in one pass (no restart at the seam), and the second chunk continues the first."""
    from calm_fast.fast import vae as fast_vae
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.service import Job, Service

    p = export_tiny(tmp_path)
    synth = load_synth(p["lm"], vae=p["vae"])
    svc = Service(synth, max_streams=2, decode_frames=4).start()
    try:
        frames = []
        job = Job.speech(synth, "First one. Then two.", max_chars=12, seed=5,
                         max_seconds=1.0, eos_threshold=None)
        orig = svc._step

        def spy():  # keep the frames the engine made, in order
            evs = svc.engine.step
            def step():
                out = evs()
                frames.extend(e.latent for e in out if e.latent is not None)
                return out
            svc.engine.step = step
            svc._step = orig
            orig()
        svc._step = spy
        svc.submit(job)
        audio = np.concatenate([x for k, x in job.chunks(timeout=60) if k == "audio"])
        lat = synth.lm.denormalize(torch.stack(frames).float())
        with torch.no_grad():
            ref = fast_vae.decode(synth.vae, lat[None])[0, 0].numpy()
        assert len(audio) == len(ref) == 26 * 128
        np.testing.assert_allclose(audio, ref, atol=1e-4)
    finally:
        svc.close()


def test_jobs_in_one_voice_share_its_prefilled_prefix(tmp_path):
    """Jobs that name the same voice fork one Engine.share template (made once, LRU-kept)
    and make the same audio as when every job prefills its whole prefix."""
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.service import Job, Service

    p = export_tiny(tmp_path)
    synth = load_synth(p["lm"], vae=p["vae"])
    g = torch.Generator().manual_seed(0)
    voices = [torch.randn(6, synth.lm.cfg.latent_dim, generator=g) for _ in range(3)]

    def run(max_templates):
        svc = Service(synth, max_streams=4, max_templates=max_templates).start()
        try:
            jobs = [svc.submit(Job.speech(synth, f"Line {i}.", voice=voices[i % 3], seed=i,
                                          max_seconds=0.5, eos_threshold=None))
                    for i in range(5)]
            out = [np.concatenate([x for k, x in j.chunks(timeout=60) if k == "audio"])
                   for j in jobs]
            return out, svc
        finally:
            svc.close()

    shared, svc = run(2)
    alone, svc0 = run(0)
    assert len(svc.templates) == 2 and not svc0.templates  # LRU: the third was evicted
    for a, b in zip(shared, alone):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_overlap_delivers_the_same_outputs_in_the_same_order(tmp_path):
    """Service(overlap=True), the default: decoding on its own thread; each job gets the
    same outputs (audio chunks, pauses, then done) as with overlap=False, in order, with
    three jobs sharing two streams (one waits for a free slot)."""
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.service import Job, Service

    p = export_tiny(tmp_path)
    synth = load_synth(p["lm"], vae=p["vae"])
    texts = ["First one. [pause:0.2s] Then two.", "Another voice speaks here.", "Short."]
    got = {}
    for overlap in (False, True):
        svc = Service(synth, max_streams=2, decode_frames=4, overlap=overlap).start()
        try:
            jobs = [svc.submit(Job.speech(synth, t, max_chars=12, seed=i, max_seconds=1.0,
                                          eos_threshold=None)) for i, t in enumerate(texts)]
            got[overlap] = [list(j.chunks(timeout=60)) for j in jobs]
            assert svc.running == 0 and sorted(svc.free_slots) == [0, 1]
        finally:
            svc.close()
    for a, b in zip(got[False], got[True]):
        assert [k for k, _ in a] == [k for k, _ in b] and a[-1][0] == "done"
        assert "audio" in [k for k, _ in a]
        for (_, x), (_, y) in zip(a[:-1], b[:-1]):
            np.testing.assert_allclose(y, x, atol=1e-6)
