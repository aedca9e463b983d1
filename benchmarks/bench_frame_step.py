"""One generation frame at `pocket` shapes on CPU: backbone step (6 x 1024, 16 heads, FFN
4096) + output LayerNorm + 1-step LSD head (6 x 512). The peer is the pocket-tts package's
own StreamingTransformer + SimpleMLPAdaLN (random weights, its streaming state); ours is
fast_backbone.step over PagedKVCache + the fused CPU head, on the same weights.

    python benchmarks/bench_frame_step.py [--threads 2] [--ctx 150] [--batches 1,8,64]

The bound is (weights + K/V bytes read) / measured read bandwidth, or FLOPs / measured
matmul rate, whichever is larger; each row pairs 5 short timings with a bandwidth measured
just before each (the shared host's drifts), and reports the medians. With --record, appends to benchmarks/results/frame_step.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, record_args, write_rows  # noqa: E402
from roofline import matmul_flops, read_bandwidth  # noqa: E402

from calm_fast.fast import backbone as fb  # noqa: E402
from calm_fast.fast import calibrate  # noqa: E402
from calm_fast.fast.head import head_cpu, lsd_decode, pack_head  # noqa: E402

D, HEADS, LAYERS, FF, LATENT = 1024, 16, 6, 4096, 32


def build_peer():
    from pocket_tts.modules.mlp import SimpleMLPAdaLN
    from pocket_tts.modules.stateful_module import StatefulModule
    from pocket_tts.modules.transformer import StreamingTransformer

    torch.manual_seed(0)
    tr = StreamingTransformer(d_model=D, num_heads=HEADS, num_layers=LAYERS,
                              dim_feedforward=FF).eval()
    for name, mod in tr.named_modules():
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    head = SimpleMLPAdaLN(LATENT, 512, LATENT, D, 6, num_time_conds=2).eval()
    norm = torch.nn.LayerNorm(D, eps=1e-5)
    return tr, head, norm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=150, help="positions already in the cache")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--int8", action="store_true",
                    help="also time int8 weights: ours (backbone + head) vs the peer's "
                         "quantize_dynamic of its attention and FFN")
    ap.add_argument("--bf16", action="store_true",
                    help="also time bf16 weights (bf16 rows, fp32 sums): ours vs the peer's fp32 frame")
    record_args(ap)
    args = ap.parse_args()
    from pocket_tts.models.flow_lm import lsd_decode as peer_lsd
    from pocket_tts.modules.stateful_module import increment_steps, init_states

    # after the import: importing pocket_tts runs torch.set_num_threads(1) (tts_model.py)
    torch.set_num_threads(args.threads)

    tr, head, norm = build_peer()
    pb = fb.pack_transformer(tr.state_dict(), heads=HEADS)
    ph = pack_head(head.state_dict())
    bw, peak = read_bandwidth(), matmul_flops()
    print(f"measured: read {bw / 1e9:.1f} GB/s, fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    rows = []
    from calm_fast.fast import ops

    C = ops.native()  # which copy of the C++ kernels runs (csrc/isa_kernels.h), which build
    kernels = f"{C.isa} ({'native' if C.native_build else 'portable'})"
    with torch.inference_mode():
        # -- peer, batch 1 (its cache needs equal offsets across a batch) --
        state = init_states(tr, batch_size=1, sequence_length=args.ctx + 400)
        tr(torch.randn(1, args.ctx, D), state)
        increment_steps(tr, state, args.ctx)
        x1 = torch.randn(1, 1, D)

        def peer_frame():
            z = norm(tr(x1, state))[:, -1]
            increment_steps(tr, state, 1)
            return peer_lsd(lambda s, t, x: head(z, s, t, x), torch.randn(1, LATENT), 1)

        t_peer = timeit(peer_frame, min_time=2.0, max_iters=200)
        # fp32: our CPU layout (cpu_linear.SplitLinear); fp32-sgemm: the same step with plain
        # [in, out] weights, i.e. one single-threaded sgemm per projection (eager torch)
        variants = [("fp32", pb.split(), ph.split(), t_peer), ("fp32-sgemm", pb, ph, t_peer)]
        if args.bf16:
            variants.append(("bf16", pb.split(bf16=True), ph.split(bf16=True), t_peer))
        if args.int8:
            from torch.ao.quantization import quantize_dynamic

            for layer in tr.layers:  # what the package's quantize=True does
                quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            variants.append(("int8", pb.quantized(), ph.quantized(),
                             timeit(peer_frame, min_time=2.0, max_iters=200)))
        for (kind, pbk, phk, t_pk), B in ((v, b) for v in variants
                                         for b in map(int, args.batches.split(","))):
            cache = pbk.make_cache(B * ((args.ctx + 400) // 16 + 2), 16, max_streams=B)
            streams = [cache.new_stream() for _ in range(B)]
            for s in streams:
                fb.prefill(pbk, cache, s, torch.randn(args.ctx, D))
            xb = torch.randn(B, D)

            def ours_frame():
                z = fb.step(pbk, cache, streams, xb)
                z = torch.nn.functional.layer_norm(z, (D,), norm.weight, norm.bias, 1e-5)
                return lsd_decode(head_cpu, phk, z, torch.randn(B, LATENT), 1)

            kv = 2 * LAYERS * (args.ctx + 100) * D * 4 * B
            nbytes = pbk.nbytes() + phk.nbytes() + kv
            flops = 2 * B * (pb.nbytes() + ph.nbytes()) / 4  # (fp32 bytes: 4 per weight)

            def bound_at(bw_now):
                return max(nbytes / bw_now, flops / peak) if kind != "int8" else nbytes / bw_now

            # The host is shared and its read bandwidth drifts between 30 and 54 GB/s within
            # minutes: the ceiling is measured right before each of 5 short timings, and the
            # row reports the medians (time, bandwidth, and time / bound of each pair).
            pairs = []
            for _ in range(5):
                # each timing appends up to 103 rows per stream: roll them back, so every
                # timing sees ctx..ctx+103 cached rows and the cache never fills (a fast
                # step fits its 100 iterations in the timing window)
                for s in streams:
                    cache.truncate(s, cache.position(s) - args.ctx)
                bw_now = read_bandwidth(min_time=0.3)
                t_now = timeit(ours_frame, min_time=0.5, max_iters=100)
                pairs.append((t_now, bw_now, t_now / bound_at(bw_now)))
            t_ours, bw_row, ratio = (statistics.median(p[i] for p in pairs) for i in range(3))
            bound = bound_at(bw_row)
            rows.append({
                "weights": kind, "batch": B, "ctx": args.ctx, "kernels": kernels,
                "peer_ms": f"{t_pk * 1e3:.1f}" if B == 1 else "",
                "ours_ms": f"{t_ours * 1e3:.1f}",
                "ours_ms_per_stream": f"{t_ours * 1e3 / B:.2f}",
                "bound_ms": f"{bound * 1e3:.1f}",
                "ours_vs_bound": f"{ratio:.2f}x",
                "speedup_vs_peer": f"{t_pk * B / t_ours:.1f}x",
                "frames_per_s": f"{B / t_ours:.0f}",
                "x_realtime": f"{B / t_ours / 12.5:.1f}",
                "read_GB/s": f"{bw_row / 1e9:.1f}",
            })
    print_table(rows, list(rows[0].keys()))
    # what a scheduler runs here in fp32 (CALM_FAST_CPU_GEMM=auto: fast/calibrate.py's
    # measurement, which the fp32 and fp32-sgemm rows above check)
    auto = calibrate.choose(pb, pb.split(), fb.step, fb.prefill)
    print(f"fp32 layout chosen here by calibration: {auto} "
          f"({'fp32' if auto == 'native' else 'fp32-sgemm'} row)")
    for r in rows:
        r["auto_fp32"] = auto
    print("->", write_rows("frame_step", args=args, rows=[{**r, "matmul_GFLOP/s": f"{peak / 1e9:.1f}"}
                                          for r in rows]))


if __name__ == "__main__":
    main()
