"""Which model the doors run: ``--checkpoint`` (and ``--vae`` / ``--tokenizer``) -> a Synth.

Accepted, tried in this order:
* nothing: the shipped default, ``calm_fast/assets/default/`` (a bundle, as below), or
  for music (``calm-fast music``) ``calm_fast/assets/music/``;
* ``default`` or ``music``: those shipped bundles by name;
* a folder holding ``lm.safetensors`` + ``vae.safetensors`` (a calm_fast bundle), and
  optionally ``bundle.json`` (``name``, ``default_voice``, ``temperature``);
* a calm_fast LM export (``runtime/export.py``) with ``--vae VAE.safetensors`` (or a
  ``vae.safetensors`` beside it);
* a Pocket TTS model file (one safetensors with ``flow_lm.*`` and ``mimi.*`` keys), with
  ``--tokenizer`` (a SentencePiece ``.model`` or a tokenizers ``.json``; default: a
  ``tokenizer.model``/``tokenizer.json`` beside it);
* a pocket-tts config name (``english``, ``french_24l`` ...), resolved through the local
  Hugging Face cache only: nothing is downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from calm_fast.errors import CheckpointError
from calm_fast.model.weights import read_safetensors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_BUNDLE = ASSETS / "default"
MUSIC_BUNDLE = ASSETS / "music"
HOW = ("pass --checkpoint: a calm_fast LM export with --vae VAE.safetensors, a folder "
       "holding lm.safetensors + vae.safetensors, a Pocket TTS model file, or a pocket-tts "
       "config name already in the local Hugging Face cache")


class ModelNotFound(CheckpointError):
    """No usable model for the given --checkpoint (or no default)."""


@dataclass
class Synth:
    """An LM and its VAE, with what the doors need to know about them."""

    lm: object  # calm_fast.model.calm.CALM
    vae: object  # calm_fast.codec.vae.VAE
    name: str = "model"
    head_steps: int = 1
    temperature: float = 0.7
    default_voice: str | None = None  # the voice used when a request names none
    # the end-of-speech logit threshold the doors use when none is asked for (None: off);
    # Pocket TTS configs carry their own (default_eos_threshold)
    eos_threshold: float | None = -4.0
    # the VAE that encodes voice prompts; None: ``vae``. Newer Pocket TTS Mimis decode with
    # their own shapes, and each side is then a VAE holding that side's weights only
    encoder: object = None

    def __post_init__(self):
        if self.encoder is None:
            self.encoder = self.vae
        if self.lm.cfg.latent_dim != self.vae.cfg.latent_dim:
            raise CheckpointError(f"the LM makes {self.lm.cfg.latent_dim}-dim latents, "
                                  f"the VAE takes {self.vae.cfg.latent_dim}")
        if self.encoder.cfg.latent_dim not in (self.lm.cfg.latent_dim, self.lm.cfg.prompt_dim):
            raise CheckpointError(f"the encoding VAE makes {self.encoder.cfg.latent_dim}-dim "
                                  f"latents; the LM takes {self.lm.cfg.latent_dim}-dim ones "
                                  f"and {self.lm.cfg.prompt_dim}-dim voice features")
        self.lm.eval()
        self.vae.eval()
        self.encoder.eval()

    @property
    def sample_rate(self) -> int:
        return int(self.vae.cfg.sample_rate)

    @property
    def frame_size(self) -> int:
        return int(self.vae.cfg.frame_size)

    @property
    def frame_rate(self) -> float:
        return float(self.lm.cfg.frame_rate)

    @property
    def can_speak(self) -> bool:
        c = self.lm.cfg
        return bool(c.text_bins) and self.lm.conditioner.tokenizer is not None

    @property
    def music_tags(self) -> tuple:
        return tuple(self.lm.cfg.music_tags)

    @property
    def can_clone(self) -> bool:
        return bool(self.lm.cfg.voice)


class _TokenizersJSON:
    """A ``tokenizers`` JSON tokenizer (newer Pocket TTS configs) as a calm_fast tokenizer."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


