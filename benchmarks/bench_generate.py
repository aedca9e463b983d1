"""10 s of latents (125 frames at 12.5 Hz) from the `pocket` preset with random weights,
through calm_fast.runtime.generate.CALMGenerator: prefill of a voice + text prefix, then the
batched frame loop (paged backbone step + 1-step LSD head + EOS), on CPU.

    python benchmarks/bench_generate.py [--threads 2] [--frames 125] [--batches 1,8]

Reports ms per frame (per step of the whole batch) and the real-time factor
(audio seconds made per wall second, all streams together). With --record, appends to
benchmarks/results/generate.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, record_args, write_rows  # noqa: E402

from calm_fast.model.config import preset  # noqa: E402
from calm_fast.runtime.generate import CALMGenerator, Request  # noqa: E402
from calm_fast.model.calm import CALM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=125)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    record_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset("pocket")
    model = CALM(cfg).eval()
    with torch.no_grad():
        for p in model.flow_net.parameters():  # the DiT init zeroes the head's modulations
            p.add_(0.02 * torch.randn_like(p))
        prefix = model.prefix(voice=torch.randn(60, 32), tokens=torch.randint(0, 4000, (40,)))
    rows = []
    for mode in ("fp32", "int8", "fp32+cfg1.5"):
        gen = CALMGenerator(model, int8=mode == "int8")
        for B in [int(b) for b in args.batches.split(",")]:
            reqs = [Request(prefix, args.frames, seed=i, eos_threshold=None,
                            cfg_scale=1.5 if "cfg" in mode else 1.0) for i in range(B)]
            best = float("inf")
            for _ in range(args.runs):
                it = gen.stream(reqs)
                t0 = time.perf_counter()
                next(it)  # prefill + first frame
                t1 = time.perf_counter()
                n = 1 + sum(1 for _ in it)
                t2 = time.perf_counter()
                assert n == args.frames
                best = min(best, (t2 - t1) / (n - 1))
                first = t1 - t0
            audio_s = B * args.frames / cfg.frame_rate
            rows.append({"mode": mode, "batch": B, "frames": args.frames,
                         "prefill_plus_first_ms": round(1e3 * first, 2),
                         "ms_per_frame": round(1e3 * best, 2),
                         "rtf_x": round(B / (best * cfg.frame_rate), 2),
                         "audio_s": audio_s})
    print_table(rows, list(rows[0]))
    write_rows("generate", rows, args)


if __name__ == "__main__":
    main()
