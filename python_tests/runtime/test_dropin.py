"""calm_fast.accelerate: the pocket-tts TTSModel drop-in. The package's own model is built
offline with random weights (english.yaml shapes, a locally trained tokenizer); the same
seed must give the package's audio, and the global RNG must end where the package leaves it."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    pytest.importorskip("pocket_tts")
    from pocket_fixtures import random_tts_model

    words = ("hello world the quick brown fox jumps over a lazy dog and then some more text "
             "to say out loud in a sentence with numbers one two three").split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    model = random_tts_model(tmp_path_factory.mktemp("pocket"), vocab_size=60, texts=lines)
    with torch.no_grad():
        model.flow_lm.out_eos.bias.fill_(-3.0)  # EOS after a few frames, not at once
    return model


@pytest.fixture(scope="module")
def fast(peer):
    import calm_fast

    return calm_fast.accelerate(peer, max_streams=4, cache_mb=64)


@pytest.fixture(scope="module")
def voice():
    from pocket_fixtures import voice_prompt

    return voice_prompt()


def assert_package_audio(peer, fast, voice):
    """Each text, same seed: the package's audio, and the global RNG left where it leaves it."""
    for text in TEXTS:
        torch.manual_seed(11)
        want = peer.generate_audio(peer.get_state_for_audio_prompt(voice), text)
        after_peer = torch.rand(3)
        torch.manual_seed(11)
        got = fast.generate_audio(fast.get_state_for_audio_prompt(voice), text)
        after_ours = torch.rand(3)
        assert got.shape == want.shape and want.shape[0] > 6 * 1920
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(after_ours, after_peer, rtol=0, atol=0)


def test_same_seed_same_audio_and_rng(peer, fast, voice):
    assert_package_audio(peer, fast, voice)


