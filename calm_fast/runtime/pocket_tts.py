"""Pocket TTS flow-LM checkpoints -> ``calm_fast.model.calm.CALM``.

Three layouts are accepted, told apart by their key names:
* the package's ``FlowLMModel.state_dict()`` (our own layout: the names are the same);
* a bundled ``TTSModel`` safetensors file (``flow_lm.*`` and ``mimi.*`` keys);
* the raw training export (``condition_provider.conditioners.*``, ``fuser.padding_value``,
  ``in_proj_weight``), renamed as the package's loader does.

The prefix layout needs no mapping: Pocket TTS prefills [bos_before_voice, voice latents @
speaker_proj^T, text embeddings] and then the BOS latent, exactly ``CALM.prefix`` and
``calm_fast.generate``. Shapes come from the tensors; only the head count cannot (Pocket
TTS uses 64-dim heads: 16 at d_model 1024, the default here; the drop-in passes the
package's own count).

Heads without a time input (the package's ``drifting`` and ``pointwise`` flow types) run as
one-step heads of calm_fast's own kinds, exactly (``one_step_head``): the state dict cannot
tell the two apart, so their loader is given the package's ``flow_type``. A ``z_proj`` (a
bias-free projection of the backbone output to a narrower z-space that the head and the EOS
layer read) is folded into those two layers' weights (``fold_z_proj``), a low-rank text table
into a full one (``fold_text_rank``), and attention at a width other than d_model (the
package's ``attn_dim``) keeps its own head width (``WideAttentionConfig``).
"""
from __future__ import annotations

import torch

from calm_fast.errors import CheckpointError
from calm_fast.model.weights import load_weights, read_tensors
from calm_fast.model.config import CALMConfig, HeadConfig, TransformerConfig
from calm_fast.model.calm import CALM
from calm_fast.model.head import TimestepEmbedder
from calm_fast.model.wide_attention import WideAttentionConfig

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


# The package's one-step flow types without a time input, and the calm_fast head kind each
# runs as (see one_step_head).
ONE_STEP_KINDS = {"drifting": "consistency", "pointwise": "lsd"}


