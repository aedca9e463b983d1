"""Recipe ``lm``: train a CALM (backbone + short context + head + EOS) on a latent cache.

    [data]      latents = "runs/latents" (``calm-fast data latents``), splits, batch,
                max_frames, voice_frames, tokenizer, vae (optional, for audio samples),
                crop, tags (music: random windows of long files, tags from the index)
    [model]     preset = "tiny" (+ any CALMConfig field, nested tables for backbone/head);
                init = an LM export to start from (a warm start of the same architecture)
    [objective] kind, head_mult, p_text, p_voice, eos_weight, adaptive_weight, tangent_warmup

One training example is one whole utterance (text and audio must match, so nothing is
cropped; longer ones than ``max_frames`` are skipped) with its text, and a voice prompt of
``voice_frames`` frames cut from another utterance of the same speaker. Text and voice are
dropped independently for CFG. Music (``crop``, ``tags``): a random window of
``max_frames`` of any file (no end, so no EOS loss), conditioned on the tags of its index
row (model/music_tags.py), all dropped with ``p_text`` for CFG and each with ``p_tag`` so
that a caption naming a few of them is in the training distribution. Per frame: the head loss (LSD, consistency or flow
matching, ``head_mult`` noise/time draws per backbone output) on the real frames and the EOS
loss up to the end frame. The model's latent normalisation (emb_mean/emb_std) is measured on
the training latents. At the end the EMA model is exported to ``out_dir/model.safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from calm_fast.train import objectives as obj
from calm_fast.model.conditioning import ByteTokenizer, SentencePieceTokenizer
from calm_fast.model.phonemes import PhonemeTokenizer
from calm_fast.model import music_tags
from calm_fast.model.config import CALMConfig, preset
from calm_fast.data.latents import LatentCache
from calm_fast.model.calm import CALM
from calm_fast.model.transformer import causal_mask
from calm_fast.train.trainer import TrainConfig
from calm_fast.train.recipes.common import batch_generator, train_and_export
from calm_fast.train.aligner import read_durations
from calm_fast.train.recipes.config import RecipeError, build, build_preset
from calm_fast.runtime.export import load_model
from calm_fast.runtime.generate import CALMGenerator, Request
from calm_fast.codec.audio import write_audio


@dataclass(frozen=True)
class LMData:
    latents: str
    splits: tuple[str, ...] = ("train",)
    batch: int = 16
    max_frames: int = 150
    voice_frames: int = 0  # 0: no voice prompt
    tokenizer: str = "bytes"  # "bytes" | "phonemes" | "spm:<pieces>" (trained on the text) | a .model path
    vae: str = ""  # a VAE export: periodic samples are decoded to audio
    crop: bool = False  # random windows of max_frames from longer files (music), no EOS
    tags: bool = False  # music tags of each index row (model/music_tags.py) in the prefix


@dataclass(frozen=True)
class LMObjective:
    kind: str = "auto"  # lsd | consistency | flow; auto: the head's kind
    head_mult: int = 4  # noise/time draws per backbone output (paper: head batch multiplier)
    p_text: float = 0.1
    p_voice: float = 0.1
    p_tag: float = 0.0  # each music tag dropped on its own (all of them: p_text)
    eos_weight: float = 1.0
    adaptive_weight: bool = True
    tangent_warmup: int = 0  # consistency: steps over which the tangent weight r goes 0 -> 1
    # guided attention (objectives.guided_attention_loss): weight >= 0 (0 = off), on the
    # first ``align_heads`` heads of backbone layer ``align_layer``, width ``align_sigma``
    align_weight: float = 0.0
    align_layer: int = 1
    align_heads: int = 1
    align_sigma: float = 0.2
    duration_weight: float = 1.0  # aligned-text models: log-duration MSE of the predictor

    def check(self, head_kind: str) -> str:
        kind = head_kind if self.kind == "auto" else self.kind
        if kind not in ("lsd", "consistency", "flow"):
            raise RecipeError(f"objective.kind must be auto, lsd, consistency or flow, got "
                              f"{self.kind!r}")
        if (kind == "lsd") != (head_kind == "lsd"):
            raise RecipeError(f"objective {kind!r} does not fit a {head_kind!r} head "
                              f"(lsd takes two times, consistency and flow one)")
        if self.head_mult < 1:
            raise RecipeError(f"objective.head_mult must be >= 1, got {self.head_mult}")
        if not (self.align_weight >= 0 and self.align_sigma > 0):
            raise RecipeError(f"objective.align_weight must be >= 0 and align_sigma > 0, got "
                              f"{self.align_weight} and {self.align_sigma}")
        return kind

    def check_align(self, cfg: CALMConfig) -> None:
        b = cfg.backbone
        if self.align_weight and not cfg.text_bins:
            raise RecipeError("objective.align_weight needs a text-conditioned model")
        if self.align_weight and not (0 <= self.align_layer < b.num_layers
                                      and 1 <= self.align_heads <= b.num_heads):
            raise RecipeError(f"objective.align_layer must be in [0, {b.num_layers - 1}] and "
                              f"align_heads in [1, {b.num_heads}], got {self.align_layer} and "
                              f"{self.align_heads}")


def make_tokenizer(spec: str, texts: list[str]):
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "phonemes":
        return PhonemeTokenizer()
    if spec.startswith("spm:"):
        return SentencePieceTokenizer.train(texts, vocab_size=int(spec[4:]))
    if Path(spec).is_file():
        return SentencePieceTokenizer(spec)
    raise RecipeError(f"data.tokenizer must be 'bytes', 'phonemes', 'spm:<pieces>' or a SentencePiece "
                      f"model file, got {spec!r}")


class Utterances:
    """The whole utterances of a latent cache that fit ``max_frames``, with text ids and
    same-speaker voice prompts."""

    def __init__(self, data: LMData, latent_dim: int, aligned: bool = False):
        self.cache = LatentCache(data.latents)
        if self.cache.meta["latent_dim"] != latent_dim:
            raise RecipeError(f"{data.latents} holds {self.cache.meta['latent_dim']}-dim "
                              f"latents, the model takes {latent_dim}")
        self.data = data
        longest = float("inf") if data.crop else data.max_frames
        self.items = [i for i, r in enumerate(self.cache.index)
                      if r.get("split") in data.splits and 2 <= r["frames"] <= longest]
        self.durations = None
        if aligned:
            self.durations = read_durations(data.latents)
            if not self.durations:
                raise RecipeError(f"{data.latents} has no durations.jsonl, which an aligned-text "
                                  f"model trains on: run `calm-fast data align {data.latents} "
                                  f"MANIFEST` first")
            self.items = [i for i in self.items if i in self.durations]
        if not self.items:
            raise RecipeError(f"{data.latents}: no utterance in splits {list(data.splits)} has "
                              f"2..{data.max_frames} frames")
        by_spk: dict = {}
        for i in self.items:
            by_spk.setdefault(self.cache.index[i].get("speaker_id"), []).append(i)
        self.by_speaker = by_spk

    def text(self, i: int) -> str:
        return self.cache.index[i].get("text", "")

    def stats(self):
        """Per-channel mean and std over every frame of the chosen utterances."""
        x = np.concatenate([self.cache.latents(i) for i in self.items]).astype(np.float64)
        return torch.from_numpy(x.mean(0)).float(), torch.from_numpy(x.std(0) + 1e-5).float()

    def voice(self, i: int, g: torch.Generator):
        """Raw latents [<= voice_frames, C] of another utterance by the same speaker, or
        None (no voice frames asked, or the speaker has one utterance)."""
        n = self.data.voice_frames
        others = [j for j in self.by_speaker[self.cache.index[i].get("speaker_id")] if j != i]
        if n <= 0 or not others:
            return None
        j = others[int(torch.randint(len(others), (1,), generator=g))]
        return self.window(j, n, g)

    def window(self, i: int, n: int, g: torch.Generator) -> torch.Tensor:
        """A random window of at most n frames of item i (all of it when shorter)."""
        frames = self.cache.index[i]["frames"]
        start = int(torch.randint(0, max(1, frames - n + 1), (1,), generator=g))
        return torch.from_numpy(np.array(self.cache.latents(i)[start:start + n]))

    def tags(self, i: int, drop: bool, p_tag: float, g: torch.Generator):
        """The music tags of item i, each kept with probability 1 - p_tag (None: dropped)."""
        if drop:
            return None
        tags = music_tags.row_tags(self.cache.index[i])
        keep = torch.rand(len(tags), generator=g) >= p_tag
        return [t for t, k in zip(tags, keep.tolist()) if k] or None

    def frames(self, i: int, g: torch.Generator) -> torch.Tensor:
        """Item i's latents, or with ``crop`` a random window of at most max_frames."""
        if not self.data.crop or self.cache.index[i]["frames"] <= self.data.max_frames:
            return torch.from_numpy(np.array(self.cache.latents(i)))
        return self.window(i, self.data.max_frames, g)

    def batch(self, n: int, tokenizer, obj_cfg: LMObjective, g: torch.Generator) -> dict:
        pick = [self.items[k] for k in torch.randint(len(self.items), (n,), generator=g)]
        lats = [self.frames(i, g) for i in pick]
        lengths = torch.tensor([len(x) for x in lats])
        S = int(lengths.max()) + 1  # one frame past the longest end: its EOS frame
        latents = torch.zeros(n, S, lats[0].shape[1])
        for b, x in enumerate(lats):
            latents[b, :len(x)] = x
        drop_text, drop_voice = obj.condition_dropout(n, obj_cfg.p_text, obj_cfg.p_voice, g)
        voices = [None if dv else self.voice(i, g) for i, dv in zip(pick, drop_voice.tolist())]
        if self.durations is not None:  # aligned: the text is always read (durations)
            return {"latents": latents, "lengths": lengths, "voices": voices,
                    "tokens": [torch.tensor(tokenizer.encode(self.text(i))) for i in pick],
                    "durations": [torch.tensor(self.durations[i]) for i in pick],
                    "drop_text": drop_text}
        if self.data.tags:  # music: the tags are the text
            tags = [self.tags(i, dt, obj_cfg.p_tag, g) for i, dt in zip(pick, drop_text.tolist())]
            return {"latents": latents, "lengths": lengths, "tokens": [None] * n,
                    "voices": voices, "tags": tags}
        tokens = [None if dt or not self.text(i) else torch.tensor(tokenizer.encode(self.text(i)))
                  for i, dt in zip(pick, drop_text.tolist())]
        return {"latents": latents, "lengths": lengths, "tokens": tokens, "voices": voices}


