"""Music agreement with librosa (no downloads): chroma correlation between a reference and
a reconstruction, the key (Krumhansl-Schmuckler on mean chroma) and the tempo."""
from __future__ import annotations

import numpy as np
import torch

from calm_fast.model.music_tags import NOTES

# Krumhansl-Kessler key profiles
_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def chroma(wav: torch.Tensor, sample_rate: int) -> np.ndarray:
    import librosa

    x = wav.reshape(-1).float().numpy()
    return librosa.feature.chroma_stft(y=x, sr=sample_rate, n_fft=4096, hop_length=1024)


def chroma_correlation(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int) -> float:
    """Pearson correlation of the two chromagrams over all (pitch class, frame) cells."""
    a, b = chroma(ref, sample_rate), chroma(deg, sample_rate)
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n].ravel(), b[:, :n].ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def estimate_key(wav: torch.Tensor, sample_rate: int) -> str:
    """'A minor', 'C major', ...: the best-correlated rotated key profile."""
    c = chroma(wav, sample_rate).mean(1)
    best, name = -2.0, ""
    for tonic in range(12):
        for mode, prof in (("major", _MAJOR), ("minor", _MINOR)):
            r = np.corrcoef(c, np.roll(prof, tonic))[0, 1]
            if r > best:
                best, name = r, f"{NOTES[tonic]} {mode}"
    return name


def tempo(wav: torch.Tensor, sample_rate: int) -> float:
    import librosa

    t, _ = librosa.beat.beat_track(y=wav.reshape(-1).float().numpy(), sr=sample_rate)
    return float(np.atleast_1d(t)[0])
