"""``CALM_FAST_FORCE_REF=1`` reaches every fast path: text -> audio (engine with the VAE
decoder, and the TTS pipeline) then calls no C++ function and no Triton launcher, and gives
the fast path's audio within float tolerance."""
import pytest
import torch

from calm_fast.codec.vae import VAE, vae_preset
from calm_fast.fast import ops
from calm_fast.kernels import fused_head, paged_attention, short_context_step
from calm_fast.model.calm import CALM
from calm_fast.model.conditioning import ByteTokenizer
from calm_fast.model.config import preset
from calm_fast.runtime.engine import Engine
from calm_fast.runtime.scheduler import Request
from calm_fast.runtime.tts import TTS

LAUNCHERS = [(fused_head, "head_triton"), (paged_attention, "paged_decode_attention_triton"),
             (short_context_step, "ring_attention_triton")]


class Recorder:
    """Stands in for ``calm_fast._C``: every function or class taken from it is counted."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*a, **k):
            self.calls.append(name)
            return attr(*a, **k)
        return call


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    lm = CALM(preset("tiny").with_(text_bins=256), ByteTokenizer()).eval()
    vae = VAE(vae_preset("tiny")).eval()
    return lm, vae


def text_to_audio(lm, vae):
    voice = 0.3 * torch.sin(torch.arange(1600) / 5.0)[None]
    with torch.no_grad():
        v = vae.encode(vae.pad(voice[None]))[0]
    eng = Engine(lm, num_blocks=64, max_streams=4, vae=vae, decode_frames=4)
    for i, text in enumerate(["hello there", "ok"]):
        eng.submit(Request(lm.prefix(text=text, voice=v), 9, seed=i, cfg_scale=1.5,
                           eos_threshold=None))
    audio = {}
    for ev in eng.run():
        if ev.audio is not None:
            audio.setdefault(ev.request, []).append(ev.audio)
    engine_wav = [torch.cat(audio[k], -1) for k in sorted(audio)]
    tts = TTS(lm, vae)
    tts_wav = tts.synthesize(["hello there"], voice=voice, max_seconds=0.8, eos_threshold=None)
    return engine_wav + tts_wav


def test_forced_reference_calls_no_kernel_and_matches_the_fast_path(models, monkeypatch):
    if ops._C is None:
        pytest.skip("calm_fast._C not built: there is no fast path to compare")
    rec = Recorder(ops._C)
    monkeypatch.setattr(ops, "_C", rec)
    launched = []
    for mod, name in LAUNCHERS:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k:
                            launched.append(_n) or _r(*a, **k))
    fast = text_to_audio(*models)
    # the wrappers see the fast path (so the check below can fail)
    assert {"linear", "decode_step", "KVManager", "conv_rows"} <= set(rec.calls)
    rec.calls.clear()
    monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    ref = text_to_audio(*models)
    assert rec.calls == [] and launched == []
    assert len(ref) == len(fast) == 3
    for a, b in zip(ref, fast):
        assert a.shape == b.shape and a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
