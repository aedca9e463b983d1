"""Streaming VAE decode, ms per 80 ms frame (one 32-dim latent -> 1920 samples at 24 kHz):
the pocket-tts package's own Mimi (built from its english.yaml, random weights, its streaming
state) vs calm_fast.codec.vae.VAE with the same weights loaded (calm_fast.codec.mimi), on
its reference and its fast path (fast.vae), and calm_fast's own speech codec, the shipped
iSTFT VAE (calm_fast/assets/default/vae.safetensors), reference and fast path (fast.istft).

    python benchmarks/bench_vae.py [--threads 2] [--batches 1,16] [--frames 40]

Times the steady state: frames 10..(10 + frames) of a stream, median per frame over blocks.
With --record, appends to benchmarks/results/vae.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record_args, write_rows  # noqa: E402

from calm_fast.codec.mimi import load_pocket_mimi  # noqa: E402
from calm_fast.fast import vae as fast_vae  # noqa: E402
from calm_fast.runtime.export import load_model  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "calm_fast" / "assets"


def build_peer():
    from importlib.resources import files

    from pocket_tts.models.mimi import build_mimi
    from pocket_tts.modules.stateful_module import StatefulModule
    from pocket_tts.utils.config import load_config

    cfg = load_config(files("pocket_tts") / "config" / "english.yaml")
    torch.manual_seed(0)
    mimi = build_mimi(cfg.mimi).eval()
    for name, mod in mimi.named_modules():
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    return mimi


def per_frame(step, lat, warm=10, frames=40, blocks=5):
    """Median over blocks of the mean time per frame, after ``warm`` frames."""
    for i in range(warm):
        step(lat[:, i:i + 1])
    times = []
    for b in range(blocks):
        t0 = time.perf_counter()
        for i in range(frames // blocks):
            step(lat[:, i:i + 1])
        times.append((time.perf_counter() - t0) / (frames // blocks))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--frames", type=int, default=40)
    record_args(ap)
    args = ap.parse_args()
    from pocket_tts.modules.stateful_module import increment_steps, init_states

    peer = build_peer()
    # after the import: pocket_tts.models sets torch.set_num_threads(1) when it loads
    torch.set_num_threads(args.threads)
    ours = load_pocket_mimi(peer.state_dict())
    istft = load_model(ASSETS / "default" / "vae.safetensors", expect="vae")
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        lat = torch.randn(B, args.frames + 10, 32)
        state = init_states(peer, batch_size=B, sequence_length=16 * (args.frames + 20))

        def peer_step(x):
            y = peer.decode_from_latent(x, state)
            increment_steps(peer, state, increment=16)
            return y

        t_peer = per_frame(peer_step, lat, frames=args.frames)
        timed = [("pocket-tts Mimi", t_peer)]
        for who, vae, step in (("calm_fast Mimi reference", ours, ours.decode_step),
                               ("calm_fast Mimi fast", ours, None),
                               ("calm_fast iSTFT VAE reference", istft, istft.decode_step),
                               ("calm_fast iSTFT VAE fast", istft, None)):
            st = vae.init_state(B)
            fn = (lambda x, st=st, step=step: step(x, st)) if step is not None else (
                lambda x, st=st, vae=vae: fast_vae.decode(vae, x, st))
            timed.append((who, per_frame(fn, lat, frames=args.frames)))
        for who, t in timed:
            rows.append({"impl": who, "batch": B, "ms_per_frame": round(1e3 * t, 2),
                         "rtf_x": round(B * 0.08 / t, 1),
                         "speedup_vs_peer": round(t_peer / t, 2)})
    print_table(rows, list(rows[0]))
    write_rows("vae", rows, args)


if __name__ == "__main__":
    main()