def prefix_batch(model: CALM, tokens, voices, tags=None):
    """Left-padded conditioning rows [B, P, d] and their mask [B, P] (True = real row)."""
    tags = tags or [None] * len(tokens)
    rows = [model.prefix(voice=v, tokens=t, tags=a) for t, v, a in zip(tokens, voices, tags)]
    P = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), P, rows[0].shape[1])
    mask = torch.zeros(len(rows), P, dtype=torch.bool, device=out.device)
    for b, r in enumerate(rows):
        out[b, P - r.shape[0]:] = r
        mask[b, P - r.shape[0]:] = True
    return out, mask


def frame_mask(lengths: torch.Tensor, S: int, include_end: bool) -> torch.Tensor:
    idx = torch.arange(S, device=lengths.device)[None]
    return idx <= lengths[:, None] if include_end else idx < lengths[:, None]


class LMTraining(nn.Module):
    """CALM + the adaptive loss weight; ``forward(batch)`` returns (loss, logs)."""

    def __init__(self, calm: CALM, objective: LMObjective):
        super().__init__()
        self.calm, self.objective = calm, objective
        self.kind = objective.check(calm.cfg.head.kind)
        objective.check_align(calm.cfg)
        n_times = 2 if self.kind == "lsd" else 1
        self.weight = (obj.AdaptiveWeight(n_times)
                       if objective.adaptive_weight and self.kind != "flow" else None)

    def aligned_rows(self, batch, S: int):
        """Frame rows [B, S, d] of an aligned model on the aligner's durations (zero where
        the text is dropped) and the duration predictor's loss."""
        m = self.calm
        ids = [m.text_ids(tokens=t) for t in batch["tokens"]]
        B, P = len(ids), max(len(x) for x in ids)
        pad = torch.full((B, P), m.cfg.text_bins, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.bool)
        for b, x in enumerate(ids):
            if len(x) != len(batch["durations"][b]):
                raise RecipeError(f"durations.jsonl holds {len(batch['durations'][b])} "
                                  f"durations for a text of {len(x)} tokens: it was made with "
                                  f"another tokenizer; rerun `calm-fast data align`")
            pad[b, :len(x)], mask[b, :len(x)] = x, True
        h = m.aligned.encode(m.conditioner(pad), mask)
        voices = batch["voices"]
        present = torch.tensor([v is not None for v in voices])
        C = m.cfg.latent_dim
        vm = torch.stack([v.mean(0) if v is not None else torch.zeros(C) for v in voices])
        logd = m.aligned.log_durations(h, vm, present, mask)
        target = torch.zeros(B, P)
        for b, d in enumerate(batch["durations"]):
            target[b, :len(d)] = torch.log1p(d.float())
        dur_loss = ((logd - target) ** 2)[mask].mean()
        rows = torch.stack([m.aligned.frame_rows(h[b, :len(x)], batch["durations"][b], S)
                            for b, x in enumerate(ids)])
        keep = (~batch["drop_text"]).to(rows.dtype)[:, None, None]
        return rows * keep, dur_loss

    def forward(self, batch):
        m, o = self.calm, self.objective
        latents = m.normalize(batch["latents"])
        if m.cfg.aligned_text:
            return self.forward_aligned(batch, latents)
        prefix, mask = prefix_batch(m, batch["tokens"], batch["voices"], batch.get("tags"))
        layer = m.transformer.layers[o.align_layer]
        seen = {}
        hook = (layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("in", args))
                if o.align_weight else None)
        try:
            z, eos_logits = m(latents, prefix, mask)
        finally:
            if hook is not None:
                hook.remove()
        head, eos = self.frame_losses(z, eos_logits, latents, batch)
        loss = head + o.eos_weight * eos
        logs = {"head": head.detach(), "eos": eos.detach()}
        if o.align_weight:
            text_len = torch.tensor([0 if t is None else len(t) for t in batch["tokens"]])
            align = self.align_loss(layer, seen["in"], prefix.shape[1], text_len,
                                    batch["lengths"])
            loss = loss + o.align_weight * align
            logs["align"] = align.detach()
        return loss, logs

    def frame_losses(self, z, eos_logits, latents, batch):
        """(head loss, EOS loss) of the backbone outputs z [B, S, d] on the real frames."""
        m, o = self.calm, self.objective
        valid = frame_mask(batch["lengths"], latents.shape[1], include_end=False)
        c, x = obj.head_batch_multiplier(z[valid], latents[valid], o.head_mult)
        if self.kind == "lsd":
            head = obj.lsd_loss(m.flow_net, c, x, weight=self.weight)
        elif self.kind == "consistency":
            r = min(1.0, batch["step"] / o.tangent_warmup) if o.tangent_warmup else 1.0
            head = obj.consistency_loss(m.flow_net, c, x, weight=self.weight, warmup=r)
        else:
            head = obj.flow_matching_loss(m.flow_net, c, x)
        return head, obj.eos_loss(eos_logits, batch["lengths"])

    def forward_aligned(self, batch, latents):
        m, o = self.calm, self.objective
        rows, dur_loss = self.aligned_rows(batch, latents.shape[1])
        prefix, mask = prefix_batch(m, [None] * len(rows), batch["voices"])
        z, eos_logits = m(latents, prefix, mask, frame_rows=rows)
        head, eos = self.frame_losses(z, eos_logits, latents, batch)
        loss = head + o.eos_weight * eos + o.duration_weight * dur_loss
        return loss, {"head": head.detach(), "eos": eos.detach(), "dur": dur_loss.detach()}

    def align_loss(self, layer, layer_in, P: int, text_len, audio_len):
        """The guided-attention penalty of the chosen heads, from that layer's own input
        (x, cos, sin, mask) as the forward pass saw it."""
        x, cos, sin, mask = layer_in
        o = self.objective
        q, k, _ = layer.project(x, cos, sin)               # [B, T, H, D], [B, T, Hk, D]
        T, H, D = q.shape[1], q.shape[2], q.shape[3]
        heads = torch.arange(o.align_heads)
        kv = heads // (H // k.shape[2])
        qa = q[:, P:, heads].transpose(1, 2)                # [B, h, S, D]
        ka = k[:, :, kv].transpose(1, 2)                    # [B, h, T, D]
        logits = qa @ ka.transpose(-1, -2) / D ** 0.5       # [B, h, S, T]
        allowed = (causal_mask(T, x.device)[None, None] if mask is None else mask)[:, :, P:]
        logits = logits.masked_fill(~allowed, float("-inf"))
        return obj.guided_attention_loss(logits, text_len, audio_len, P, o.align_sigma)


