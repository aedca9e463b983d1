"""The models that ship in the wheel (calm_fast/assets/default/ and assets/voices/): they load
with no --checkpoint, speak one sentence that whisper understands, in the default voice,
through the CLI and the batch job. Their full quality is measured on held-out data by
scripts/eval_tts.py (benchmarks/results/training.md)."""
import json

import pytest
import torch

from calm_fast.evaluate import wer
from calm_fast.runtime.voices import builtin_voices
from calm_fast.serve.models import DEFAULT_BUNDLE, load_synth

TEXT = "Hello there, this is calm fast."
MAX_WER = 0.5  # one short sentence, 1-step head: the held-out eval gives the real figure


def test_default_bundle_and_voices_load():
    synth = load_synth()
    assert synth.can_speak and synth.can_clone and synth.default_voice in builtin_voices()
    assert synth.sample_rate == 24_000 and synth.frame_rate == 12.5
    assert set(builtin_voices()) >= {"slt", "awb", "joe", "kal"}
    info = json.loads((DEFAULT_BUNDLE / "bundle.json").read_text())
    assert info["default_voice"] == synth.default_voice
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.parent.rglob("*") if p.is_file())
    assert size < 40 * 2**20  # everything shipped together


def test_cli_says_the_words(tmp_path):
    asr_mod = pytest.importorskip("faster_whisper")
    del asr_mod
    from calm_fast.cli import main
    from calm_fast.codec.audio import load_audio
    from calm_fast.evaluate import WhisperASR

    out = tmp_path / "hello.wav"
    assert main(["tts", TEXT, "-o", str(out), "-q"]) == 0
    wav = load_audio(out, 24_000)
    assert 1.0 < wav.shape[1] / 24_000 < 8.0
    hyp = WhisperASR().transcribe(wav, 24_000)
    assert wer([TEXT], [hyp]) <= MAX_WER, hyp


def test_batch_runs_the_default_model(tmp_path):
    from calm_fast.serve.batch import run_batch

    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "text": "Good morning."}) + "\n"
                 + json.dumps({"id": "b", "text": "Good night.", "voice": "awb"}) + "\n")
    s = run_batch(m, tmp_path / "out", progress=False, max_seconds=6.0)
    assert (s["ok"], s["failed"]) == (2, 0)
    rows = {json.loads(x)["id"]: json.loads(x)
            for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert all(r["status"] == "ok" and r["frames"] > 5 for r in rows.values())
    with torch.no_grad():
        assert (tmp_path / "out" / rows["a"]["output"]).stat().st_size > 1000
