"""Round-trip signal metrics between a reference and its reconstruction: STOI, PESQ-WB
and a log-mel L1 distance. Both signals are aligned (the codec's delay removed by the
caller) and cut to the shorter length."""
from __future__ import annotations

import numpy as np
import torch

from calm_fast.codec.resample import resample


def _pair(ref: torch.Tensor, deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref, deg = ref.reshape(-1).float(), deg.reshape(-1).float()
    n = min(len(ref), len(deg))
    if n == 0:
        raise ValueError("empty audio in a round-trip comparison")
    return ref[:n], deg[:n]


def stoi(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int) -> float:
    from pystoi import stoi as _stoi

    r, d = _pair(ref, deg)
    return float(_stoi(r.numpy().astype(np.float64), d.numpy().astype(np.float64), sample_rate))


def pesq_wb(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int) -> float:
    from pesq import pesq

    r, d = _pair(ref, deg)
    if sample_rate != 16_000:
        r, d = resample(r[None], sample_rate, 16_000)[0], resample(d[None], sample_rate, 16_000)[0]
    return float(pesq(16_000, r.numpy(), d.numpy(), "wb"))


def mel_distance(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int, n_mels: int = 80
                 ) -> float:
    """Mean |log10 mel(ref) - log10 mel(deg)| (1024-point frames, hop 256)."""
    from calm_fast.codec.istft import mel_filterbank

    r, d = _pair(ref, deg)
    fb = torch.as_tensor(mel_filterbank(sample_rate, 1024, n_mels)).float()
    win = torch.hann_window(1024)

    def logmel(x):
        spec = torch.stft(x, 1024, 256, window=win, return_complex=True).abs()
        return torch.log10((fb @ spec).clamp_min(1e-5))

    return float((logmel(r) - logmel(d)).abs().mean())
