"""Pocket TTS (Mimi) codec checkpoints -> ``calm_fast.codec.vae.VAE``.

The tensor names are the same; Pocket TTS exports no log-variance (it decodes and encodes
with the mean), so ``logvar`` keeps its initial value (zeros: unit variance) and only matters
if the VAE is trained further. Accepts the package's ``MimiModel.state_dict()`` or a bundled
``TTSModel`` safetensors file (``mimi.*`` keys).
"""
from __future__ import annotations

from calm_fast.model.weights import load_weights, read_tensors
from calm_fast.codec.vae import VAE, VAEConfig, vae_preset

OURS_ONLY = ("logvar.conv.conv.weight",)


def load_pocket_mimi(src, config: VAEConfig | None = None) -> VAE:
    """A VAE holding a Pocket TTS Mimi's weights (``pocket`` preset shapes by default).
    Every missing, unexpected or wrong-shape key is named in the CheckpointError."""
    sd = read_tensors(src, bundle_prefix="mimi.")
    vae = VAE(config or vae_preset("pocket"))
    own = vae.state_dict()
    for k in OURS_ONLY:
        sd.setdefault(k, own[k])
    load_weights(vae, sd, "Pocket TTS Mimi checkpoint")
    return vae.eval()
