"""Pocket TTS flow-LM checkpoints -> ``calm_fast.model.calm.CALM``.

Three layouts are accepted, told apart by their key names:
* the package's ``FlowLMModel.state_dict()`` (our own layout: the names are the same);
* a bundled ``TTSModel`` safetensors file (``flow_lm.*`` and ``mimi.*`` keys);
* the raw training export (``condition_provider.conditioners.*``, ``fuser.padding_value``,
  ``in_proj_weight``), renamed as the package's loader does.

The prefix layout needs no mapping: Pocket TTS prefills [bos_before_voice, voice latents @
speaker_proj^T, text embeddings] and then the BOS latent, exactly ``CALM.prefix`` and
``calm_fast.generate``. Shapes come from the tensors; only the head count cannot (Pocket
TTS uses 64-dim heads: 16 at d_model 1024, the default here).
"""
from __future__ import annotations

import torch

from calm_fast.errors import CheckpointError
from calm_fast.model.weights import load_weights, read_tensors
from calm_fast.model.config import CALMConfig, HeadConfig, TransformerConfig
from calm_fast.model.calm import CALM

_SKIP_PREFIXES = ("flow.w_s_t.",)
_SKIP_KEYS = {"condition_provider.conditioners.transcript_in_segment.learnt_padding",
              "condition_provider.conditioners.speaker_wavs.learnt_padding", "num_ema_updates"}
_RENAMES = {"condition_provider.conditioners.transcript_in_segment.embed.weight":
            "conditioner.embed.weight",
            "condition_provider.conditioners.speaker_wavs.output_proj.weight":
            "speaker_proj_weight",
            "fuser.padding_value": "bos_before_voice"}


def read_state_dict(src) -> dict[str, torch.Tensor]:
    """A flow-LM state dict in the package layout, from a dict or a safetensors file."""
    src = read_tensors(src, bundle_prefix="flow_lm.")
    out = {}
    for k, v in src.items():
        if k in _SKIP_KEYS or k.startswith(_SKIP_PREFIXES):
            continue
        k = _RENAMES.get(k, k).replace(".self_attn.in_proj_weight", ".self_attn.in_proj.weight")
        out[k] = v
    return out


def config_from_state_dict(sd: dict, num_heads: int | None = None,
                           name: str = "pocket") -> CALMConfig:
    """The CALMConfig whose model has exactly the tensors of ``sd``."""
    try:
        d = sd["input_linear.weight"].shape[0]
        C = sd["input_linear.weight"].shape[1]
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
        ff = sd["transformer.layers.0.linear1.weight"].shape[0]
        qkv = sd["transformer.layers.0.self_attn.in_proj.weight"].shape[0]
        width = sd["flow_net.input_proj.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a Pocket TTS flow-LM state dict (missing {e})") from e
    if any(k.startswith("z_proj.") for k in sd):
        raise CheckpointError("flow LMs with a z_proj (distilled z-space heads) are not supported")
    depth = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("flow_net.res_blocks.")),
                    default=-1)
    n_time = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("flow_net.time_embed.")),
                     default=-1)
    if n_time not in (1, 2):
        raise CheckpointError(f"head with {n_time} time inputs: only LSD (2) and "
                              "consistency/flow (1) heads are supported")
    heads = num_heads or max(1, d // 64)
    head_dim = d // heads
    kv = (qkv // head_dim - heads) // 2
    ls = "transformer.layers.0.layer_scale_1.scale" in sd
    text = sd["conditioner.embed.weight"].shape[0] - 1 if "conditioner.embed.weight" in sd else None
    return CALMConfig(
        name, TransformerConfig(d, layers, heads, kv if kv != heads else None, ff / d,
                                layer_scale=1.0 if ls else None),
        HeadConfig(width, depth, "lsd" if n_time == 2 else "consistency"),
        latent_dim=C, text_bins=text, voice="speaker_proj_weight" in sd)


def load_pocket_flow_lm(src, config: CALMConfig | None = None, num_heads: int | None = None,
                        tokenizer=None) -> CALM:
    """A CALM model holding a Pocket TTS flow LM's weights (dict or safetensors path).
    Every missing, unexpected or wrong-shape key is named in the CheckpointError."""
    sd = read_state_dict(src)
    cfg = config or config_from_state_dict(sd, num_heads)
    model = CALM(cfg, tokenizer)
    sd = dict(sd)
    if "bos_before_voice" not in sd and "bos_before_voice" in model.state_dict():
        raise CheckpointError("checkpoint has no bos_before_voice: this model was trained "
                              "without insert_bos_before_voice, which calm_fast requires")
    load_weights(model, sd, "Pocket TTS flow-LM checkpoint")
    return model.eval()