def _tokenizer(path):
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"no tokenizer file at {path}")
    if path.suffix == ".json":
        return _TokenizersJSON(path)
    from calm_fast.model.conditioning import SentencePieceTokenizer

    return SentencePieceTokenizer(path)


def _pocket_file(path: Path, tokenizer, name: str | None = None, temperature: float = 0.7,
                 config=None) -> Synth:
    """``config``: the package's ``Config`` of the file, when known (a config name): the
    newer models need it (the flow type of a head without time input, the head count of
    attention wider than the model, the shapes of a Mimi's own decoder side)."""
    from calm_fast.codec.mimi import load_pocket_mimi
    from calm_fast.runtime.pocket_tts import ONE_STEP_KINDS, load_pocket_flow_lm

    if tokenizer is None:
        for cand in ("tokenizer.model", "tokenizer.json"):
            if (path.parent / cand).is_file():
                tokenizer = path.parent / cand
                break
    tok = _tokenizer(tokenizer) if tokenizer is not None else None
    if config is None:
        lm = load_pocket_flow_lm(path, tokenizer=tok)
        vae = load_pocket_mimi(path)
        return Synth(lm, vae, name or path.stem, temperature=temperature)
    from calm_fast.model.weights import read_tensors
    from calm_fast.runtime.pocket_codec import load_pocket_codecs

    flow_type = config.flow_lm.flow.type
    if flow_type not in ("lsd", *ONE_STEP_KINDS):  # as accelerate() refuses it
        raise CheckpointError(f"flow LMs of flow type {flow_type!r} are not supported "
                              f"(supported: lsd, {', '.join(ONE_STEP_KINDS)})")
    lm = load_pocket_flow_lm(path, tokenizer=tok, flow_type=flow_type,
                             num_heads=config.flow_lm.transformer.num_heads)
    encoder, vae = load_pocket_codecs(read_tensors(path, bundle_prefix="mimi."), config.mimi)
    # one head step: the package's default for LSD, and what its one-step heads (drifting,
    # pointwise) take whatever sampler_decode_steps says
    return Synth(lm, vae, name or path.stem, temperature=temperature, encoder=encoder,
                 head_steps=1, eos_threshold=float(config.default_eos_threshold))


