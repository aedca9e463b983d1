"""Reading weights: safetensors files and state dicts, checked before anything is loaded.

Every reader raises ``CheckpointError`` naming the file and what is wrong (missing,
unreadable, empty, keys or shapes that do not fit, NaN/Inf), so a model is never left half
loaded. Used by the codec and model loaders (Pocket TTS / Mimi checkpoints), the exports
and the training checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from calm_fast.errors import CheckpointError


def read_safetensors(path, what: str = "file") -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; CheckpointError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        return header, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors {what}: {e}") from e


def state_dict_mismatch(own: dict, sd: dict):
    """(missing, unexpected, wrong-shape) keys of ``sd`` against a module's ``own``, sorted."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    return missing, unexpected, bad_shape


def load_weights(model: torch.nn.Module, sd: dict, what: str = "checkpoint") -> None:
    """Strict load of a bare state dict (a peer's checkpoint) that names every missing,
    unexpected and wrong-shape key, and refuses NaN/Inf tensors."""
    own = model.state_dict()
    missing, unexpected, bad_shape = state_dict_mismatch(own, sd)
    if missing or unexpected or bad_shape:
        shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape]
        parts = [f"missing keys {missing}" if missing else "",
                 f"unexpected keys {unexpected}" if unexpected else "",
                 f"wrong shapes [{'; '.join(shapes)}]" if shapes else ""]
        raise CheckpointError(f"{what} does not match the model: "
                              + "; ".join(p for p in parts if p))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what} holds NaN/Inf in {bad}")
    model.load_state_dict(sd, strict=True)


def read_tensors(src, bundle_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A non-empty dict of tensors, from a dict or a safetensors file (CheckpointError if
    missing, unreadable or empty). When keys carry ``bundle_prefix`` (a file bundling several
    models, e.g. ``mimi.``), only those are kept, with the prefix removed."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            src = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if not isinstance(src, dict) or not src:
        raise CheckpointError("empty checkpoint")
    if bundle_prefix and any(k.startswith(bundle_prefix) for k in src):
        n = len(bundle_prefix)
        return {k[n:]: v for k, v in src.items() if k.startswith(bundle_prefix)}
    return dict(src)
