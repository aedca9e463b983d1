"""Offline multi-speaker English speech from Debian's TTS engines.

Speakers are (engine, voice, knobs) triples: flite's clustergen/diphone voices with an F0
target and a duration stretch, festival's diphone voices, and espeak-ng variants with pitch
and rate. The knobs turn a handful of base voices into many pseudo-speakers. A fraction of
the speakers is held out entirely (split ``test_voice``) for zero-shot voice-cloning tests;
sentences are split separately (``train``/``val``/``test``), see ``text.split``.

Each utterance is resampled to 24 kHz mono, its silences trimmed to at most 0.15 s, peak
normalised to -1 dBFS and written as FLAC PCM_16; the manifest is JSONL, one line per file.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from . import text as text_mod
from .tools import require_tool, run_jobs, write_flac, write_manifest

SAMPLE_RATE = 24_000
FLITE_VOICES = ("slt", "awb", "rms", "kal16")
# flite's rms voice ignores int_f0_target_mean (measured: 102 Hz whatever the target), so it
# gets no pitch-shifted pseudo-speakers; slt/awb/kal16 follow the target within ~5 Hz.
FLITE_PITCHABLE = ("slt", "awb", "kal16")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt",
                   "klatt2", "klatt3")


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    engine: str  # flite | festival | espeak
    voice: str
    f0: float = 0.0  # flite: target mean F0 in Hz (0 = the voice's own)
    stretch: float = 1.0  # flite: duration stretch
    pitch: int = 50  # espeak -p
    rate: int = 160  # espeak -s (words per minute)


def speaker_table(n_pseudo: int = 2, seed: int = 0) -> list[Speaker]:
    """Base voices plus ``n_pseudo`` seeded pseudo-speakers per flite voice and espeak variant."""
    rng = random.Random(seed)
    out = []
    for v in FLITE_VOICES:
        out.append(Speaker(f"flite-{v}", "flite", v))
        for i in range(n_pseudo if v in FLITE_PITCHABLE else 0):
            out.append(Speaker(f"flite-{v}-p{i}", "flite", v, f0=round(rng.uniform(90, 220)),
                               stretch=round(rng.uniform(0.9, 1.15), 2)))
    for v in FESTIVAL_VOICES:
        out.append(Speaker(f"festival-{v}", "festival", v))
    for v in ESPEAK_VARIANTS:
        for i in range(max(1, n_pseudo)):
            out.append(Speaker(f"espeak-{v}-p{i}", "espeak", f"en-us+{v}",
                               pitch=rng.randint(25, 75), rate=rng.randint(140, 185)))
    return out


# -- synthesis ---------------------------------------------------------------------------------
def _synth_raw(spk: Speaker, sentence: str, wav_path: str) -> None:
    if spk.engine == "flite":
        cmd = [require_tool("flite"), "-voice", spk.voice, "-t", sentence, "-o", wav_path]
        if spk.f0:
            cmd += ["--setf", f"int_f0_target_mean={spk.f0}"]
        if spk.stretch != 1.0:
            cmd += ["--setf", f"duration_stretch={spk.stretch}"]
    elif spk.engine == "festival":
        # festival --batch evaluates one form per argument. The sentence filter
        # (text.clean_sentence) admits no quote or backslash, so json quoting is valid Scheme.
        save = (f"(utt.save.wave (utt.synth (Utterance Text {json.dumps(sentence)})) "
                f"{json.dumps(wav_path)} (quote riff))")
        cmd = [require_tool("festival"), "--batch", f"(voice_{spk.voice})", save]
    elif spk.engine == "espeak":
        cmd = [require_tool("espeak-ng"), "-v", spk.voice, "-p", str(spk.pitch), "-s",
               str(spk.rate), "-w", wav_path, sentence]
    else:
        raise ValueError(f"unknown engine {spk.engine!r}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not os.path.exists(wav_path) or os.path.getsize(wav_path) <= 44:
        raise RuntimeError(f"{spk.engine} failed for {spk.speaker_id}: {res.stderr.strip()[:300]}")


def trim_silence(wav: np.ndarray, sr: int, keep: float = 0.15, thresh_db: float = -40.0):
    """Cut leading/trailing audio quieter than ``thresh_db`` below the peak, keeping
    ``keep`` seconds of margin on each side."""
    if wav.size == 0:
        return wav
    peak = float(np.abs(wav).max())
    if peak == 0:
        return wav[:0]
    loud = np.flatnonzero(np.abs(wav) > peak * 10 ** (thresh_db / 20))
    margin = int(keep * sr)
    return wav[max(0, loud[0] - margin):loud[-1] + 1 + margin]


def postprocess(wav: np.ndarray, sr: int) -> np.ndarray:
    """Mono float at 24 kHz, trimmed, peak at -1 dBFS."""
    import torch

    from calm_fast.codec.resample import resample

    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    wav = trim_silence(wav.astype(np.float32), sr)
    if wav.size == 0:
        raise RuntimeError("the engine produced only silence")
    if sr != SAMPLE_RATE:
        wav = resample(torch.from_numpy(wav)[None], sr, SAMPLE_RATE)[0].numpy()
    return wav * (10 ** (-1 / 20) / max(float(np.abs(wav).max()), 1e-9))


def synthesize(spk: Speaker, sentence: str) -> np.ndarray:
    """One utterance as float32 mono at 24 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "u.wav")
        _synth_raw(spk, sentence, path)
        wav, sr = sf.read(path, dtype="float32")
    return postprocess(wav, sr)


def _job(args):
    idx, spk, sentence, split, out_dir = args
    rel = f"{split}/{spk.speaker_id}/{idx:06d}.flac"
    wav = synthesize(spk, sentence)
    write_flac(Path(out_dir) / rel, wav, SAMPLE_RATE)
    return {"path": rel, "text": sentence, "split": split, "sample_rate": SAMPLE_RATE,
            "duration": round(len(wav) / SAMPLE_RATE, 3), **asdict(spk)}


def build_speech_dataset(out_dir, n_utterances: int = 200, seed: int = 0,
                         sources=("fortunes", "bible", "pydoc"), n_pseudo: int = 2,
                         held_out_voices: float = 0.2, workers: int = 2) -> Path:
    """Synthesise ``n_utterances`` utterances into ``out_dir`` and write manifest.jsonl.

    Deterministic from ``seed``: same speakers, sentences, assignments and file names.
    """
    if n_utterances <= 0:
        raise ValueError(f"n_utterances must be positive, got {n_utterances}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val, test = text_mod.split(text_mod.collect(sources), seed=seed)
    speakers = speaker_table(n_pseudo, seed)
    rng = random.Random(seed)
    order = list(speakers)
    rng.shuffle(order)
    n_held = max(1, round(held_out_voices * len(order))) if held_out_voices > 0 else 0
    held, seen = order[:n_held], order[n_held:]
    jobs = []
    for i in range(n_utterances):
        r = rng.random()
        if held and r < held_out_voices:
            spk, split, pool = rng.choice(held), "test_voice", test
        else:
            spk = rng.choice(seen)
            split, pool = (("val", val) if r < held_out_voices + 0.05 else
                           ("test", test) if r < held_out_voices + 0.1 else ("train", train))
        jobs.append((i, spk, rng.choice(pool), split, str(out_dir)))
    rows = run_jobs(_job, jobs, workers, chunksize=4)
    return write_manifest(Path(out_dir), rows)