def _hf_cached(url: str) -> Path | None:
    """The local cache path of ``hf://owner/repo/path@rev``, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    body = url[len("hf://"):]
    body, _, rev = body.partition("@")
    parts = body.split("/")
    repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
    for r in ([rev] if rev else []) + [None]:
        got = try_to_load_from_cache(repo, fname, revision=r)
        if isinstance(got, str) and os.path.isfile(got):
            return Path(got)
    return None


def _pocket_config(name: str) -> Synth:
    try:
        import yaml
        from pocket_tts.utils.config import CONFIGS_DIR
    except ImportError as e:
        raise ModelNotFound(f"{name!r} is not a file, and the pocket-tts package (which "
                            f"holds the config names) is not installed; {HOW}") from e
    cfg_path = Path(CONFIGS_DIR) / f"{name}.yaml"
    if not cfg_path.is_file():
        known = sorted(p.stem for p in Path(CONFIGS_DIR).glob("*.yaml"))
        raise ModelNotFound(f"no checkpoint file {name!r} and no pocket-tts config of that "
                            f"name (known: {', '.join(known[:8])}...); {HOW}")
    cfg = yaml.safe_load(cfg_path.read_text())
    from pocket_tts.utils.config import load_config

    config = load_config(cfg_path)
    weights = None
    for key in ("weights_path", "weights_path_without_voice_cloning"):
        if cfg.get(key):
            weights = _hf_cached(cfg[key])
            if weights is not None:
                break
    tok_url = cfg.get("flow_lm", {}).get("lookup_table", {}).get("tokenizer_path")
    tok = _hf_cached(tok_url) if tok_url and tok_url.startswith("hf://") else None
    if weights is None or tok is None:
        raise ModelNotFound(f"pocket-tts model {name!r} is not in the local Hugging Face "
                            f"cache (nothing is downloaded): fetch it once with the "
                            f"pocket-tts package, or {HOW}")
    # the package's default temperature where a config names none (0.3 in 4.0.1)
    return _pocket_file(weights, tok, name=name, config=config,
                        temperature=float(config.default_temperature))


def bundle_info(folder: Path) -> dict:
    """The optional ``bundle.json`` of a model folder: name, default_voice, temperature."""
    import json

    f = folder / "bundle.json"
    if not f.is_file():
        return {}
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not JSON: {e}") from e
    if not isinstance(info, dict):
        raise CheckpointError(f"{f} must hold a JSON object")
    return info


def load_synth(checkpoint=None, vae=None, tokenizer=None, music: bool = False) -> Synth:
    """The Synth for a --checkpoint / --vae / --tokenizer triple (see the module docstring);
    ``music``: with no checkpoint, the shipped music model instead of the speech one."""
    from calm_fast.runtime.export import load_model

    shipped = {"default": DEFAULT_BUNDLE, "music": MUSIC_BUNDLE}
    if checkpoint is None or checkpoint == "":
        checkpoint = "music" if music else "default"
    if checkpoint in shipped:
        if not (shipped[checkpoint] / "lm.safetensors").is_file():
            raise ModelNotFound(f"no trained {checkpoint} model ships with calm_fast yet: "
                                f"{HOW}")
        checkpoint = shipped[checkpoint]
    p = Path(checkpoint)
    if p.is_dir():
        lm_p, vae_p = p / "lm.safetensors", Path(vae) if vae else p / "vae.safetensors"
        if not lm_p.is_file() or not vae_p.is_file():
            raise ModelNotFound(f"{p} is a folder without lm.safetensors and vae.safetensors")
        info = bundle_info(p)
        return Synth(load_model(lm_p, expect="calm"), load_model(vae_p, expect="vae"),
                     info.get("name", p.name), temperature=float(info.get("temperature", 0.7)),
                     default_voice=info.get("default_voice"))
    if p.is_file():
        meta, tensors = read_safetensors(p, "checkpoint")
        kind = meta.get("calm_fast_kind")
        if kind == "calm":
            vae_p = Path(vae) if vae else p.parent / "vae.safetensors"
            if not vae_p.is_file():
                raise ModelNotFound(f"{p} is a calm_fast LM export: name its VAE with "
                                    f"--vae VAE.safetensors")
            return Synth(load_model(p, expect="calm"), load_model(vae_p, expect="vae"), p.stem)
        if kind == "vae":
            raise ModelNotFound(f"{p} is a VAE export: pass the LM as --checkpoint and this "
                                f"file as --vae")
        if any(k.startswith("flow_lm.") for k in tensors) and any(
                k.startswith("mimi.") for k in tensors):
            del tensors
            return _pocket_file(p, tokenizer)
        raise ModelNotFound(f"{p} is neither a calm_fast export nor a Pocket TTS model file")
    if p.suffix or os.sep in str(checkpoint):
        raise ModelNotFound(f"no checkpoint file at {p}")
    return _pocket_config(str(checkpoint))


def from_pocket_package(tts_model) -> Synth:
    """The weights of a pocket-tts ``TTSModel`` (e.g. built with random weights) as a Synth,
    through ``calm_fast.accelerate`` (same LM, same Mimi)."""
    from calm_fast.runtime.dropin import accelerate

    acc = accelerate(tts_model, max_streams=1, cache_mb=8)
    tok = getattr(tts_model.flow_lm.conditioner, "tokenizer", None)
    if acc.lm.conditioner.tokenizer is None and tok is not None:
        sp = getattr(tok, "sp", None)
        if sp is not None:
            from calm_fast.model.conditioning import SentencePieceTokenizer

            acc.lm.conditioner.set_tokenizer(
                SentencePieceTokenizer(sp.serialized_model_proto()))
    # the engine's head steps: 1 for the one-step heads (drifting, pointwise), which ignore
    # the package's sampler_decode_steps; voice prompts go through the encoding VAE
    return Synth(acc.lm, acc.vae, "pocket-package", head_steps=acc.engine.sched.head_steps,
                 temperature=float(tts_model.temp), encoder=acc.encoder,
                 eos_threshold=float(tts_model.eos_threshold))