def test_overlap_gives_the_package_audio_and_rng(peer, voice):
    """accelerate(overlap=True): the decoder on its own thread and core; the same audio and
    RNG as the package, a stream closed after its first chunk leaves nothing behind."""
    import calm_fast

    fast = calm_fast.accelerate(peer, max_streams=2, cache_mb=64, overlap=True)
    threads = torch.get_num_threads()
    assert_package_audio(peer, fast, voice)
    assert torch.get_num_threads() == threads
    state = fast.get_state_for_audio_prompt(voice)
    it = fast.generate_audio_stream(state, TEXTS[1])
    next(it)
    it.close()
    assert fast.engine.running == 0 and fast.engine.queue_depth == 0
    torch.manual_seed(5)
    chunks = list(fast.generate_audio_stream(state, TEXTS[1]))
    assert [len(c) // 1920 for c in chunks][:3] == [1, 2, 4]
    fast.engine._worker.sync()
    assert fast.engine.decoder.open_slots == []


def test_stream_chunks_and_batch_call(fast, voice):
    state = fast.get_state_for_audio_prompt(voice)
    torch.manual_seed(5)
    chunks = list(fast.generate_audio_stream(state, TEXTS[1]))
    assert all(c.dim() == 1 for c in chunks) and len(chunks) > 1
    # decode_frames=8 (the default): chunks of 1, 2, 4, then 8 frames of 1920 samples (the
    # last one: what is left)
    frames = [len(c) // 1920 for c in chunks]
    assert all(len(c) % 1920 == 0 for c in chunks), frames
    assert frames[:-1] == [min(2 ** i, 8) for i in range(len(frames) - 1)], frames
    assert 1 <= frames[-1] <= min(2 ** (len(frames) - 1), 8), frames
    torch.manual_seed(5)
    whole = fast.generate_audio(state, TEXTS[1])
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=0)
    # a caller that stops reading after the first chunk: the request leaves the engine (it
    # would otherwise run on under the next call), and the next call is unaffected
    it = fast.generate_audio_stream(state, TEXTS[1])
    next(it)
    it.close()
    assert fast.engine.running == 0 and fast.engine.queue_depth == 0
    torch.manual_seed(5)
    torch.testing.assert_close(fast.generate_audio(state, TEXTS[1]), whole, rtol=0, atol=0)
    batch = fast.generate_audio_batch(state, TEXTS, seed=7)
    assert len(batch) == 2 and all(len(b) > 0 and torch.isfinite(b).all() for b in batch)
    # request i of a batch draws from seed + i: alone, with that seed, it is the same audio
    again = fast.generate_audio_batch(state, TEXTS[1:], seed=8)
    torch.testing.assert_close(batch[1], again[0], rtol=1e-4, atol=1e-5)
    assert fast.engine.running == 0 and fast.engine.queue_depth == 0
    with pytest.raises(ValueError, match="chunks"):  # the second text is too long: nothing
        fast.generate_audio_batch(state, [TEXTS[0], " ".join([TEXTS[1]] * 9)])  # stays queued
    assert fast.engine.running == 0 and fast.engine.queue_depth == 0
    # the voice state keeps its prefilled rows in the engine (as the package's state keeps
    # its KV cache) until it is dropped
    import gc

    free = fast.engine.cache.manager.num_free_blocks
    del state
    gc.collect()
    assert fast.engine.cache.manager.num_free_blocks > free


def test_errors(fast, peer):
    import calm_fast

    with pytest.raises(TypeError, match="TTSModel"):
        calm_fast.accelerate(object())
    with pytest.raises(TypeError, match="get_state_for_audio_prompt"):
        fast.generate_audio({"not": "ours"}, "Hi.")
    with pytest.raises(ValueError):
        fast.generate_audio(VoiceStateLike(fast), "   ")
    with pytest.raises(ValueError, match="non-empty"):
        fast.get_state_for_audio_prompt(torch.zeros(1, 0))


def VoiceStateLike(fast):
    from calm_fast.runtime.dropin import VoiceState

    return VoiceState(fast.lm.prefix())


# -- bad inputs: each call is refused with a calm_fast error that names what to fix -----------
def _dropin_cases(tmp):
    from calm_fast.errors import ArgumentError, ArgumentTypeError, AudioError

    (tmp / "junk.wav").write_bytes(b"RIFF not really a wav file")
    nan = torch.full((1, 2400), float("nan"))
    return [  # (name, call(fast, state), error class, words)
        ("accelerate None", lambda f, s: __import__("calm_fast").accelerate(None),
         ArgumentTypeError, ["TTSModel", "NoneType"]),
        ("accelerate cache_mb", lambda f, s: type(f)(f.peer, cache_mb=-1), ArgumentError,
         ["cache_mb", "-1"]),
        ("text int", lambda f, s: f.generate_audio(s, 123), ArgumentTypeError,
         ["text_to_generate", "int"]),
        ("text empty", lambda f, s: f.generate_audio(s, "  "), ArgumentError, ["empty"]),
        ("state None", lambda f, s: f.generate_audio(None, "hi"), ArgumentTypeError,
         ["get_state_for_audio_prompt", "NoneType"]),
        ("max_tokens float", lambda f, s: f.generate_audio(s, "hi", max_tokens=2.5),
         ArgumentTypeError, ["max_tokens", "2.5"]),
        ("frames_after_eos", lambda f, s: f.generate_audio(s, "hi", frames_after_eos=-1),
         ArgumentError, ["frames_after_eos", "-1"]),
        ("copy_state str", lambda f, s: f.generate_audio(s, "hi", copy_state="x"),
         ArgumentTypeError, ["copy_state", "str"]),
        ("stream text None", lambda f, s: next(f.generate_audio_stream(s, None)),
         ArgumentTypeError, ["text_to_generate"]),
        ("batch texts str", lambda f, s: f.generate_audio_batch(s, "hi"), ArgumentTypeError,
         ["texts", "list"]),
        ("prompt NaN", lambda f, s: f.get_state_for_audio_prompt(nan), ArgumentError,
         ["NaN"]),
        ("prompt 3-d", lambda f, s: f.get_state_for_audio_prompt(torch.zeros(2, 2, 240)),
         ArgumentError, ["[channels, samples]", "(2, 2, 240)"]),
        ("prompt missing", lambda f, s: f.get_state_for_audio_prompt(tmp / "nope.wav"),
         AudioError, ["nope.wav", "no such file"]),
        ("prompt corrupt", lambda f, s: f.get_state_for_audio_prompt(str(tmp / "junk.wav")),
         AudioError, ["junk.wav", "cannot be read"]),
        ("prompt list", lambda f, s: f.get_state_for_audio_prompt([0.1, 0.2]),
         ArgumentTypeError, ["audio prompt", "list"]),
    ]


def test_bad_calls_are_refused_and_change_nothing(fast, voice, tmp_path):
    from calm_fast.errors import CalmFastError

    state = fast.get_state_for_audio_prompt(voice)
    torch.manual_seed(5)
    good = fast.generate_audio(state, TEXTS[0])
    for name, call, cls, words in _dropin_cases(tmp_path):
        with pytest.raises(cls) as e:
            call(fast, state)
        assert isinstance(e.value, CalmFastError), name
        assert all(w in str(e.value) for w in words), (name, str(e.value))
        assert not fast.engine.active and not fast.engine.waiting, name  # nothing left queued
    torch.manual_seed(5)
    torch.testing.assert_close(fast.generate_audio(state, TEXTS[0]), good, rtol=0, atol=0)


def test_a_voice_exported_by_the_package_loads_and_gives_its_audio(peer, fast, voice, tmp_path):
    """The package's exported voice (its attention cache after the prompt) goes straight into
    the engine as a K/V template: the same audio and RNG as the package from that file."""
    from pocket_tts.models.model_state import export_model_state

    path = tmp_path / "voice.safetensors"
    export_model_state(peer.get_state_for_audio_prompt(voice), path)
    for text in TEXTS:
        torch.manual_seed(11)
        ref = peer.generate_audio(peer.get_state_for_audio_prompt(path), text)
        ref_rng = torch.get_rng_state()
        torch.manual_seed(11)
        state = fast.get_state_for_audio_prompt(path)
        out = fast.generate_audio(state, text)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert torch.equal(torch.get_rng_state(), ref_rng)
    batch = fast.generate_audio_batch(state, TEXTS[:1], seed=3)
    assert batch[0].numel() > 0


def test_bad_voice_files_are_refused(fast, tmp_path):
    from safetensors.torch import save_file

    from calm_fast.errors import CheckpointError, MissingFileError

    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="voice file"):
        fast.get_state_for_audio_prompt(tmp_path / "junk.safetensors")
    with pytest.raises(MissingFileError, match="no voice file"):
        fast.get_state_for_audio_prompt(str(tmp_path / "missing.safetensors"))
    c = fast.lm.cfg.backbone
    wrong = {f"transformer.layers.{i}.self_attn/cache": torch.zeros(2, 1, 5, c.kv_heads, 8)
             for i in range(c.num_layers)}
    wrong.update({f"transformer.layers.{i}.self_attn/offset": torch.tensor([5])
                  for i in range(c.num_layers)})
    save_file(wrong, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fast.get_state_for_audio_prompt(tmp_path / "other.safetensors")
    nan = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
           for k, v in wrong.items()}
    nan.update({f"transformer.layers.{i}.self_attn/cache":
                torch.full((2, 1, 5, c.kv_heads, c.head_dim), float("nan"))
                for i in range(c.num_layers)})
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        fast.get_state_for_audio_prompt(tmp_path / "nan.safetensors")
    assert not fast.engine.active and not fast.engine.waiting
