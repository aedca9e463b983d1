"""Band-limited resampling in torch (polyphase windowed sinc), for any integer rate pair.

The rates are reduced by their gcd to (p, q); the filter is a Hann-windowed sinc with
``zero_crossings`` lobes on each side, cut off at ``rolloff`` x the lower Nyquist
frequency, evaluated at the q phases the output grid needs, and applied as one strided
conv1d. Cost per output sample: 2 * zero_crossings * p / (rolloff * min(p, q)) taps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_KERNELS: dict = {}


def _kernel(orig: int, new: int, zero_crossings: int, rolloff: float, dtype, device):
    key = (orig, new, zero_crossings, rolloff, dtype, device)
    if key not in _KERNELS:
        cutoff = min(orig, new) * rolloff  # in units where the input rate is `orig`
        width = math.ceil(zero_crossings * orig / cutoff)
        taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
        phases = -torch.arange(new, dtype=torch.float64)[:, None] / new
        t = (phases + taps[None]) * cutoff
        t = t.clamp(-zero_crossings, zero_crossings)
        window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
        x = t * math.pi
        sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
        k = (sinc * window * cutoff / orig).to(dtype=dtype, device=device)
        _KERNELS[key] = (k[:, None, :], width)
    return _KERNELS[key]


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16,
             rolloff: float = 0.945) -> torch.Tensor:
    """Resample the last axis of ``wav`` from ``orig_rate`` to ``new_rate`` (Hz, integers).

    Output length is ceil(T * new / orig). ``rolloff`` < 1 keeps the transition band below
    the lower Nyquist frequency, so downsampling does not alias.
    """
    for name, r in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if int(r) != r or r <= 0:
            raise ValueError(f"{name} must be a positive integer number of Hz, got {r}")
    if not wav.is_floating_point():
        raise ValueError(f"resample needs a floating-point waveform, got {wav.dtype}")
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate == new_rate:
        return wav
    g = math.gcd(orig_rate, new_rate)
    p, q = orig_rate // g, new_rate // g
    shape = wav.shape
    x = wav.reshape(-1, shape[-1])
    kernel, width = _kernel(p, q, zero_crossings, rolloff, wav.dtype, wav.device)
    x = F.pad(x[:, None], (width, width + p))
    y = F.conv1d(x, kernel, stride=p)  # [N, q, frames]: output phase j of frame n
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    n_out = math.ceil(q * shape[-1] / p)
    return y[:, :n_out].reshape(*shape[:-1], n_out)
