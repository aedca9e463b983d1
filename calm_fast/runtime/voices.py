"""Voices: a prompt's VAE latents, kept in files and looked up by name.

    lat = encode_prompt(vae, "me.wav")            # raw VAE latents [T, C] (first 10 s)
    save_voice("me.safetensors", lat, vae)        # what `calm-fast export-voice` writes
    lat = resolve_voice("me.safetensors", vae)    # a file, a prompt audio file, or a name

A voice file is a safetensors file with one tensor ``latents`` [T, C] (raw, un-normalised
VAE latents, as ``CALM.prefix(voice=)`` takes them) and metadata naming the VAE it came
from. The pocket-tts package's exported voices (``pocket-tts export-voice``) are a
snapshot of its flow LM's KV cache instead; they load when the snapshot holds the
prompt latents, and otherwise raise a CheckpointError saying to pass the audio.

Built-in voices are the voice files in ``calm_fast/assets/voices/`` (prompts of the shipped
default model's training speakers, made by the shipped VAE); ``builtin_voices()`` lists them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from calm_fast.codec.audio import AUDIO_SUFFIXES, load_audio
from calm_fast.errors import ArgumentError, CheckpointError, MissingFileError
from calm_fast.model.weights import read_safetensors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DIR = ASSETS / "voices"
PROMPT_SECONDS = 10.0


def builtin_voices() -> dict[str, Path]:
    """Name -> voice file of the voices shipped in calm_fast/assets/voices/."""
    if not BUILTIN_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.safetensors"))}


@torch.no_grad()
def encode_prompt(vae, audio, max_seconds: float = PROMPT_SECONDS) -> torch.Tensor:
    """Raw VAE latents [T, C] of a prompt (an audio file path, or [1, samples] at the VAE's
    rate), cut to ``max_seconds``."""
    sr = vae.cfg.sample_rate
    wav = load_audio(audio, sr) if isinstance(audio, (str, Path)) else audio
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2 or wav.shape[0] != 1:
        raise ValueError("a voice prompt must be an audio file or a [1, samples] tensor")
    wav = wav[:, :round(max_seconds * sr)].float()
    if wav.shape[1] < vae.cfg.frame_size:
        raise ValueError(f"the voice prompt is shorter than one frame ({vae.cfg.frame_size} "
                         f"samples at {sr} Hz)")
    return vae.encode(vae.pad(wav[None]))[0].detach()


def is_safetensors(data: bytes) -> bool:
    """Whether bytes look like a safetensors file (a little-endian u64 header length, then
    that many bytes of JSON), so that an upload is told apart from audio without its name."""
    if len(data) < 10 or data[8:9] != b"{":
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8


def save_voice(path, latents: torch.Tensor, vae=None, name: str | None = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a voice file ends in .safetensors, got {path.name!r}")
    meta = {"calm_fast_voice": "1", "latent_dim": str(latents.shape[-1]),
            "name": name or path.stem}
    if vae is not None:
        meta.update(vae=vae.cfg.name, sample_rate=str(vae.cfg.sample_rate))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(path), metadata=meta)
    return path


@dataclass(frozen=True, eq=False)
class KVVoice:
    """A voice given as attention K/V instead of latents: the pocket-tts package's exported
    voice (its flow LM's attention cache after the voice prompt). k, v [layers, P,
    kv_heads, head_dim], keys rotated for positions 0..P-1; the P rows are the whole
    [bos, voice] part of the prefix. It fits only the model it was exported from, and goes
    into the engine as a K/V template (``Engine.share_kv``). ``key`` names it in caches."""

    k: torch.Tensor
    v: torch.Tensor
    key: str
    source: str = ""

    @property
    def rows(self) -> int:
        return self.k.shape[1]


def pocket_kv_voice(tensors: dict, backbone, source: str = "") -> KVVoice:
    """The K/V of a pocket-tts voice state ({module}/{cache, offset|current_end, pad}) for
    a backbone config (num_layers, kv_heads, head_dim); CheckpointError if it does not fit."""
    ks, vs = [], []
    for li in range(backbone.num_layers):
        name = f"transformer.layers.{li}.self_attn"
        cache = tensors.get(f"{name}/cache")
        if cache is None:
            raise CheckpointError(f"{source}: no attention cache for layer {li} (a voice state "
                                  f"of another model family)")
        if f"{name}/current_end" in tensors:  # older exports: the length is a shape
            end = tensors[f"{name}/current_end"].shape[0]
        else:
            end = int(tensors.get(f"{name}/offset", torch.zeros(1)).reshape(-1)[0])
        pad = int(tensors.get(f"{name}/pad", torch.zeros(1)).reshape(-1)[0])
        if cache.dim() != 5 or tuple(cache.shape[:2]) != (2, 1) or tuple(cache.shape[3:]) != (
                backbone.kv_heads, backbone.head_dim) or pad != 0 or not 0 < end <= cache.shape[2]:
            raise CheckpointError(f"{source}: layer {li} cache {tuple(cache.shape)} (offset {end}, "
                                  f"pad {pad}) does not fit this model ({backbone.kv_heads} kv "
                                  f"heads of {backbone.head_dim}): a voice exported from another "
                                  f"model")
        ks.append(cache[0, 0, :end].float())
        vs.append(cache[1, 0, :end].float())
    layers = {k.split("/")[0] for k in tensors if "/" in k}
    if len(layers) != backbone.num_layers or len({k.shape[0] for k in ks}) != 1:
        raise CheckpointError(f"{source}: {len(layers)} cached layers of unequal lengths or a "
                              f"count other than this model's {backbone.num_layers}")
    k, v = torch.stack(ks), torch.stack(vs)
    if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
        raise CheckpointError(f"{source}: the voice state holds NaN or Inf")
    key = hashlib.sha1(k.numpy().tobytes() + v.numpy().tobytes()).hexdigest()
    return KVVoice(k, v, key, source)


def text_inputs(lm, *, text=None, voice=None, tags=None):
    """(prefix rows, frame rows or None) of a request. A prefix-text model: ``lm.prefix``
    rows [bos, voice, tags, text] and None. An aligned-text one (``cfg.aligned_text``): the
    prefix holds the voice, the frame rows the text (``CALM.text_inputs``: their count is the
    request's frame count). A KVVoice's [bos, voice] part is its zero placeholder rows (its
    engine template, ``Engine.share_kv``, holds their K/V)."""
    if lm.cfg.aligned_text and text is not None:
        if tags is not None:
            raise ValueError("an aligned-text model takes no music tags")
        if isinstance(voice, KVVoice):
            _, rows = lm.text_inputs(text)  # durations without the prompt (not in a K/V state)
            return rows.new_zeros(voice.rows, rows.shape[1]), rows
        return lm.text_inputs(text, voice=voice)
    if isinstance(voice, KVVoice):
        rows = lm.prefix(text=text, tags=tags)[int(lm.cfg.bos_before_voice):]  # less its BOS
        return torch.cat([rows.new_zeros(voice.rows, rows.shape[1]), rows]), None
    return lm.prefix(text=text, voice=voice, tags=tags), None


def load_voice(path, latent_dim: int | None = None, lm=None) -> "torch.Tensor | KVVoice":
    """The latents [T, C] of a voice file (ours, or the pocket-tts package's export when it
    keeps them); with ``lm`` (the model that will speak), a package voice state without
    latents is returned as a KVVoice when it fits that model."""
    meta, tensors = read_safetensors(Path(path), "voice file")
    if "latents" in tensors and meta.get("calm_fast_voice"):
        lat = tensors["latents"].float()
    elif any("/" in k for k in tensors):  # the package's "{module}/{key}" state snapshot
        lat = _pocket_state_latents(tensors)
        if lat is None and lm is not None:
            return pocket_kv_voice(tensors, lm.cfg.backbone, str(path))
        if lat is None:
            raise CheckpointError(
                f"{path} is a pocket-tts voice state (a KV-cache snapshot of its flow LM), "
                "which only the Pocket TTS model it was exported from can use: load that "
                "model (--checkpoint), or pass the voice's audio file instead")
    else:
        raise CheckpointError(f"{path} is not a voice file (no 'latents' tensor)")
    if lat.dim() != 2 or lat.shape[0] == 0:
        raise CheckpointError(f"{path}: voice latents must be [frames, dim], got "
                              f"{tuple(lat.shape)}")
    if latent_dim is not None and lat.shape[1] != latent_dim:
        raise CheckpointError(f"{path} holds {lat.shape[1]}-dim latents; this model takes "
                              f"{latent_dim}-dim ones (a voice from another VAE)")
    return lat


def _pocket_state_latents(tensors: dict) -> torch.Tensor | None:
    for k, v in tensors.items():  # some exports keep the prompt latents beside the cache
        if k.endswith("/audio_latents") or k.endswith("/prompt_latents"):
            return v.reshape(-1, v.shape[-1]).float()
    return None


def resolve_voice(voice, vae, latent_dim: int | None = None, lm=None):
    """Latents of ``voice`` (None, a built-in name, a voice file, or a prompt audio file),
    or a KVVoice for a pocket-tts voice state that fits ``lm``."""
    if voice is None or voice == "":
        return None
    if isinstance(voice, (torch.Tensor, KVVoice)):
        return voice
    s = str(voice)
    builtin = builtin_voices()
    if s in builtin:
        return load_voice(builtin[s], latent_dim)
    p = Path(s)
    if p.suffix.lower() == ".safetensors":
        if not p.is_file():
            raise MissingFileError(f"no voice file at {p}")
        return load_voice(p, latent_dim, lm)
    if p.suffix.lower() in AUDIO_SUFFIXES or p.is_file():
        if not p.is_file():
            raise MissingFileError(f"no audio file at {p}")
        return encode_prompt(vae, p)
    names = ", ".join(sorted(builtin)) or "none installed"
    raise ArgumentError(f"unknown voice {s!r}: give a voice file (.safetensors), a prompt audio "
                     f"file (.wav/.flac/.mp3) or a built-in name ({names})")


def voice_info(path) -> dict:
    meta, tensors = read_safetensors(Path(path), "voice file")
    lat = tensors.get("latents")
    return {"name": meta.get("name", Path(path).stem), "path": str(path),
            "frames": 0 if lat is None else int(lat.shape[0]), "vae": meta.get("vae", "?"),
            "extra": json.loads(meta.get("extra", "{}"))}