def run(recipe: dict) -> Path:
    data = build(LMData, recipe["data"], "data")
    model_table = dict(recipe["model"])
    init = model_table.pop("init", "")  # warm start: an LM export of this architecture
    cfg = build_preset(CALMConfig, model_table, "model", preset)
    objective = build(LMObjective, recipe["objective"], "objective")
    train_cfg = build(TrainConfig, recipe["train"], "train", out_dir=recipe["out_dir"])
    if data.tags and not cfg.music_tags:
        cfg = replace(cfg, music_tags=music_tags.VOCAB)
    if data.crop and objective.eos_weight:
        raise RecipeError("data.crop trains on windows that have no end: set "
                          "objective.eos_weight = 0")
    utts = Utterances(data, cfg.latent_dim, aligned=cfg.aligned_text)
    if data.voice_frames and not cfg.voice:
        raise RecipeError(f"data.voice_frames > 0 but model {cfg.name!r} has no voice input")
    if data.voice_frames and not cfg.max_voice_frames:
        cfg = replace(cfg, max_voice_frames=data.voice_frames)
    tokenizer = None
    if cfg.text_bins:
        tokenizer = make_tokenizer(data.tokenizer, [utts.text(i) for i in utts.items])
        if tokenizer.vocab_size > cfg.text_bins:
            cfg = replace(cfg, text_bins=tokenizer.vocab_size)
    torch.manual_seed(train_cfg.seed)
    calm = CALM(cfg, tokenizer)
    calm.emb_mean, calm.emb_std = utts.stats()
    if init:
        _warm_start(calm, init)
    module = LMTraining(calm, objective)

    def batch_fn(step, micro, rank, world):
        g = batch_generator(train_cfg.seed, step, micro, rank)
        return {**utts.batch(data.batch, tokenizer, objective, g), "step": step}

    return train_and_export(module, lambda m, b: m(b), batch_fn, train_cfg,
                            Path(recipe["out_dir"]) / "model.safetensors", lambda m: m.calm,
                            {"recipe": "lm", "voice_frames": data.voice_frames}, sample_fn=_sampler(utts, data, tokenizer),
                            find_unused=True)


