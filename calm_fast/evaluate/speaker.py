"""Speaker similarity: cosine between resemblyzer GE2E d-vectors (256-d; its weights ship
inside the resemblyzer wheel, so nothing is downloaded). Measured in
shared/research/data_eval.md: EER 2.9% over 55 synthetic voice configurations."""
from __future__ import annotations

import torch

from calm_fast.codec.resample import resample

RATE = 16_000


class SpeakerEncoder:
    def __init__(self):
        try:
            from resemblyzer import VoiceEncoder
        except ImportError as e:
            raise RuntimeError("speaker similarity needs resemblyzer: "
                               "pip install 'calm_fast[eval]'") from e
        self.enc = VoiceEncoder("cpu", verbose=False)

    def embed(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Unit-norm d-vector [256] of a mono waveform [samples] (or [1, samples])."""
        from resemblyzer import preprocess_wav

        wav = wav.reshape(1, -1).float()
        if sample_rate != RATE:
            wav = resample(wav, sample_rate, RATE)
        x = preprocess_wav(wav[0].numpy(), RATE)
        if len(x) < RATE // 4:  # all silence after VAD trimming: embed the raw signal
            x = wav[0].numpy()
        e = torch.from_numpy(self.enc.embed_utterance(x)).float()
        return e / e.norm().clamp_min(1e-8)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-8))
