"""Latent cache: encode a dataset's audio once with the VAE, store it memory-mapped.

Layout in ``out_dir``: ``latents.f32`` (all frames of all files, [total_frames, C] float32,
concatenated), ``index.jsonl`` (one row per file: manifest fields + ``offset`` and
``frames``), ``meta.json`` (C, frame rate, total, the encoder's name). Training reads
windows with ``LatentCache.window(i, start, length)`` without loading the whole set.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..errors import CalmFastError


class LatentCacheError(CalmFastError, ValueError):
    """A latent cache that is missing, truncated, or inconsistent with its index."""


@torch.no_grad()
def build_latent_cache(manifest, encode_fn, out_dir, *, sample_rate: int, frame_rate: float,
                       latent_dim: int, encoder_name: str = "vae", batch_seconds: float = 60.0,
                       force: bool = False):
    """Encode every file of a JSONL ``manifest`` with ``encode_fn(wav[1, 1, T]) -> [1, C, F]``.

    Files are read at ``sample_rate`` (a mismatch is an error: resample when building the
    dataset, not silently here). Everything is written to temporary names and renamed at the
    end, so an interrupted build leaves no half cache behind.
    """
    manifest = Path(manifest)
    out = Path(out_dir)
    if (out / "meta.json").is_file() and not force:
        old = json.loads((out / "meta.json").read_text())
        raise LatentCacheError(f"{out} already holds a latent cache ({old.get('files')} files "
                               f"by {old.get('encoder')}): choose another folder, or force=True "
                               f"(--force) to replace it")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    if not rows:
        raise LatentCacheError(f"{manifest} lists no files")
    out.mkdir(parents=True, exist_ok=True)
    tmp_lat, tmp_idx = out / "latents.f32.tmp", out / "index.jsonl.tmp"
    offset = 0
    with open(tmp_lat, "wb") as flat, open(tmp_idx, "w") as idx:
        for row in rows:
            path = manifest.parent / row["path"]
            wav, sr = sf.read(path, dtype="float32", always_2d=True)
            if sr != sample_rate:
                raise LatentCacheError(f"{path}: {sr} Hz, the encoder expects {sample_rate} Hz")
            x = torch.from_numpy(wav.mean(axis=1))[None, None]
            z = encode_fn(x)
            if z.dim() != 3 or z.shape[0] != 1 or z.shape[1] != latent_dim:
                raise LatentCacheError(f"encoder returned {tuple(z.shape)}, expected "
                                       f"[1, {latent_dim}, frames]")
            if not torch.isfinite(z).all():
                raise LatentCacheError(f"encoder returned non-finite latents for {path}")
            frames = z[0].T.contiguous().float().numpy()  # [F, C]
            flat.write(frames.tobytes())
            idx.write(json.dumps({**row, "offset": offset, "frames": len(frames)}) + "\n")
            offset += len(frames)
    meta = {"latent_dim": latent_dim, "frame_rate": frame_rate, "total_frames": offset,
            "sample_rate": sample_rate, "encoder": encoder_name, "files": len(rows)}
    os.replace(tmp_lat, out / "latents.f32")
    os.replace(tmp_idx, out / "index.jsonl")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


class LatentCache:
    """Read-only, memory-mapped view of a cache made by ``build_latent_cache``."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.index = [json.loads(line) for line in
                          (self.path / "index.jsonl").read_text().splitlines()]
        except (OSError, json.JSONDecodeError) as e:
            raise LatentCacheError(f"{self.path} is not a latent cache: {e}") from e
        try:
            c, total = int(self.meta["latent_dim"]), int(self.meta["total_frames"])
        except (KeyError, TypeError, ValueError) as e:
            raise LatentCacheError(f"{self.path}/meta.json lacks latent_dim/total_frames: "
                                   f"{e}") from e
        for n, r in enumerate(self.index, 1):  # every row inside the data, none overlapping
            off, fr = r.get("offset"), r.get("frames")
            if not (isinstance(off, int) and isinstance(fr, int) and off >= 0 and fr >= 0
                    and off + fr <= total):
                raise LatentCacheError(f"{self.path}/index.jsonl:{n}: rows [{off}, +{fr}) run "
                                       f"past the {total} frames of latents.f32 (a cache "
                                       f"from another build? rebuild it)")
        ends = sorted((r["offset"], r["offset"] + r["frames"]) for r in self.index)
        if any(b[0] < a[1] for a, b in zip(ends, ends[1:])):
            raise LatentCacheError(f"{self.path}/index.jsonl: two files overlap in the data")
        lat = self.path / "latents.f32"
        if not lat.exists() or lat.stat().st_size != 4 * c * total:
            raise LatentCacheError(f"{lat} holds {lat.stat().st_size if lat.exists() else 0} "
                                   f"bytes, expected {4 * c * total} ({total} frames x {c})")
        self.data = np.memmap(lat, dtype=np.float32, mode="r", shape=(total, c))

    def __len__(self) -> int:
        return len(self.index)

    def latents(self, i: int) -> np.ndarray:
        r = self.index[i]
        return self.data[r["offset"]:r["offset"] + r["frames"]]

    def window(self, i: int, start: int, length: int) -> np.ndarray:
        r = self.index[i]
        if start < 0 or length <= 0 or start + length > r["frames"]:
            raise IndexError(f"window [{start}, {start + length}) outside file {i} "
                             f"of {r['frames']} frames")
        return self.data[r["offset"] + start:r["offset"] + start + length]
