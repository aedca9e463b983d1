"""Phoneme durations for the aligned-text TTS, learnt from the audio alone (no aligner model
is downloaded, no synthesizer timing is trusted).

Why: a decoder-only CALM that reads the text as a prefix must learn where it is in the
text from a few hours of audio; three runs on 2 cores never did (benchmarks/results/
training.md). Given durations, every frame is told which phonemes it covers
(``model/aligned_text.py``) and the LM learns only what they sound like.

How (the prior-loss alignment of Grad-TTS / Glow-TTS, without a flow): a small
bidirectional conv encoder maps the phonemes to means mu_p in the space of per-utterance
normalised log-mels at 100 Hz (hop 240 at 24 kHz, 8 sub-frames per 12.5 Hz latent frame);
monotonic alignment search (``mas``) finds the hard alignment of mel frames to phonemes that
maximises sum_t -|mel_t - mu_a(t)|^2 / 2, each phoneme >= 1 sub-frame; the encoder is
trained on that alignment's squared error. The alignment converges within a few hundred
steps; the durations of every utterance are then written beside the latent cache.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_fast.codec.losses import mel_filterbank
from calm_fast.errors import CalmFastError

HOP, N_FFT, N_MELS = 240, 480, 80


class AlignerError(CalmFastError, ValueError):
    pass


def aligned_tokens(ids: list[int]) -> list[int]:
    """The token sequence an aligned model reads: the phoneme ids with a word boundary (id
    0) at both ends, which take the leading and trailing silence."""
    return [0] + [int(i) for i in ids] + [0]


def log_mel(wav: np.ndarray, sample_rate: int, sub_frames: int) -> torch.Tensor:
    """[sub_frames, 80] log-mel of a mono wav, one row per HOP samples: row j is the 20 ms
    window centred on sub-frame j (samples [HOP j, HOP (j + 1))), so that a duration in
    rows is one in sub-frames, with no lag (the aligner is offline: it may look ahead)."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    need = HOP * sub_frames
    left = (N_FFT - HOP) // 2
    x = F.pad(x, (left, max(0, need + N_FFT - HOP - left - x.numel())))[:need + N_FFT - HOP]
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=False,
                      return_complex=True).abs() ** 2
    fb = mel_filterbank(sample_rate, N_FFT, N_MELS)
    mel = torch.log(fb @ spec + 1e-5).T[:sub_frames]
    # per utterance, the mean of each band off (channel and speaker colour) and one scale for
    # all bands: a per-band scale would blow the noise of bands a short utterance never uses
    # up to the size of the ones that carry it
    mel = mel - mel.mean(0)
    return mel / (mel.std() + 1e-3)


def mas(logp: torch.Tensor) -> torch.Tensor:
    """Monotonic alignment search. logp [P, T] (phoneme p emits frame t); returns the
    durations [P] (ints >= 1, summing to T) of the best path that starts at phoneme 0, ends
    at phoneme P-1 and advances by 0 or 1 phoneme per frame. Needs T >= P."""
    P, T = logp.shape
    return mas_batch(logp[None], [P], [T])[0]


def mas_batch(logp: torch.Tensor, P_len, T_len) -> list[torch.Tensor]:
    """``mas`` of a padded batch: logp [B, P, T], utterance b's real part [:P_len[b],
    :T_len[b]]. One pass over the frames for the whole batch, then a backtrack each."""
    B, Pm, Tm = logp.shape
    for p, t in zip(P_len, T_len):
        if t < p:
            raise AlignerError(f"{t} frames cannot hold {p} phonemes (each needs one)")
    neg = -1e9
    logp = logp.detach().double().clone()
    for b, p in enumerate(P_len):
        logp[b, p:] = neg
    v = torch.full((B, Pm), neg, dtype=torch.float64)
    v[:, 0] = logp[:, 0, 0]
    came = torch.zeros(B, Tm, Pm, dtype=torch.bool)  # frame t entered phoneme p from p-1
    pad = torch.full((B, 1), neg, dtype=torch.float64)
    T_len_t = torch.tensor(list(T_len))
    for t in range(1, Tm):
        move = torch.cat([pad, v[:, :-1]], 1)
        c = move > v
        active = (t < T_len_t)[:, None]
        v = torch.where(active, torch.maximum(v, move) + logp[:, :, t], v)
        came[:, t] = c & active
    came = came.numpy()
    out = []
    for b in range(B):
        dur = np.zeros(P_len[b], dtype=np.int64)
        p = P_len[b] - 1
        for t in range(T_len[b] - 1, -1, -1):
            dur[p] += 1
            if t > 0 and came[b, t, p]:
                p -= 1
        if p != 0:
            raise AlignerError("alignment search did not reach the first phoneme")
        out.append(torch.from_numpy(dur))
    return out


