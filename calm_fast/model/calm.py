"""The CALM model: backbone + short-context Transformer + head + EOS + latent normalisation.

    sequence = [prefix rows, input_linear(BOS), input_linear(x~^0), ..., input_linear(x~^{S-2})]
    Z^s      = out_norm(backbone(sequence))[prefix + s] + short([BOS, x^0, ..., x^{s-1}])
    x^s      ~ head(Z^s, noise)            eos^s = out_eos(Z^s)

x~ is the VP-noised latent in training (``cfg.vp_noise``), the clean one at inference. All
latents here are normalised per channel by the stored ``emb_mean`` / ``emb_std``; the VAE
decoder wants ``denormalize(x)``. Names and layout of every tensor equal Pocket TTS's
``FlowLMModel`` (plus ``short.*`` and ``tags.*``, which Pocket TTS does not have), so its
checkpoints load as they are (``calm_fast.compat.pocket_tts``).

This module is the training model and the dense oracle; generation runs the same weights
through the paged fast path (``calm_fast.generate``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from calm_fast.model.aligned_text import AlignedText
from calm_fast.model.conditioning import TagConditioner, TextConditioner
from calm_fast.model.config import CALMConfig
from calm_fast.model.head import AdaLNHead
from calm_fast.model.short_context import ShortContext
from calm_fast.model.transformer import Transformer, causal_mask


def vp_noise_injection(x: torch.Tensor, generator=None) -> torch.Tensor:
    """x~ = sqrt(k) eps + sqrt(1 - k) x with k ~ U(0, 1) drawn per frame (training only).

    x: [B, T, C]; one k per (b, t), shared by the C channels of a frame.
    """
    k = torch.rand(*x.shape[:-1], 1, generator=generator, device=x.device, dtype=x.dtype)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return k.sqrt() * eps + (1 - k).sqrt() * x


def check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf")


class CALM(nn.Module):
    def __init__(self, cfg: CALMConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        d, C = cfg.backbone.d_model, cfg.latent_dim
        if cfg.text_bins:
            self.conditioner = TextConditioner(cfg.text_bins, d, tokenizer)
        if cfg.music_tags:
            self.tags = TagConditioner(cfg.music_tags, d)
        self.flow_net = AdaLNHead(cfg.head, C, d)
        self.register_buffer("emb_std", torch.ones(C))
        self.register_buffer("emb_mean", torch.zeros(C))
        self.bos_emb = nn.Parameter(torch.randn(C))
        if cfg.bos_before_voice:
            self.bos_before_voice = nn.Parameter(torch.randn(1, 1, d))
        self.input_linear = nn.Linear(C, d, bias=False)
        self.transformer = Transformer(cfg.backbone)
        self.out_norm = nn.LayerNorm(d, eps=1e-5)
        self.out_eos = nn.Linear(d, 1)
        if cfg.voice:
            self.speaker_proj_weight = nn.Parameter(0.02 * torch.randn(d, cfg.prompt_dim))
        if cfg.short_context is not None:
            self.short = ShortContext(cfg.short_context, C, d)
        if cfg.aligned_text:
            self.aligned = AlignedText(d, C)

    # -- latent space ------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.emb_mean) / self.emb_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.emb_std + self.emb_mean

    def check_latents(self, name: str, x: torch.Tensor, allow_empty: bool = False) -> None:
        C = self.cfg.latent_dim
        if x.dim() < 2 or x.shape[-1] != C:
            raise ValueError(f"{name} must be [..., frames, {C}] latents, got {tuple(x.shape)}")
        if x.shape[-2] == 0 and not allow_empty:
            raise ValueError(f"{name} is empty (0 frames)")
        check_finite(name, x)

    # -- conditioning --------------------------------------------------------------------------
    def prefix(self, text: str | None = None, voice: torch.Tensor | None = None,
               tags=None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning rows [P, d]: [bos_before_voice, voice, tags, text].

        voice: raw (un-normalised) VAE latents [T, latent_dim], as Pocket TTS projects them;
        text: a string (needs a tokenizer) or ``tokens`` (ids); tags: music tag names."""
        rows = [self.bos_before_voice[0]] if self.cfg.bos_before_voice else []
        if voice is not None:
            if not self.cfg.voice:
                raise ValueError(f"preset {self.cfg.name!r} has no voice conditioning")
            V = self.cfg.prompt_dim
            if voice.dim() != 2 or voice.shape[1] != V:
                raise ValueError(f"voice prompt must be [frames, {V}] features, got "
                                 f"{tuple(voice.shape)}")
            if voice.shape[0] == 0:
                raise ValueError("voice prompt is empty (0 frames)")
            check_finite("voice prompt", voice)
            if self.cfg.max_voice_frames:  # the prompt length the model was trained on
                voice = voice[:self.cfg.max_voice_frames]
            rows.append(voice @ self.speaker_proj_weight.t())
        if tags is not None:
            if not self.cfg.music_tags:
                raise ValueError(f"preset {self.cfg.name!r} has no music tags")
            rows.append(self.tags(self.tags.encode(tags)))
        if text is not None or tokens is not None:
            if self.cfg.aligned_text:
                raise ValueError(f"model {self.cfg.name!r} reads its text as aligned frame rows, "
                                 f"not in the prefix: use text_inputs()")
            if not self.cfg.text_bins:
                raise ValueError(f"preset {self.cfg.name!r} has no text conditioning")
            ids = self.conditioner.tokenize(text) if tokens is None else tokens
            if ids.numel() == 0:
                raise ValueError("empty text: nothing to say")
            rows.append(self.conditioner(ids))
        if not rows:
            raise ValueError(f"model {self.cfg.name!r} has no BOS row before the voice: give a "
                             f"voice prompt or a text (an empty prefix conditions on nothing)")
        out = torch.cat(rows)
        if out.shape[0] >= self.cfg.max_context:
            raise ValueError(f"prefix of {out.shape[0]} rows does not fit the context of "
                             f"{self.cfg.max_context} rows")
        return out

    # -- aligned text (cfg.aligned_text) -----------------------------------------------------
    def text_ids(self, text: str | None = None, tokens: torch.Tensor | None = None):
        """The ids an aligned model reads: a word boundary at both ends (its silences)."""
        ids = self.conditioner.tokenize(text) if tokens is None else tokens
        if ids.numel() == 0:
            raise ValueError("empty text: nothing to say")
        edge = ids.new_zeros(1)
        return torch.cat([edge, ids.to(edge.device), edge])

    def text_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Encoder states [P, d] of aligned ids [P]."""
        return self.aligned.encode(self.conditioner(ids)[None])[0]

    def text_inputs(self, text: str | None = None, voice: torch.Tensor | None = None,
                    tokens: torch.Tensor | None = None, speed: float = 1.0,
                    durations: torch.Tensor | None = None, max_frames: int | None = None):
        """(prefix [P, d], frame rows [F, d]) of an aligned model: the prefix holds the
        voice; the rows hold the text, on the durations predicted from the text and the
        voice (or the ``durations`` given, in sub-frames). ``speed`` > 1 speaks faster."""
        if not self.cfg.aligned_text:
            raise ValueError(f"model {self.cfg.name!r} reads its text in the prefix: use prefix()")
        if not (isinstance(speed, (int, float)) and 0.25 <= speed <= 4):
            raise ValueError(f"speed must be a number in [0.25, 4], got {speed!r}")
        ids = self.text_ids(text, tokens)
        if ids.numel() > self.conditioner.max_tokens:
            raise ValueError(f"text is {ids.numel()} phonemes long, more than "
                             f"{self.conditioner.max_tokens}; split it into sentences")
        prefix = self.prefix(voice=voice)
        h = self.text_states(ids)
        if durations is None:
            vm = None if voice is None else voice[:self.cfg.max_voice_frames or None].mean(0)[None]
            durations = self.aligned.durations(h[None], vm, speed)[0]
        frames = AlignedText.frames_for(durations, self.aligned.sub)
        limit = self.cfg.max_context - prefix.shape[0] - 1
        if max_frames is not None:
            limit = min(limit, max_frames)
        if frames > limit:
            raise ValueError(f"the text needs {frames} frames, more than the {limit} this "
                             f"request may make; split it into sentences")
        return prefix, self.aligned.frame_rows(h, durations, frames)

    def null_prefix(self) -> torch.Tensor:
        """The unconditioned prefix of latent CFG: [1, d]."""
        if not self.cfg.bos_before_voice:
            raise ValueError(f"model {self.cfg.name!r} was trained without a BOS row before the "
                             f"voice, so it has no unconditioned prefix for latent CFG: use "
                             f"cfg_scale 1, or pass the request's null_prefix")
        return self.bos_before_voice[0]

    # -- training / dense forward ----------------------------------------------------------
    def forward(self, latents: torch.Tensor, prefix: torch.Tensor,
                prefix_mask: torch.Tensor | None = None, generator=None,
                frame_rows: torch.Tensor | None = None):
        """latents [B, S, C] (normalised, clean), prefix [B, P, d] (left-padded when ragged,
        ``prefix_mask`` [B, P] True on real rows), frame_rows [B, S, d] (aligned text, added
        to the frames' inputs). Returns Z [B, S, d] and EOS logits [B, S]; Z^s predicts
        latents[:, s]."""
        self.check_latents("latents", latents)
        if latents.dim() != 3 or prefix.dim() != 3 or prefix.shape[0] != latents.shape[0]:
            raise ValueError(f"latents [B, S, C] and prefix [B, P, d] must share B, got "
                             f"{tuple(latents.shape)} and {tuple(prefix.shape)}")
        check_finite("prefix", prefix)
        B, S, _ = latents.shape
        P = prefix.shape[1]
        if P + S > self.cfg.max_context:
            raise ValueError(f"{P} prefix rows + {S} frames exceed the context of "
                             f"{self.cfg.max_context} rows")
        inputs = torch.cat([self.bos_emb.expand(B, 1, -1), latents[:, :-1]], 1)
        noisy = inputs
        if self.training and self.cfg.vp_noise:
            noised = vp_noise_injection(latents[:, :-1], generator)
            noisy = torch.cat([inputs[:, :1], noised], 1)  # BOS stays clean
        rows = self.input_linear(noisy)
        if frame_rows is not None:
            rows = rows + frame_rows
        seq = torch.cat([prefix, rows], 1)
        mask = None
        if prefix_mask is not None:
            T = P + S
            keys = torch.cat([prefix_mask.bool(), prefix_mask.new_ones(B, S, dtype=torch.bool)], 1)
            mask = causal_mask(T, seq.device)[None] & keys[:, None, :]
            mask |= torch.eye(T, dtype=torch.bool, device=seq.device)  # pad rows see themselves
            mask = mask[:, None]
        z = self.out_norm(self.transformer(seq, mask))[:, P:]
        if hasattr(self, "short"):
            z = z + self.short(inputs)
        return z, self.out_eos(z)[..., 0]

