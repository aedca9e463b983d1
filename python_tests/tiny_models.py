"""Tiny random models exported to files, as a trained model would be: what the CLI, README,
server and batch tests load (one definition, so they all exercise the same files)."""
from pathlib import Path

import torch


def export_tiny(d) -> dict:
    """lm / vae / music exports of tiny random models in ``d`` (paths by name)."""
    from calm_fast.codec.vae import VAE, vae_preset
    from calm_fast.model.calm import CALM
    from calm_fast.model.conditioning import ByteTokenizer
    from calm_fast.model.config import preset
    from calm_fast.runtime.export import export_model

    d = Path(d)
    torch.manual_seed(0)
    out = {"lm": d / "lm.safetensors", "vae": d / "vae.safetensors",
           "music": d / "music.safetensors"}
    if not out["lm"].exists():  # perturbed: the zero-initialised output layers filled in
        from golden import perturbed

        export_model(out["lm"], perturbed(CALM(preset("tiny").with_(text_bins=256),
                                               ByteTokenizer())))
        export_model(out["vae"], VAE(vae_preset("tiny")))
        export_model(out["music"], perturbed(CALM(preset("tiny_music"))))
    return out
