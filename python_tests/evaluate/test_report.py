"""`calm-fast eval`: rows from a manifest or a folder, each metric on signals whose answer is
known (identity vs degraded round trips, a tone scale's key, the same vs another speaker),
corpus WER/CER arithmetic, the JSON report and the clear errors."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from calm_fast.errors import ArgumentError
from calm_fast.evaluate import cer, wer
from calm_fast.evaluate import music, signal
from calm_fast.evaluate.report import evaluate, read_rows, summarize, table
from calm_fast.model.music_tags import parse_key

SR = 24_000


def voiced(seconds=2.0, f0=140.0, seed=0):
    """A speech-like signal: a pitch-varying pulse train through moving formant filters."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))
    phase = np.cumsum(f) / SR
    x = np.sign(np.sin(2 * np.pi * phase)) * 0.2 + 0.01 * g.standard_normal(len(t))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    spec = np.fft.rfft(x * env)
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    spec *= np.exp(-((freqs - 700) / 400) ** 2) + 0.6 * np.exp(-((freqs - 1800) / 500) ** 2)
    y = np.fft.irfft(spec, len(x))
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def test_error_rates_are_corpus_rates():
    assert wer(["a b c d", "e f"], ["a x c d", "e f g"]) == pytest.approx(2 / 6)
    assert cer(["abcd"], ["abed"]) == pytest.approx(1 / 4)
    assert cer(["Hello, World!"], ["hello world"]) == 0.0  # normalised like WER
    with pytest.raises(ValueError, match="as many"):
        cer(["a"], [])


def test_round_trip_metrics_order_identity_above_degraded():
    x = torch.from_numpy(voiced())
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert signal.stoi(x, x, SR) > 0.99 and signal.pesq_wb(x, x, SR) > 4.4
    assert signal.mel_distance(x, x, SR) == 0.0
    assert signal.stoi(x, noisy, SR) < signal.stoi(x, x, SR)
    assert signal.pesq_wb(x, noisy, SR) < 3.0
    assert signal.mel_distance(x, noisy, SR) > 0.05
    with pytest.raises(ValueError, match="empty"):
        signal.stoi(x, x[:0], SR)


def test_key_of_a_scale_and_captions():
    # C major triads C-F-G-C as sine chords: the estimated key is C major
    t = np.arange(int(0.5 * SR)) / SR
    chords = [(261.6, 329.6, 392.0), (349.2, 440.0, 523.3), (392.0, 493.9, 587.3),
              (261.6, 329.6, 392.0)]
    x = np.concatenate([sum(np.sin(2 * np.pi * f * t) for f in c) / 3 for c in chords])
    x = torch.from_numpy(x.astype(np.float32))
    assert music.estimate_key(x, SR) == "C major"
    assert music.chroma_correlation(x, x, SR) == pytest.approx(1.0)
    assert parse_key("a slow waltz in A minor") == "A minor"
    assert parse_key("Key: Eb major") == "D# major"
    assert parse_key("no key named") is None


def test_folder_and_manifest_rows(tmp_path):
    sf.write(tmp_path / "a.wav", voiced(), SR)
    (tmp_path / "a.txt").write_text("hello there\n")
    sf.write(tmp_path / "b.flac", voiced(seed=1), SR)
    rows, base = read_rows(tmp_path)
    assert [r.get("text") for r in rows] == ["hello there", None] and base == tmp_path
    assert rows[0]["path"] == str(tmp_path / "a.wav")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgumentError, match="no audio files"):
        read_rows(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.wav"}\nnot json\n')
    with pytest.raises(ArgumentError, match=r"bad.jsonl:2: not JSON"):
        read_rows(bad)
    bad.write_text('{"text": "no path"}\n')
    with pytest.raises(ArgumentError, match="'path' string"):
        read_rows(bad)
    bad.write_text('{"path": "missing.wav"}\n')
    with pytest.raises(ArgumentError, match="do not exist"):
        evaluate(bad, ["signal"], progress=False)
    with pytest.raises(ArgumentError, match="unknown metrics"):
        evaluate(tmp_path, ["bleu"], progress=False)


def test_signal_report_groups_and_table(tmp_path):
    x = voiced()
    sf.write(tmp_path / "ref.wav", x, SR)
    sf.write(tmp_path / "same.wav", np.concatenate([np.zeros(720, np.float32), x]), SR)
    sf.write(tmp_path / "noisy.wav", x + 0.05 * np.random.default_rng(0).standard_normal(
        len(x)).astype(np.float32), SR)
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in [
        {"path": "same.wav", "reference": "ref.wav", "delay": 720, "group": "clean"},
        {"path": "noisy.wav", "reference": "ref.wav", "group": "noisy", "model": "m1"}]))
    rep = evaluate(man, ["signal"], progress=False)
    assert rep["model"] == "m1" and rep["code"].startswith("0.")
    clean, noisy = rep["groups"]["clean"], rep["groups"]["noisy"]
    assert clean["stoi"] > 0.99 and clean["mel_dist"] < 1e-6  # the delay was removed
    assert noisy["stoi"] < clean["stoi"] and noisy["pesq"] < clean["pesq"]
    assert rep["summary"]["files"] == 2 and rep["summary"]["stoi_files"] == 2
    t = table(rep)
    assert "clean" in t and "noisy" in t and "stoi" in t and "wer" not in t.split("\n")[1]


def test_summary_pools_words_not_file_rates():
    s = summarize([{"word_edits": 1, "words": 1, "char_edits": 1, "chars": 5},
                   {"word_edits": 0, "words": 9, "char_edits": 0, "chars": 45},
                   {"sim_prompt": 0.9, "sim_other": 0.5}, {"sim_prompt": 0.4, "sim_other": 0.6},
                   {"stoi": math.nan}])
    assert s["wer"] == pytest.approx(0.1) and s["cer"] == pytest.approx(1 / 50)
    assert s["sim_above_other"] == 0.5 and "stoi" not in s


def test_speaker_similarity_tells_voices_apart(tmp_path):
    pytest.importorskip("resemblyzer")
    for name, f0, seed in (("p1", 120.0, 0), ("a1", 120.0, 1), ("p2", 260.0, 2)):
        sf.write(tmp_path / f"{name}.wav", voiced(3.0, f0, seed), SR)
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in [
        {"path": "a1.wav", "prompt": "p1.wav", "speaker": "low"},
        {"path": "p2.wav", "prompt": "p2.wav", "speaker": "high"}]))
    rep = evaluate(man, ["sim"], progress=False)
    r0, r1 = rep["rows"]
    assert r1["sim_prompt"] == pytest.approx(1.0, abs=1e-4)
    assert r0["sim_prompt"] > r0["sim_other"]
    assert rep["summary"]["sim_above_other"] == 1.0


def test_cli_writes_json_and_prints_the_table(tmp_path, capsys):
    from calm_fast.cli import main

    sf.write(tmp_path / "x.wav", voiced(), SR)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(
        {"path": "x.wav", "reference": "x.wav", "group": "g"}) + "\n")
    out = tmp_path / "r" / "report.json"
    assert main(["eval", str(tmp_path), "--metrics", "signal", "--json", str(out), "-q"]) == 0
    rep = json.loads(out.read_text())
    assert rep["groups"]["g"]["stoi"] > 0.99 and rep["metrics"] == ["signal"]
    assert "stoi" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nope"), "-q"]) == 1
    assert "no manifest or folder" in capsys.readouterr().err
