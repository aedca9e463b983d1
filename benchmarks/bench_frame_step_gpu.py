"""The generation frame step on a GPU: eager torch vs one CUDA-graph replay per frame
(frame_step.FrameStep), `pocket` shapes (random weights), fp32 and bf16, batch 1..256.

    python benchmarks/bench_frame_step_gpu.py [--batches 1,8,64,256] [--dtypes fp32,bf16]

Two timings per row: `replay_ms` is the frame compute alone (FrameStep on fixed inputs,
synchronised), `frame_ms` is a whole CALMGenerator step (host bookkeeping, per-stream noise
draws, the EOS read-back included) measured over a steady stretch of generation. The bound
is the weights' bytes (+ K/V read) over the measured HBM read bandwidth. With --record, appends to
benchmarks/results/frame_step_gpu.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, record_args, write_rows  # noqa: E402
from roofline import read_bandwidth  # noqa: E402

from calm_fast.model.config import preset  # noqa: E402
from calm_fast.runtime.generate import CALMGenerator, Request  # noqa: E402
from calm_fast.model.calm import CALM  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def steady_frame_ms(gen, reqs, skip=4, frames=24) -> float:
    """Mean time between frames of a generation, after ``skip`` warm-up frames."""
    it = gen.stream(reqs)
    for _ in range(skip):
        next(it)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(frames):
        next(it)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / frames
    it.close()
    return dt * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--ctx", type=int, default=64, help="prefix rows before generation")
    record_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = CALM(preset("pocket")).eval()
    bw = read_bandwidth(1 << 30, device="cuda")
    print(f"measured HBM read: {bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}")
    rows = []
    batches = list(map(int, args.batches.split(",")))
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        for B in batches:
            reqs = [Request(torch.randn(args.ctx, 1024), 40, seed=i, eos_threshold=None)
                    for i in range(B)]
            res = {}
            for graphs in (False, True):
                blocks = B * ((args.ctx + 60) // 16 + 2) + 4
                gen = CALMGenerator(model, device="cuda", dtype=dt, num_blocks=blocks,
                                    graphs=graphs, max_streams=max(batches))
                with torch.inference_mode():
                    res[graphs] = steady_frame_ms(gen, reqs)
                    if graphs:  # the replay alone, on the last bucket's fixed inputs
                        graph = gen.frame._captured[max(gen.frame._captured)][0]

                        def replay():
                            graph.replay()
                            torch.cuda.synchronize()

                        res["replay"] = timeit(replay, min_time=0.5) * 1e3
                del gen
            wbytes = sum(p.numel() for n, p in model.named_parameters()
                         if not n.startswith(("conditioner", "speaker", "bos_before"))) \
                * torch.finfo(dt).bits // 8
            kv = 2 * 6 * (args.ctx + 30) * 1024 * B * torch.finfo(dt).bits // 8
            bound = (wbytes + kv) / bw * 1e3
            rows.append({
                "dtype": dname, "batch": B,
                "eager_frame_ms": f"{res[False]:.2f}", "graph_frame_ms": f"{res[True]:.2f}",
                "replay_ms": f"{res['replay']:.3f}", "bound_ms": f"{bound:.3f}",
                "replay_vs_bound": f"{res['replay'] / bound:.2f}x",
                "graph_speedup": f"{res[False] / res[True]:.1f}x",
                "x_realtime": f"{B / (res[True] / 1e3) / 12.5:.0f}",
            })
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0].keys()))
    print("->", write_rows("frame_step_gpu", args=args, rows=[{**r, "hbm_GB/s": f"{bw / 1e9:.0f}"}
                                              for r in rows]))


if __name__ == "__main__":
    main()
