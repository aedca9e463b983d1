"""Reading and writing audio files, with the checks a model input needs.

``load_audio`` is what the models call: any format libsndfile reads (wav, flac, ogg, mp3,
...), down-mixed to mono, resampled to the model rate (calm_fast.resample), as float32
[1, T]. Every way a file can be unusable raises ``AudioError`` with the reason; nothing is
silently clipped, truncated or padded. ``write_audio`` never clips: a signal that would
exceed ``peak`` is scaled down as a whole.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from calm_fast.errors import AudioError, MissingFileError
from calm_fast.codec.resample import resample

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac"}  # read
WRITE_SUBTYPES = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS", ".mp3": "MPEG_LAYER_III"}


def read_audio(path, max_seconds: float = 600.0, max_channels: int = 8):
    """(float32 tensor [channels, T], sample rate) of a file, checked."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no audio file at {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path} is not a readable audio file: {e}") from e
    if info.channels < 1 or info.channels > max_channels:
        raise AudioError(f"{path} has {info.channels} channels; expected 1 to {max_channels}")
    if info.samplerate <= 0:
        raise AudioError(f"{path} has an invalid sample rate {info.samplerate}")
    if info.frames > max_seconds * info.samplerate:
        raise AudioError(f"{path} lasts {info.frames / info.samplerate:.1f} s, more than "
                         f"max_seconds={max_seconds}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path} is corrupt: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path} holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path} holds NaN or Inf samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def load_audio(path, sample_rate: int, max_seconds: float = 600.0,
               allow_silence: bool = False) -> torch.Tensor:
    """Mono float32 [1, T] at ``sample_rate``."""
    wav, sr = read_audio(path, max_seconds)
    wav = wav.mean(0, keepdim=True)
    if not allow_silence and wav.abs().max() < 1e-4:
        raise AudioError(f"{path} is silent (peak below -80 dBFS)")
    if sr != sample_rate:
        wav = resample(wav, int(sr), int(sample_rate))
    return wav


def write_audio(path, wav: torch.Tensor, sample_rate: int, peak: float = 0.99) -> float:
    """Write [T] or [channels, T] audio; returns the gain applied (1.0 = untouched)."""
    path = Path(path)
    if path.suffix.lower() not in WRITE_SUBTYPES:
        raise AudioError(f"cannot write {path.suffix!r}; use one of {sorted(WRITE_SUBTYPES)}")
    wav = torch.as_tensor(wav).detach().to("cpu", torch.float32)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[0] > 8 or wav.shape[1] == 0:
        raise AudioError(f"audio to write must be [T] or [channels <= 8, T > 0], "
                         f"got {tuple(wav.shape)}")
    if not torch.isfinite(wav).all():
        raise AudioError("audio to write holds NaN or Inf")
    if not (0 < peak <= 1) or sample_rate <= 0:
        raise AudioError(f"peak must be in (0, 1] and the rate positive, got {peak}, {sample_rate}")
    top = wav.abs().max().item()
    gain = 1.0 if top <= peak else peak / top
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (wav * gain).T.numpy(), int(sample_rate),
             subtype=WRITE_SUBTYPES[path.suffix.lower()])
    return gain


def duration(wav: torch.Tensor, sample_rate: int) -> float:
    return wav.shape[-1] / sample_rate if sample_rate > 0 else math.nan