def _warm_start(calm: CALM, path: str) -> None:
    """Start from the weights of an export (e.g. an earlier run's EMA model, stored in half
    precision): same architecture and tokenizer, every tensor replaced, its latent
    normalisation included. The optimizer starts fresh (a new run, not a resume)."""
    src = load_model(path, expect="calm")
    if src.cfg != calm.cfg:
        diff = [f for f in src.cfg.__dataclass_fields__
                if getattr(src.cfg, f) != getattr(calm.cfg, f)]
        raise RecipeError(f"model.init {path}: its architecture differs from this recipe's "
                          f"in {diff}")
    theirs, ours = src.state_dict(), calm.state_dict()
    if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape for k in ours):
        raise RecipeError(f"model.init {path}: its tensors do not match this model's")
    calm.load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()})


def _sampler(utts: Utterances, data: LMData, tokenizer):
    """Periodic samples: the first utterance's text (and voice), or its music tags, as
    latents and, with a VAE, as audio."""
    def sample(module, step, out):
        m = module.calm
        i = utts.items[0]
        g = torch.Generator().manual_seed(0)
        text = utts.text(i) if m.cfg.text_bins else None
        with torch.no_grad():
            if m.cfg.aligned_text:
                prefix, rows = m.text_inputs(text, voice=utts.voice(i, g))
                req = Request(prefix, max_frames=len(rows), seed=0, frame_cond=rows,
                              eos_threshold=None)
            elif data.tags:  # music: the first item's tags, a window's length, no EOS
                prefix = m.prefix(tags=music_tags.row_tags(utts.cache.index[i]) or None)
                req = Request(prefix, max_frames=data.max_frames, seed=0, eos_threshold=None)
            else:
                prefix = m.prefix(text=text, voice=utts.voice(i, g))
                req = Request(prefix, max_frames=data.max_frames, seed=0,
                              min_frames=round(m.cfg.frame_rate))  # an untrained EOS fires at once
            lat = CALMGenerator(m).generate([req])[0]
        d = Path(out) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"latents_{step:07d}.npy", m.denormalize(lat).numpy())
        if data.vae and len(lat):
            vae = load_model(data.vae, expect="vae")
            with torch.no_grad():
                wav = vae.decode(m.denormalize(lat)[None])[0]
            write_audio(d / f"sample_{step:07d}.flac", wav, vae.cfg.sample_rate)
    return sample
