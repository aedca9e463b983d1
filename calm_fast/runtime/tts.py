"""Text (+ voice prompt audio) -> audio with a trained CALM and its VAE, in batches.

    tts = TTS.from_files("runs/lm/model.safetensors", "runs/vae/vae.safetensors")
    wavs = tts.synthesize(["Hello there.", "Good night."], voice="ref.flac", seed=0)

The voice prompt is encoded once by the VAE and shared by every text; all texts generate as
one batch through ``CALMGenerator`` (fast paths), then decode as one VAE batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from calm_fast.codec.audio import load_audio
from calm_fast.runtime.export import load_model
from calm_fast.runtime.generate import CALMGenerator, Request
from calm_fast.runtime.voices import text_inputs
from calm_fast.model.calm import CALM
from calm_fast.codec.vae import VAE
from calm_fast.fast import vae as fast_vae


class TTS:
    def __init__(self, lm: CALM, vae: VAE, head_steps: int = 1, int8: bool = False):
        if lm.cfg.latent_dim != vae.cfg.latent_dim:
            raise ValueError(f"the LM makes {lm.cfg.latent_dim}-dim latents, the VAE takes "
                             f"{vae.cfg.latent_dim}")
        if not lm.cfg.text_bins:
            raise ValueError(f"model {lm.cfg.name!r} has no text input")
        self.lm, self.vae = lm.eval(), vae.eval()
        self.gen = CALMGenerator(lm, head_steps=head_steps, int8=int8)

    @classmethod
    def from_files(cls, lm_path, vae_path, **kw) -> "TTS":
        return cls(load_model(lm_path, expect="calm"), load_model(vae_path, expect="vae"), **kw)

    @property
    def sample_rate(self) -> int:
        return self.vae.cfg.sample_rate

    @torch.no_grad()
    def voice_latents(self, voice, max_seconds: float = 10.0) -> torch.Tensor:
        """Raw VAE latents [T, C] of a voice prompt: a file path or a [1, samples] tensor at
        the VAE's rate; longer prompts are cut to ``max_seconds``."""
        wav = load_audio(voice, self.sample_rate) if isinstance(voice, (str, Path)) else voice
        if wav.dim() != 2 or wav.shape[0] != 1:
            raise ValueError(f"voice audio must be [1, samples], got {tuple(wav.shape)}")
        wav = wav[:, :round(max_seconds * self.sample_rate)]
        if wav.shape[1] < self.vae.cfg.frame_size:
            raise ValueError(f"voice prompt is shorter than one frame "
                             f"({self.vae.cfg.frame_size} samples)")
        return self.vae.encode(self.vae.pad(wav[None]))[0]

    @torch.no_grad()
    def synthesize(self, texts: list[str], voice=None, *, max_seconds: float = 15.0,
                   temperature: float = 0.7, cfg_scale: float = 1.0, seed: int = 0,
                   eos_threshold: float | None = -4.0, frames_after_eos: int = 2
                   ) -> list[torch.Tensor]:
        """One waveform [samples] per text (batch generation; request i uses seed + i)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no text to synthesize")
        v = None if voice is None else self.voice_latents(voice)
        frames = max(1, round(max_seconds * self.lm.cfg.frame_rate))
        reqs = []
        for i, t in enumerate(texts):
            prefix, rows = text_inputs(self.lm, text=t, voice=v)
            if rows is not None:  # aligned text: the durations fix the length
                reqs.append(Request(prefix, max_frames=len(rows), temperature=temperature,
                                    cfg_scale=cfg_scale, seed=seed + i, frame_cond=rows,
                                    eos_threshold=None))
                continue
            reqs.append(Request(prefix, max_frames=frames, temperature=temperature,
                                cfg_scale=cfg_scale, seed=seed + i, eos_threshold=eos_threshold,
                                frames_after_eos=frames_after_eos))
        lats = self.gen.generate(reqs)
        # One VAE batch: the decoder is causal, so zero frames padded after a shorter
        # stream's end change none of its samples; each is cut back to its own length.
        T = max(len(x) for x in lats)
        if T == 0:
            return [torch.zeros(0) for _ in lats]
        batch = torch.zeros(len(lats), T, self.lm.cfg.latent_dim)
        for i, x in enumerate(lats):
            batch[i, :len(x)] = self.lm.denormalize(x)
        wav = fast_vae.decode(self.vae, batch)[:, 0]
        n = self.vae.cfg.frame_size
        return [wav[i, :len(x) * n] for i, x in enumerate(lats)]
