"""Speech builder: deterministic multi-speaker synthesis, held-out voices, clean audio."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from calm_fast.data import speech
from calm_fast.data.tools import MissingToolError

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("flite", "espeak-ng", "festival")),
    reason="TTS engines not installed (scripts/install_data_tools.sh)")


def rows_of(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_build_is_deterministic_and_well_formed(tmp_path):
    kw = dict(n_utterances=8, seed=5, sources=("pydoc",), n_pseudo=1, workers=2)
    a = rows_of(speech.build_speech_dataset(tmp_path / "a", **kw))
    b = rows_of(speech.build_speech_dataset(tmp_path / "b", **kw))
    assert a == b and len(a) == 8
    for r in a:
        wav, sr = sf.read(tmp_path / "a" / r["path"])
        assert sr == 24_000 and wav.ndim == 1
        assert 0.5 < len(wav) / sr < 20 and r["duration"] == pytest.approx(len(wav) / sr, abs=1e-3)
        assert np.abs(wav).max() == pytest.approx(10 ** (-1 / 20), abs=2e-3)
        assert r["engine"] in ("flite", "festival", "espeak") and r["text"]
        np.testing.assert_array_equal(wav, sf.read(tmp_path / "b" / r["path"])[0])


def test_held_out_voices_and_sentences_never_leak(tmp_path):
    rows = rows_of(speech.build_speech_dataset(tmp_path, n_utterances=30, seed=2,
                                               sources=("pydoc",), n_pseudo=1, workers=2))
    held = {r["speaker_id"] for r in rows if r["split"] == "test_voice"}
    seen = {r["speaker_id"] for r in rows if r["split"] != "test_voice"}
    assert held and not held & seen
    train = {r["text"] for r in rows if r["split"] == "train"}
    test = {r["text"] for r in rows if r["split"] in ("test", "test_voice")}
    assert not train & test


def median_f0(wav, sr=24_000):
    """Median autocorrelation pitch over the voiced 50 ms frames."""
    n, out = sr // 20, []
    for st in range(0, len(wav) - n, n // 2):
        seg = wav[st:st + n]
        if np.sqrt((seg ** 2).mean()) < 0.05 * np.abs(wav).max():
            continue
        ac = np.correlate(seg, seg, "full")[n - 1:]
        lo, hi = sr // 400, sr // 60
        out.append(sr / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(out))


def test_pseudo_speakers_follow_their_pitch_target():
    text = "A quiet evening with a warm cup of tea."
    for target in (90, 220):
        f0 = median_f0(speech.synthesize(speech.Speaker("x", "flite", "slt", f0=target), text))
        assert abs(f0 - target) < 0.1 * target, (target, f0)
    table = speech.speaker_table(n_pseudo=2, seed=0)
    assert not [s for s in table if s.voice == "rms" and s.f0]  # rms ignores the knob
    assert len({s.speaker_id for s in table}) == len(table)


def test_missing_engine_and_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="n_utterances"):
        speech.build_speech_dataset(tmp_path, n_utterances=0)
    monkeypatch.setenv("PATH", str(tmp_path))  # no engines on PATH
    with pytest.raises(MissingToolError, match="flite"):
        speech.synthesize(speech.Speaker("x", "flite", "slt"), "Hello there my good friend.")