class MelEncoder(nn.Module):
    """Phonemes -> mel means [P, 80]: embedding + bidirectional conv blocks."""

    def __init__(self, vocab: int, width: int = 192, layers: int = 4, kernel: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=kernel // 2)
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.out = nn.Linear(width, N_MELS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, P] -> [B, P, 80]
        h = self.emb(ids)
        for conv, norm in zip(self.convs, self.norms):
            h = h + F.gelu(norm(conv(h.transpose(1, 2)).transpose(1, 2)))
        return self.out(h)


def _load(index_rows, root: Path, tokenizer, sub: int, sample_rate: int):
    items = []
    for i, r in index_rows:
        ids = aligned_tokens(tokenizer.encode(r.get("text", "")))
        T = r["frames"] * sub
        if len(ids) > T or len(ids) < 3:
            continue
        wav, sr = sf.read(root / r["path"], dtype="float32", always_2d=True)
        if sr != sample_rate:
            raise AlignerError(f"{r['path']}: {sr} Hz, expected {sample_rate}")
        items.append((i, torch.tensor(ids), log_mel(wav.mean(1), sample_rate, T)))
    return items


def _align(mu: torch.Tensor, part) -> list[torch.Tensor]:
    """Durations of a batch: mu [B, P, 80] of the items (row, ids, mel) of ``part``."""
    with torch.no_grad():
        T = max(mel.shape[0] for _, _, mel in part)
        logp = torch.full((len(part), mu.shape[1], T), -1e9)
        for b, (_, x, mel) in enumerate(part):
            logp[b, :len(x), :mel.shape[0]] = -0.5 * torch.cdist(mu[b, :len(x)], mel) ** 2
        return mas_batch(logp, [len(x) for _, x, _ in part], [mel.shape[0] for _, _, mel in part])


def align_cache(latents_dir, manifest, tokenizer, *, steps: int = 600, batch: int = 16, kernel: int = 1,
                lr: float = 2e-3, seed: int = 0, log=print) -> Path:
    """Train the aligner on every utterance of a latent cache and write
    ``latents_dir/durations.jsonl``: per cache row with text, its ``durations`` in 100 Hz
    sub-frames over ``aligned_tokens(ids)`` (summing to 8 x frames)."""
    from calm_fast.data.latents import LatentCache

    cache = LatentCache(latents_dir)
    sr, fr = int(cache.meta["sample_rate"]), float(cache.meta["frame_rate"])
    sub = round(sr / fr / HOP)
    if abs(sub * HOP - sr / fr) > 1e-6:
        raise AlignerError(f"a latent frame of {sr / fr} samples is not a whole number of "
                           f"{HOP}-sample sub-frames")
    root = Path(manifest).parent
    t0 = time.time()
    items = _load([(i, r) for i, r in enumerate(cache.index) if r.get("text")], root,
                  tokenizer, sub, sr)
    if not items:
        raise AlignerError(f"{latents_dir}: no utterance with text fits its frames")
    log(f"aligner: {len(items)} utterances, mels in {time.time() - t0:.0f} s")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = MelEncoder(tokenizer.vocab_size, kernel=kernel)
    opt = torch.optim.Adam(enc.parameters(), lr)
    for step in range(steps):
        pick = [items[k] for k in torch.randint(len(items), (batch,), generator=g).tolist()]
        P = max(len(ids) for _, ids, _ in pick)
        ids = torch.zeros(len(pick), P, dtype=torch.long)
        for b, (_, x, _) in enumerate(pick):
            ids[b, :len(x)] = x
        mu = enc(ids)
        durs = _align(mu, pick)
        loss = 0.0
        for b, ((_, x, mel), dur) in enumerate(zip(pick, durs)):
            target = torch.repeat_interleave(mu[b, :len(x)], dur, 0)
            loss = loss + ((target - mel) ** 2).mean()
        loss = loss / len(pick)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if step % 50 == 0 or step == steps - 1:
            log(f"aligner step {step}: prior loss {float(loss.detach()):.3f} ({time.time() - t0:.0f} s)")
    out = Path(latents_dir) / "durations.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    with torch.no_grad(), open(tmp, "w") as f:
        for k in range(0, len(items), batch):
            part = items[k:k + batch]
            P = max(len(ids) for _, ids, _ in part)
            ids = torch.zeros(len(part), P, dtype=torch.long)
            for b, (_, x, _) in enumerate(part):
                ids[b, :len(x)] = x
            for (i, _, _), dur in zip(part, _align(enc(ids), part)):
                f.write(json.dumps({"row": i, "path": cache.index[i]["path"],
                                    "durations": dur.tolist()}) + "\n")
    tmp.replace(out)
    log(f"aligner: wrote {out} ({time.time() - t0:.0f} s)")
    return out


def read_durations(latents_dir) -> dict[int, list[int]]:
    """The durations of ``align_cache``, by cache row (an empty dict if none were made)."""
    path = Path(latents_dir) / "durations.jsonl"
    if not path.is_file():
        return {}
    return {r["row"]: r["durations"] for r in
            (json.loads(line) for line in path.read_text().splitlines() if line.strip())}