def config_from_state_dict(sd: dict, num_heads: int | None = None,
                           name: str = "pocket", flow_type: str | None = None) -> CALMConfig:
    """The CALMConfig whose model has exactly the tensors of ``sd`` (after ``one_step_head``
    for a head without time inputs, whose ``flow_type`` must then be given)."""
    try:
        d = sd["input_linear.weight"].shape[0]
        C = sd["input_linear.weight"].shape[1]
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
        ff = sd["transformer.layers.0.linear1.weight"].shape[0]
        qkv = sd["transformer.layers.0.self_attn.in_proj.weight"].shape[0]
        width = sd["flow_net.input_proj.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a Pocket TTS flow-LM state dict (missing {e})") from e
    attn = sd["transformer.layers.0.self_attn.out_proj.weight"].shape[1] \
        if "transformer.layers.0.self_attn.out_proj.weight" in sd else d
    depth = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("flow_net.res_blocks.")),
                    default=-1)
    n_time = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("flow_net.time_embed.")),
                     default=-1)
    if n_time == 0:
        if flow_type not in ONE_STEP_KINDS:
            raise CheckpointError(f"a head with no time input needs its flow type (one of "
                                  f"{sorted(ONE_STEP_KINDS)}; the checkpoint cannot say "
                                  f"which), got {flow_type!r}")
        kind = ONE_STEP_KINDS[flow_type]
    elif n_time in (1, 2):
        kind = "lsd" if n_time == 2 else "consistency"
    else:
        raise CheckpointError(f"head with {n_time} time inputs: only LSD (2), "
                              "consistency/flow (1) and one-step (0) heads are supported")
    heads = num_heads or max(1, attn // 64)
    head_dim = attn // heads
    kv = (qkv // head_dim - heads) // 2
    ls = "transformer.layers.0.layer_scale_1.scale" in sd
    text = sd["conditioner.embed.weight"].shape[0] - 1 if "conditioner.embed.weight" in sd else None
    shape = dict(num_kv_heads=kv if kv != heads else None, ffn_mult=ff / d,
                 layer_scale=1.0 if ls else None)
    # attention at another width than the residual stream (the package's attn_dim)
    backbone = (TransformerConfig(d, layers, heads, **shape) if attn == d else
                WideAttentionConfig(d, layers, heads, **shape, attn_dim=attn))
    if backbone.dim_feedforward != ff:
        raise CheckpointError(f"feed-forward width {ff} is not d_model {d} times a float")
    return CALMConfig(
        name, backbone,
        HeadConfig(width, depth, kind),
        latent_dim=C, text_bins=text, voice="speaker_proj_weight" in sd,
        bos_before_voice="bos_before_voice" in sd,
        voice_dim=(sd["speaker_proj_weight"].shape[1] if "speaker_proj_weight" in sd
                   and sd["speaker_proj_weight"].shape[1] != C else 0))


def fold_text_rank(sd: dict) -> dict:
    """``sd`` with a low-rank text table (``lookup_table.rank``: ``conditioner.embed`` of
    rank-wide rows, then the bias-free ``conditioner.proj`` to d_model) as one full table:
    each token's row is its embedding times the projection, computed once (equal to the
    package's rows to float rounding)."""
    if "conditioner.proj.weight" not in sd:
        return sd
    E, P = sd["conditioner.embed.weight"], sd["conditioner.proj.weight"]
    if E.shape[1] != P.shape[1]:
        raise CheckpointError(f"conditioner.embed.weight {tuple(E.shape)} does not fit "
                              f"conditioner.proj.weight {tuple(P.shape)}")
    out = {k: v for k, v in sd.items() if k != "conditioner.proj.weight"}
    # in float64, so each row is the exact product rounded once
    out["conditioner.embed.weight"] = (E.double() @ P.double().t()).to(E.dtype)
    return out


def fold_z_proj(sd: dict) -> dict:
    """``sd`` without its ``z_proj``: the head's ``cond_embed`` and ``out_eos`` read
    z = P h (P: ``z_proj.weight`` [z_dim, d], h the normed backbone output) and nothing else
    does, so their weights become W P, which read h itself: the same map, whose outputs
    agree with the package's to float rounding, not bit for bit (the products are summed in
    another order)."""
    if "z_proj.weight" not in sd:
        return sd
    P = sd["z_proj.weight"].double()
    out = {k: v for k, v in sd.items() if k != "z_proj.weight"}
    for k in ("flow_net.cond_embed.weight", "out_eos.weight"):
        if k not in sd or sd[k].shape[-1] != P.shape[0]:
            raise CheckpointError(f"z_proj.weight is {tuple(P.shape)} but {k} is "
                                  f"{None if k not in sd else tuple(sd[k].shape)}")
        # in float64, so the folded weights are the exact product rounded once
        out[k] = (sd[k].double() @ P).to(sd[k].dtype)
    return out


def one_step_head(sd: dict, flow_type: str) -> dict:
    """``sd`` with its time-free head (``flow_net.*``, no ``time_embed``) rewritten as an
    exactly equal head of a calm_fast kind, run with one step:

    * pointwise, x = noise + F(c, noise): the one-step LSD map x + (1 - 0) F(c, x, 0, 1);
    * drifting, x = F(c, noise): the one-step consistency map -F'(c, x, pi/2) with F' = -F
      (the final linear layer negated: negation is exact in floating point).

    The time inputs the calm_fast kinds take are added with all-zero weights: each time
    embedding ends in a norm whose gain (``alpha``) is 0, so it adds exactly 0 to the
    condition, which is what the time-free head sees."""
    if flow_type not in ONE_STEP_KINDS:
        raise CheckpointError(f"unknown one-step flow type {flow_type!r}; known: "
                              f"{sorted(ONE_STEP_KINDS)}")
    out = dict(sd)
    width = sd["flow_net.input_proj.weight"].shape[0]
    n_time = 2 if ONE_STEP_KINDS[flow_type] == "lsd" else 1
    emb = TimestepEmbedder(width)
    for i in range(n_time):
        for k, v in emb.state_dict().items():
            # the frequencies are the module's own buffer; every weight is zero
            out[f"flow_net.time_embed.{i}.{k}"] = v.clone() if k == "freqs" else torch.zeros_like(v)
    if flow_type == "drifting":
        for k in ("flow_net.final_layer.linear.weight", "flow_net.final_layer.linear.bias"):
            out[k] = -sd[k]
    return out


def load_pocket_flow_lm(src, config: CALMConfig | None = None, num_heads: int | None = None,
                        tokenizer=None, flow_type: str | None = None) -> CALM:
    """A CALM model holding a Pocket TTS flow LM's weights (dict or safetensors path).
    Every missing, unexpected or wrong-shape key is named in the CheckpointError.
    ``flow_type``: the package's (``FlowLMModel.flow_type``); needed only for a head with
    no time input (drifting / pointwise), which the weights alone cannot tell apart."""
    sd = fold_text_rank(fold_z_proj(read_state_dict(src)))
    cfg = config or config_from_state_dict(sd, num_heads, flow_type=flow_type)
    if "flow_net.input_proj.weight" in sd \
            and not any(k.startswith("flow_net.time_embed.") for k in sd):
        sd = one_step_head(sd, flow_type)
    model = CALM(cfg, tokenizer)
    sd = dict(sd)
    load_weights(model, sd, "Pocket TTS flow-LM checkpoint")
    return model.eval()
