"""Trained models as single self-describing safetensors files.

A training checkpoint (``checkpoint.py``) holds what a resume needs; an export holds what
inference needs: the (EMA) weights, the config as JSON and, for a text model, its tokenizer
("bytes", "phonemes", or the SentencePiece model base64-encoded), all in one file:

    export_model("runs/lm/model.safetensors", calm)     # CALM or VAE
    calm = load_model("runs/lm/model.safetensors")      # the same class, eval mode
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from calm_fast.errors import CheckpointError
from calm_fast.model.config_dict import ConfigError, from_dict
from calm_fast.model.weights import load_weights, read_safetensors
from calm_fast.model.conditioning import ByteTokenizer, SentencePieceTokenizer
from calm_fast.model.phonemes import PhonemeTokenizer
from calm_fast.model.config import CALMConfig
from calm_fast.model.calm import CALM
from calm_fast.codec.vae import VAE, VAEConfig
from calm_fast.codec.istft import ISTFTVAE, ISTFTVAEConfig

# Both codec families answer the same protocol (encode/decode/pad/init_state); "vae" as
# ``expect`` takes either.
_CLASSES = {"calm": (CALM, CALMConfig), "vae": (VAE, VAEConfig),
            "istft_vae": (ISTFTVAE, ISTFTVAEConfig)}
_FAMILY = {"calm": "calm", "vae": "vae", "istft_vae": "vae"}


def _tokenizer_meta(model: CALM) -> str:
    cond = getattr(model, "conditioner", None)
    tok = cond.tokenizer if cond is not None else None
    if tok is None:
        return ""
    if isinstance(tok, ByteTokenizer):
        return "bytes"
    if isinstance(tok, PhonemeTokenizer):
        return "phonemes"
    if isinstance(tok, SentencePieceTokenizer):
        return "spm:" + base64.b64encode(tok.sp.serialized_model_proto()).decode()
    raise ValueError(f"cannot export a tokenizer of type {type(tok).__name__}")


def tokenizer_from_meta(s: str):
    if not s:
        return None
    if s == "bytes":
        return ByteTokenizer()
    if s == "phonemes":
        return PhonemeTokenizer()
    if s.startswith("spm:"):
        return SentencePieceTokenizer(base64.b64decode(s[4:]))
    raise CheckpointError(f"unknown tokenizer record {s[:20]!r}")


def export_model(path, model: torch.nn.Module, extra: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (CALM, VAE or ISTFTVAE) with its config; atomic like the checkpoints.
    ``dtype`` (e.g. torch.float16) stores the floating tensors smaller; ``load_model``
    always returns float32."""
    kind = next((k for k, (cls, _) in _CLASSES.items() if type(model) is cls), None)
    if kind is None:
        raise TypeError(f"export_model takes a CALM, a VAE or an ISTFTVAE, got "
                        f"{type(model).__name__}")
    meta = {"calm_fast_kind": kind, "config": json.dumps(dataclasses.asdict(model.cfg)),
            "extra": json.dumps(extra or {})}
    if kind == "calm":
        meta["tokenizer"] = _tokenizer_meta(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().cpu().to(dtype) if dtype is not None and v.is_floating_point()
                   else v.detach().cpu()).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_model(path, expect: str | None = None, device="cpu"):
    """The model of an export file, in eval mode. ``expect``: "calm" or "vae" (a clear
    error when the file holds the other kind)."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "model file")
    kind = meta.get("calm_fast_kind")
    if kind not in _CLASSES:
        raise CheckpointError(f"{path} is not a calm_fast model export (no calm_fast_kind; a "
                              "training checkpoint is exported by the recipe at its end)")
    if expect is not None and _FAMILY[kind] != expect:
        raise CheckpointError(f"{path} holds a {kind} model, expected a {expect} model")
    cls, cfg_cls = _CLASSES[kind]
    try:
        cfg = from_dict(cfg_cls, json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable config: {e}") from e
    model = cls(cfg, tokenizer_from_meta(meta.get("tokenizer", ""))) if kind == "calm" else cls(cfg)
    load_weights(model, {k: v.float() if v.is_floating_point() else v
                         for k, v in tensors.items()}, str(path))
    return model.to(device).eval()
