"""Write a model bundle folder (what `--checkpoint DIR` and the shipped default load):
lm.safetensors + vae.safetensors stored in half precision, and bundle.json.

    python scripts/make_bundle.py runs/speech_tts/model.safetensors \
        calm_fast/assets/default/vae.safetensors calm_fast/assets/default \
        --name calm-fast-speech --default-voice slt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from calm_fast.runtime.export import export_model, load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lm")
    ap.add_argument("vae")
    ap.add_argument("out")
    ap.add_argument("--name", default="calm-fast-speech")
    ap.add_argument("--default-voice", default=None)
    ap.add_argument("--temperature", type=float, default=0.7)
    a = ap.parse_args(argv)
    from safetensors import safe_open

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm, vae = load_model(a.lm, expect="calm"), load_model(a.vae, expect="vae")
    if lm.cfg.latent_dim != vae.cfg.latent_dim:
        raise SystemExit(f"LM latents {lm.cfg.latent_dim} != VAE latents {vae.cfg.latent_dim}")
    extra = {}
    for src, dst, model in ((a.lm, "lm.safetensors", lm), (a.vae, "vae.safetensors", vae)):
        with safe_open(src, "pt") as f:
            extra = json.loads(f.metadata().get("extra", "{}"))
        if Path(src).resolve() != (out / dst).resolve():
            export_model(out / dst, model, extra=extra, dtype=torch.float16)
    info = {"name": a.name, "temperature": a.temperature}
    if a.default_voice:
        info["default_voice"] = a.default_voice
    (out / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
