"""Aligned text: the phonemes under each frame, added to that frame's backbone input.

A prefix-text CALM (Pocket TTS) must find its place in the text by attention, which takes
far more audio than a laptop can train on. An aligned CALM is told: phoneme durations (in
``sub`` sub-frames of 10 ms per 80 ms frame) place every phoneme on the time axis, and the
row added to the input of frame s is

    rows[s] = W_fold [e(sub-frame 8s), ..., e(sub-frame 8s + 7)],   e = W_e h_p + pos_k

where h_p is the encoder state of the phoneme under that sub-frame (a bidirectional conv
stack over the phoneme embeddings) and pos_k the sub-frame's place in the frame. The
durations come from ``train/aligner.py`` in training and from ``durations()`` (a conv
predictor over h, conditioned on the voice prompt's mean latent, since speakers differ in
rate) at inference. The frame count is fixed by the durations: generation needs no EOS.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvStack(nn.Module):
    def __init__(self, width: int, layers: int, kernel: int = 5):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=kernel // 2)
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, P, w]; mask [B, P] (True on real phonemes): padded rows are held at zero,
        as the convs' own zero padding is at inference."""
        keep = None if mask is None else mask[..., None].to(h.dtype)
        for conv, norm in zip(self.convs, self.norms):
            if keep is not None:
                h = h * keep
            h = h + F.gelu(norm(conv(h.transpose(1, 2)).transpose(1, 2)))
        return h if keep is None else h * keep


class AlignedText(nn.Module):
    def __init__(self, d: int, latent_dim: int, sub: int = 8, layers: int = 4,
                 fold_dim: int = 64):
        super().__init__()
        self.sub = sub
        self.encoder = ConvStack(d, layers)
        self.dur_in = nn.Linear(d, d)
        self.dur_voice = nn.Linear(latent_dim, d)
        self.dur_net = ConvStack(d, 2, kernel=3)
        self.dur_out = nn.Linear(d, 1)
        self.fold_in = nn.Linear(d, fold_dim)
        self.fold_pos = nn.Parameter(0.02 * torch.randn(sub, fold_dim))
        self.fold = nn.Linear(sub * fold_dim, d)

    def encode(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Phoneme embeddings [B, P, d] -> states [B, P, d] (mask [B, P]: real rows)."""
        return self.encoder(emb, mask)

    def log_durations(self, h: torch.Tensor, voice_mean: torch.Tensor | None,
                      present: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """log(1 + sub-frames) per phoneme [B, P]. voice_mean: the prompt's raw latents'
        mean [B, C], or None (no prompt); present [B]: which rows have a prompt."""
        x = self.dur_in(h.detach())
        if voice_mean is not None:
            add = self.dur_voice(voice_mean)
            if present is not None:
                add = add * present[:, None].to(add.dtype)
            x = x + add[:, None]
        return self.dur_out(self.dur_net(x, mask))[..., 0]

    def durations(self, h: torch.Tensor, voice_mean: torch.Tensor | None,
                  speed: float = 1.0) -> torch.Tensor:
        """Integer sub-frames >= 1 per phoneme [B, P] (``speed`` > 1 speaks faster)."""
        d = torch.expm1(self.log_durations(h, voice_mean)).clamp(min=0) / speed
        return torch.round(d).clamp(min=1).long()

    def frame_rows(self, h: torch.Tensor, durations: torch.Tensor, frames: int) -> torch.Tensor:
        """h [P, d] of one utterance, durations [P] (sub-frames) -> rows [frames, d]; the
        sub-frames past the last phoneme (and of frames past the durations' end) are zero."""
        e = self.fold_in(h)
        seq = torch.repeat_interleave(e, durations.to(h.device), 0)[:frames * self.sub]
        if seq.shape[0] < frames * self.sub:
            seq = F.pad(seq, (0, 0, 0, frames * self.sub - seq.shape[0]))
        seq = seq.view(frames, self.sub, -1) + self.fold_pos
        return self.fold(seq.reshape(frames, -1))

    @staticmethod
    def frames_for(durations: torch.Tensor, sub: int) -> int:
        return max(1, -(-int(durations.sum()) // sub))
