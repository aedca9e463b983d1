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


def pocket_voice_state(lm, latents) -> dict:
    """A voice state laid out as the pocket-tts package exports it (its attention cache after
    the voice prompt, "{module}/{cache, offset, pad}"), holding the K/V that calm_fast's own
    prefill of ``latents`` writes: a model given this state must speak exactly as with the
    latents themselves."""
    from calm_fast.runtime.engine import Engine

    eng = Engine(lm, num_blocks=64, max_streams=2)
    shared = eng.share(lm.prefix(voice=latents).detach())
    state = {}
    for li in range(lm.cfg.backbone.num_layers):
        k, v = eng.cache.gather(li, shared.stream)
        name = f"transformer.layers.{li}.self_attn"
        state[f"{name}/cache"] = torch.stack([k, v])[:, None].contiguous()
        state[f"{name}/offset"] = torch.tensor([k.shape[0]])
        state[f"{name}/pad"] = torch.tensor([0])
    return state
