"""Polyphase resampler: keeps tones, rejects aliases, handles shapes and bad input."""
import math

import pytest
import torch

from calm_fast.codec.resample import resample


def tone(freq, sr, seconds=0.5):
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t)


def peak_freq(x, sr):
    spec = torch.fft.rfft(x * torch.hann_window(len(x), dtype=x.dtype))
    return spec.abs().argmax().item() * sr / len(x)


@pytest.mark.parametrize("src,dst", [(16000, 24000), (22050, 24000), (48000, 24000),
                                     (24000, 16000), (44100, 24000)])
def test_tone_keeps_frequency_and_amplitude(src, dst):
    y = resample(tone(1000.0, src), src, dst)
    assert len(y) == math.ceil(len(tone(1000.0, src)) * dst / src)
    assert abs(peak_freq(y, dst) - 1000.0) < 5
    mid = y[len(y) // 4: 3 * len(y) // 4]  # away from the zero-padded edges
    assert abs(mid.abs().max().item() - 1.0) < 0.01
    ref = tone(1000.0, dst)[: len(y)]
    assert (mid - ref[len(y) // 4: 3 * len(y) // 4]).abs().max() < 2e-3  # no phase shift


def test_downsampling_suppresses_aliases():
    # 20 kHz at 48 kHz would alias to 4 kHz at 24 kHz: it must be filtered out instead.
    y = resample(tone(20000.0, 48000), 48000, 24000)
    assert y[1000:-1000].abs().max() < 1e-3


def test_batch_shapes_dtype_and_identity():
    x = torch.randn(2, 3, 1600)
    y = resample(x, 16000, 24000)
    assert y.shape == (2, 3, 2400) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 16000, 24000))
    assert resample(x, 24000, 24000) is x


def test_bad_input():
    with pytest.raises(ValueError, match="orig_rate"):
        resample(torch.zeros(10), 0, 24000)
    with pytest.raises(ValueError, match="new_rate"):
        resample(torch.zeros(10), 16000, 2.5)
    with pytest.raises(ValueError, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int16), 16000, 24000)
