"""DNSMOS P.835 (speechmos, whose wheel bundles the ONNX models): a non-intrusive MOS proxy
(OVRL, SIG, BAK on 1-5). Slow (about 1.4x real time here), so ``calm-fast eval`` runs it
only with ``--dnsmos``."""
from __future__ import annotations

import torch

from calm_fast.codec.resample import resample


def dnsmos(wav: torch.Tensor, sample_rate: int) -> dict[str, float]:
    try:
        from speechmos import dnsmos as _dnsmos
    except ImportError as e:
        raise RuntimeError("DNSMOS needs speechmos and onnxruntime: "
                           "pip install 'calm_fast[eval]'") from e
    wav = wav.reshape(1, -1).float()
    if sample_rate != 16_000:
        wav = resample(wav, sample_rate, 16_000)
    x = wav[0].clamp(-1, 1).numpy()
    r = _dnsmos.run(x, 16_000)
    return {"ovrl": float(r["ovrl_mos"]), "sig": float(r["sig_mos"]), "bak": float(r["bak_mos"])}
