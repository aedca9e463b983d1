"""Recipe ``vae``: train the audio VAE on a dataset manifest.

    [data]  manifest = "data/speech/manifest.jsonl", splits, segment_seconds, batch
    [model] preset = "small_speech" (+ any VAEConfig field)
    [loss]  VAELossConfig fields (kl, time, stft, mel, adv, feat)

Batches are random crops from the clips of the chosen splits, all held in memory at the
VAE's rate. With ``adv`` or ``feat`` > 0 a multi-scale STFT discriminator trains in the same
step: the generator's terms see it through detached parameters (so they never push it), the
hinge loss trains it on a detached reconstruction, and one optimizer steps both. At the end
the EMA weights are exported to ``out_dir/vae.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from calm_fast.codec.audio import load_audio, write_audio
from calm_fast.train.trainer import TrainConfig
from calm_fast.codec.vae import VAE, VAEConfig, vae_preset
from calm_fast.codec.losses import (MultiScaleSTFTDiscriminator, VAELossConfig, feature_matching_loss, hinge_d_loss, hinge_g_loss, reconstruction_loss)
from calm_fast.train.recipes.common import batch_generator, train_and_export
from calm_fast.train.recipes.config import RecipeError, build, build_preset


@dataclass(frozen=True)
class VAEData:
    manifest: str
    splits: tuple[str, ...] = ("train",)
    segment_seconds: float = 1.0
    batch: int = 8
    max_files: int = 0  # 0 = all


def read_manifest(path, splits) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no manifest at {path} (build one with `calm-fast data speech`)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") in splits]
    if not rows:
        raise RecipeError(f"{path} lists no file in splits {list(splits)}")
    return rows


class Clips:
    """Every clip of the chosen splits, mono, at ``sample_rate``, in memory."""

    def __init__(self, manifest, splits, sample_rate: int, max_files: int = 0):
        rows = read_manifest(manifest, splits)
        rows = rows[:max_files] if max_files else rows
        root = Path(manifest).parent
        self.clips = [load_audio(root / r["path"], sample_rate)[0] for r in rows]
        self.weights = torch.tensor([float(len(c)) for c in self.clips])

    def crops(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """[n, 1, length] crops; clips are picked in proportion to their length, shorter
        ones are zero-padded at the end."""
        pick = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        out = torch.zeros(n, 1, length)
        for j, i in enumerate(pick.tolist()):
            c = self.clips[i]
            start = int(torch.randint(0, max(1, len(c) - length + 1), (1,), generator=generator))
            seg = c[start:start + length]
            out[j, 0, :len(seg)] = seg
        return out


class VAETraining(nn.Module):
    """VAE (+ optional discriminator); ``forward(wav)`` returns (loss, logs)."""

    def __init__(self, vae: VAE, loss: VAELossConfig):
        super().__init__()
        self.vae, self.loss_cfg = vae, loss
        self.disc = MultiScaleSTFTDiscriminator() if (loss.adv or loss.feat) else None

    def forward(self, wav):
        c = self.loss_cfg
        x = self.vae.pad(wav)
        recon, kl, _ = self.vae(x)
        loss, logs = reconstruction_loss(x, recon, kl, c, self.vae.cfg.sample_rate)
        if self.disc is not None:
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            fake = functional_call(self.disc, frozen, (recon,))
            real = self.disc(x)
            logs["adv"], logs["feat"] = hinge_g_loss(fake), feature_matching_loss(real, fake)
            logs["d"] = hinge_d_loss(real, self.disc(recon.detach()))
            loss = loss + c.adv * logs["adv"] + c.feat * logs["feat"] + logs["d"]
        return loss, {k: v.detach() for k, v in logs.items()}


def run(recipe: dict) -> Path:
    data = build(VAEData, recipe["data"], "data")
    cfg = build_preset(VAEConfig, recipe["model"], "model", vae_preset)
    loss_cfg = build(VAELossConfig, recipe["loss"], "loss")
    train_cfg = build(TrainConfig, recipe["train"], "train", out_dir=recipe["out_dir"])
    clips = Clips(data.manifest, data.splits, cfg.sample_rate, data.max_files)
    length = round(data.segment_seconds * cfg.sample_rate)
    if length < cfg.frame_size:
        raise RecipeError(f"segment_seconds={data.segment_seconds} is shorter than one "
                          f"latent frame ({cfg.frame_size} samples)")
    torch.manual_seed(train_cfg.seed)
    module = VAETraining(VAE(cfg), loss_cfg)

    def batch_fn(step, micro, rank, world):
        return clips.crops(data.batch, length, batch_generator(train_cfg.seed, step, micro, rank))

    probe = clips.clips[0][:min(len(clips.clips[0]), 4 * cfg.sample_rate)][None, None]

    def sample_fn(model, step, out):
        with torch.no_grad():
            wav = model.vae.decode(model.vae.encode(model.vae.pad(probe)))[0, :, :probe.shape[-1]]
        write_audio(out / "samples" / f"recon_{step:07d}.flac", wav, cfg.sample_rate)

    return train_and_export(module, lambda m, b: m(b), batch_fn, train_cfg,
                            Path(recipe["out_dir"]) / "vae.safetensors", lambda m: m.vae,
                            {"recipe": "vae"}, sample_fn=sample_fn)
