"""Training checkpoints in safetensors, written atomically, restored exactly.

One file holds everything a resume needs: model weights (``model/...``), EMA weights
(``ema/...``), optimizer tensors (``optim/<param index>/<name>``), RNG states
(``rng/...`` as uint8) and, in the safetensors metadata, the step, the optimizer's
non-tensor state (param groups, JSON) and any user metadata. Files are written to a
temporary name and renamed, so a kill at any moment leaves either the old or the new
checkpoint, never a torn one.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from calm_fast.errors import CheckpointError
from calm_fast.model.weights import read_safetensors, state_dict_mismatch


def rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    py = json.dumps(random.getstate()).encode()
    return {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "rng/numpy_meta": torch.tensor([np_state[2], np_state[3], np_state[4]],
                                       dtype=torch.float64),
        "rng/python": torch.frombuffer(bytearray(py), dtype=torch.uint8).clone(),
        **({"rng/cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def set_rng_state(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["rng/torch"])
    meta = t["rng/numpy_meta"].tolist()
    np.random.set_state(("MT19937", t["rng/numpy_keys"].numpy().astype(np.uint32),
                         int(meta[0]), int(meta[1]), float(meta[2])))
    st = json.loads(bytes(t["rng/python"].tolist()).decode())
    random.setstate((st[0], tuple(st[1]), st[2]))
    if "rng/cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng/cuda"])


def save_checkpoint(path, *, model: torch.nn.Module, step: int, ema: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, meta: dict | None = None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema/{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    header = {"step": str(step), "meta": json.dumps(meta or {})}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, state in sd["state"].items():
            for name, val in state.items():
                if not torch.is_tensor(val):
                    val = torch.tensor(val)
                tensors[f"optim/{idx}/{name}"] = val.detach().cpu().contiguous()
        header["optim_groups"] = json.dumps(sd["param_groups"])
    tensors |= rng_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    return path


def load_checkpoint(path, *, model: torch.nn.Module, ema: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    strict: bool = True) -> dict:
    """Restore what was saved; returns {"step": int, "meta": dict}. Raises CheckpointError
    naming the missing/unexpected keys when the checkpoint does not fit the model."""
    path = Path(path)
    header, tensors = read_safetensors(path, "checkpoint")
    if "step" not in header:
        raise CheckpointError(f"{path} has no 'step' in its metadata: not a calm_fast checkpoint")

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    # All or nothing: what is loaded first is put back when a later part fails (a corrupt
    # RNG tensor must not leave the weights of the checkpoint in a model it then rejects).
    backup = _snapshot(model, ema, optimizer)
    try:
        try:
            step = int(header["step"])
            meta = json.loads(header.get("meta", "{}"))
        except (ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable step/meta: {e}") from e
        _load_module(model, sub("model/"), "model", path, strict)
        if ema is not None:
            ema_sd = sub("ema/")
            if not ema_sd:
                raise CheckpointError(f"{path} holds no EMA weights")
            _load_module(ema, ema_sd, "ema", path, strict)
        if optimizer is not None:
            if "optim_groups" not in header:
                raise CheckpointError(f"{path} holds no optimizer state")
            state: dict = {}
            for k, v in sub("optim/").items():
                idx, name = k.split("/", 1)
                state.setdefault(int(idx), {})[name] = v
            optimizer.load_state_dict({"state": state,
                                       "param_groups": json.loads(header["optim_groups"])})
        if restore_rng:
            set_rng_state(tensors)
    except Exception as e:  # noqa: BLE001 -- restored, then reported as one error
        _restore(backup, model, ema, optimizer)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot restore the training state "
                              f"({type(e).__name__}: {e}); nothing was loaded") from e
    return {"step": step, "meta": meta}


def _snapshot(model, ema, optimizer):
    import copy

    clone = lambda m: None if m is None else {k: v.detach().clone()  # noqa: E731
                                               for k, v in m.state_dict().items()}
    return (clone(model), clone(ema),
            None if optimizer is None else copy.deepcopy(optimizer.state_dict()), rng_state())


def _restore(backup, model, ema, optimizer):
    m, e, o, rng = backup
    model.load_state_dict(m)
    if ema is not None:
        ema.load_state_dict(e)
    if optimizer is not None:
        optimizer.load_state_dict(o)
    set_rng_state(rng)


def _load_module(module, sd, what, path, strict):
    missing, unexpected, bad_shape = state_dict_mismatch(module.state_dict(), sd)
    if (strict and (missing or unexpected)) or bad_shape:
        raise CheckpointError(
            f"{path}: {what} weights do not match: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}, wrong shape {bad_shape[:20]}")
    module.load_state_dict(sd, strict=strict)
