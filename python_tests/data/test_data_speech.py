"""Speech builder: intelligible voices, pseudo-speakers, held-out voices, WER gate, resume."""
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from calm_fast.data import speech
from calm_fast.data.tools import MissingToolError, has_module

pytestmark = pytest.mark.skipif(not shutil.which("flite"),
                                reason="flite not installed (scripts/install_data_tools.sh)")
needs_world = pytest.mark.skipif(not has_module("pyworld"), reason="pyworld not installed")
FLITE = ("flite-slt", "flite-awb", "flite-rms")  # fast voices for tiny builds


def rows_of(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def tiny(out, **kw):
    args = dict(n_utterances=8, seed=5, sources=("pydoc",), n_pseudo=1, workers=1, base=FLITE,
                wer_threshold=None, chunk_size=3)
    args.update(kw)
    return speech.build_speech_dataset(out, **args)


def test_build_is_deterministic_and_well_formed(tmp_path):
    a = rows_of(tiny(tmp_path / "a", workers=2))  # parallel == serial, bit for bit
    b = rows_of(tiny(tmp_path / "b", workers=1))
    assert a == b and len(a) == 8
    for r in a:
        wav, sr = sf.read(tmp_path / "a" / r["path"])
        assert sr == 24_000 and wav.ndim == 1 and r["sample_rate"] == 24_000
        assert 0.5 < len(wav) / sr < 20 and r["duration"] == pytest.approx(len(wav) / sr, abs=1e-3)
        assert np.abs(wav).max() == pytest.approx(10 ** (-1 / 20), abs=2e-3)
        assert r["engine"] in ("flite", "festival", "espeak", "piper") and r["text"]
        assert r["base_voice"] in FLITE and r["split"] in ("train", "val", "test", "test_voice")
        np.testing.assert_array_equal(wav, sf.read(tmp_path / "b" / r["path"])[0])
    info = json.loads((tmp_path / "a" / "speakers.json").read_text())
    assert info["default_voice"] == "flite-slt"  # the HTS voice was not asked for


def test_held_out_voices_and_sentences_never_leak(tmp_path):
    rows = rows_of(tiny(tmp_path, n_utterances=30, seed=2, n_eval=3))
    held = {r["speaker_id"] for r in rows if r["split"] == "test_voice"}
    seen = {r["speaker_id"] for r in rows if r["split"] != "test_voice"}
    assert held and not held & seen
    # the whole rms base voice is held out, with its pseudo-speakers
    assert all(r["split"] == "test_voice" for r in rows if r["base_voice"] == "flite-rms")
    assert "flite-rms" in held
    train = {r["text"] for r in rows if r["split"] == "train"}
    test = {r["text"] for r in rows if r["split"] in ("test", "test_voice")}
    assert not train & test
    # n_eval: the same 3 test sentences for the default voice and for each held-out speaker
    info = json.loads((tmp_path / "speakers.json").read_text())
    evals = set(info["eval_sentences"])
    assert len(evals) == 3
    for spk in [info["default_voice"], *info["held_out"]]:
        assert evals <= {r["text"] for r in rows if r["speaker_id"] == spk
                         and r["split"] in ("test", "test_voice")}


def test_rebuild_resumes_from_finished_chunks(tmp_path):
    rows = rows_of(tiny(tmp_path, n_utterances=6))
    parts = sorted((tmp_path / ".parts").glob("*.json"))
    assert len(parts) >= 2
    redo = {r["path"] for r in json.loads(parts[-1].read_text())}
    stamps = {r["path"]: (tmp_path / r["path"]).stat().st_mtime_ns for r in rows}
    os.remove(parts[-1])  # as if the build had been killed before this chunk finished
    assert rows_of(tiny(tmp_path, n_utterances=6)) == rows
    assert len(list((tmp_path / ".parts").glob("*.json"))) == len(parts)
    kept = [p for p in stamps if p not in redo]
    assert kept and all((tmp_path / p).stat().st_mtime_ns == stamps[p] for p in kept)


def test_hours_budget_and_eval_sets(tmp_path):
    rows = rows_of(tiny(tmp_path, n_utterances=0, hours=60 / 3600, n_eval=2))
    est = sum(r["duration"] for r in rows if r["split"] == "train")
    assert 30 < est < 200  # about a minute of train audio (the estimate is rough)


def test_wer_gate_drops_bad_voices_and_caches(tmp_path):
    seen, held, default = speech.plan_speakers(
        n_pseudo=1, base=FLITE, voice_wer={"flite-slt": 0.02, "flite-awb": 0.9,
                                           "flite-rms": 0.05}, wer_threshold=0.3)
    ids = {s.speaker_id for s in seen + held}
    assert not any(i.startswith("flite-awb") for i in ids) and "flite-slt" in ids
    assert default == "flite-slt" and {s.base_voice for s in held} >= {"flite-rms"}

    calls = []

    def fake_asr(wav):
        calls.append(len(wav))
        return "a quiet evening"

    voices = speech.base_voices(["flite-slt"])
    sents = ["A quiet evening with tea.", "A quiet evening at home."]
    cache = tmp_path / "voice_wer.json"
    w = speech.measure_voice_wer(voices, sents, fake_asr, cache)
    assert w["flite-slt"] == pytest.approx(4 / 10) and len(calls) == 2
    assert speech.measure_voice_wer(voices, sents, fake_asr, cache) == w and len(calls) == 2
    # the gate inside a build: every voice "fails" -> nothing left
    with pytest.raises(MissingToolError, match="no usable"):
        tiny(tmp_path / "b", wer_threshold=0.1, asr=lambda wav: "")


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


TEXT = "A quiet evening with a warm cup of tea."


def test_pseudo_speakers_follow_their_pitch_target():
    for target in (90, 220):
        f0 = median_f0(speech.synthesize(speech.Speaker("x", "flite", "slt", f0=target), TEXT))
        assert abs(f0 - target) < 0.1 * target, (target, f0)
    table = speech.speaker_table(n_pseudo=3, seed=0)
    assert not [s for s in table if s.voice == "rms" and s.f0]  # rms ignores the knob
    assert len({s.speaker_id for s in table}) == len(table)
    for s in table:
        assert speech.WORLD_F0_SCALE[0] <= s.f0_scale <= speech.WORLD_F0_SCALE[1]
        assert speech.WORLD_ALPHA[0] <= s.formant_alpha <= speech.WORLD_ALPHA[1]
    assert not [s for s in table if s.engine == "espeak"]  # espeak is opt-in
    # a voice's pseudo-speakers do not depend on which other voices are in the table
    sub = speech.speaker_table(n_pseudo=3, seed=0, base=["flite-awb"])
    assert sub == [s for s in table if s.base_voice == "flite-awb"]


@needs_world
def test_world_warp_scales_pitch():
    spk = speech.Speaker("x", "flite", "slt")
    base = median_f0(speech.synthesize(spk, TEXT))
    warped = speech.synthesize(speech.Speaker("y", "flite", "slt", f0_scale=1.3,
                                              formant_alpha=1.08), TEXT)
    assert np.abs(warped).max() == pytest.approx(10 ** (-1 / 20), abs=2e-3)
    assert median_f0(warped) == pytest.approx(1.3 * base, rel=0.1)


def test_missing_engine_and_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="n_utterances"):
        speech.build_speech_dataset(tmp_path, n_utterances=0)
    with pytest.raises(ValueError, match="unknown base voice"):
        speech.speaker_table(base=["flite-nope"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no engines on PATH
    with pytest.raises(MissingToolError, match="flite"):
        speech.synthesize(speech.Speaker("x", "flite", "slt"), "Hello there my good friend.")
    with pytest.raises(MissingToolError, match="no usable TTS voice"):
        speech.plan_speakers(base=FLITE)
