"""The ``calm-fast`` command line.

    calm-fast data speech OUT [--n 200] [--seed 0] [--workers 2]
    calm-fast data music OUT [--n 50] [--seed 0] [--seconds 30]
    calm-fast data latents MANIFEST VAE.safetensors OUT
    calm-fast train vae|lm|distill RECIPE.toml [--set section.key=value ...]
    calm-fast info
"""
from __future__ import annotations

import argparse
import json
import sys


def _data_speech(a):
    from .data.speech import build_speech_dataset

    m = build_speech_dataset(a.out, n_utterances=a.n, seed=a.seed, n_pseudo=a.pseudo,
                             workers=a.workers)
    print(f"wrote {m}")


def _data_music(a):
    from .data.music import build_music_dataset

    m = build_music_dataset(a.out, n_renders=a.n, seed=a.seed, max_seconds=a.seconds,
                            mma_fraction=a.mma, workers=a.workers)
    print(f"wrote {m}")


def _data_latents(a):
    from .data.latents import build_latent_cache
    from calm_fast.runtime.export import load_model

    vae = load_model(a.vae, expect="vae")
    c = vae.cfg
    out = build_latent_cache(a.manifest, lambda x: vae.encode(vae.pad(x)).transpose(1, 2),
                             a.out, sample_rate=c.sample_rate, frame_rate=c.frame_rate,
                             latent_dim=c.latent_dim, encoder_name=str(a.vae))
    print(f"wrote {out}")


def _train(a):
    import torch

    from calm_fast.train.recipes import run_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"wrote {run_recipe(a.recipe, a.kind, a.set)}")


def _info(a):
    import torch

    import calm_fast

    from calm_fast.fast import ops

    native = ops.native_info()
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "not installed"
    print(json.dumps({"calm_fast": calm_fast.__version__, "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "native extension": native,
                      "triton": tri}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calm-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    data = sub.add_parser("data", help="build offline datasets").add_subparsers(
        dest="what", required=True)
    sp = data.add_parser("speech", help="multi-speaker TTS speech from Debian engines")
    sp.add_argument("out")
    sp.add_argument("--n", type=int, default=200)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--pseudo", type=int, default=2, help="pseudo-speakers per base voice")
    sp.add_argument("--workers", type=int, default=2)
    sp.set_defaults(fn=_data_speech)
    mu = data.add_parser("music", help="captioned music from music21 scores and MMA styles")
    mu.add_argument("out")
    mu.add_argument("--n", type=int, default=50)
    mu.add_argument("--seed", type=int, default=0)
    mu.add_argument("--seconds", type=float, default=30.0)
    mu.add_argument("--mma", type=float, default=0.25, help="fraction of MMA renders")
    mu.add_argument("--workers", type=int, default=2)
    mu.set_defaults(fn=_data_music)
    la = data.add_parser("latents", help="encode a manifest once with a trained VAE")
    la.add_argument("manifest")
    la.add_argument("vae", help="a VAE exported by `calm-fast train vae`")
    la.add_argument("out")
    la.set_defaults(fn=_data_latents)
    tr = sub.add_parser("train", help="run a training recipe (TOML file)")
    tr.add_argument("kind", choices=("vae", "lm", "distill"))
    tr.add_argument("recipe")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (TOML syntax), e.g. train.steps=10")
    tr.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    tr.set_defaults(fn=_train)
    sub.add_parser("info", help="versions and available fast paths").set_defaults(fn=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:  # user errors: one clear line, exit 1
        print(f"calm-fast: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
