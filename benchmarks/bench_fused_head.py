"""The `pocket` head (6 AdaLN res-blocks of width 512, 32-dim latents, 1024-dim condition,
LSD with 2 time inputs): the published module in eager torch (the peer's own code) vs our
fused CPU path over SplitLinear weights (and, as `plain`, over plain [in, out] weights:
one single-threaded sgemm per matmul), and torch.compile of the reference with --compile), one LSD step, batch
1/8/64/256, with the weights' read time at the measured bandwidth as the roofline.

    python benchmarks/bench_fused_head.py [--threads 2] [--compile]

Appends to benchmarks/results/fused_head.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, write_rows  # noqa: E402
from roofline import matmul_flops, read_bandwidth  # noqa: E402

from calm_fast.kernels.fused_head import head_cpu, head_ref, pack_head  # noqa: E402


def build_peer(W=512, depth=6, latent=32, cond=1024):
    from pocket_tts.modules.mlp import SimpleMLPAdaLN

    torch.manual_seed(0)
    return SimpleMLPAdaLN(latent, W, latent, cond, depth, num_time_conds=2).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(head_ref)")
    ap.add_argument("--batches", default="1,8,64,256")
    args = ap.parse_args()
    peer = build_peer()
    # after the import: importing pocket_tts runs torch.set_num_threads(1) (tts_model.py)
    torch.set_num_threads(args.threads)
    p = pack_head(peer.state_dict())
    ps = p.split()
    bw, flops = read_bandwidth(), matmul_flops()
    print(f"measured: read {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.1f} GFLOP/s; "
          f"head weights {p.nbytes() / 1e6:.1f} MB")
    compiled = torch.compile(head_ref) if args.compile else None
    rows = []
    for B in map(int, args.batches.split(",")):
        c, x = torch.randn(B, 1024), torch.randn(B, 32)
        s, t = torch.zeros(B, 1), torch.ones(B, 1)
        with torch.inference_mode():
            torch.testing.assert_close(head_cpu(p, c, x, (0.0, 1.0)), peer(c, s, t, x),
                                       rtol=1e-4, atol=1e-4)
            t_peer = timeit(lambda: peer(c, s, t, x))
            torch.testing.assert_close(head_cpu(ps, c, x, (0.0, 1.0)), peer(c, s, t, x),
                                       rtol=1e-4, atol=1e-4)
            t_ours = timeit(lambda: head_cpu(ps, c, x, (0.0, 1.0)))
            t_plain = timeit(lambda: head_cpu(p, c, x, (0.0, 1.0)))
            t_comp = timeit(lambda: compiled(p, c, x, [s, t])) if compiled else None
        flop = 2 * B * sum(v.numel() for k, v in p.__dict__.items()
                           if isinstance(v, torch.Tensor) and v.dim() >= 2)
        bound = max(p.nbytes() / bw, flop / flops)
        rows.append({
            "batch": B,
            "peer_eager_ms": f"{t_peer * 1e3:.2f}",
            "ours_ms": f"{t_ours * 1e3:.2f}",
            "plain_ms": f"{t_plain * 1e3:.2f}",
            "compile_ms": f"{t_comp * 1e3:.2f}" if t_comp else "",
            "bound_ms": f"{bound * 1e3:.2f}",
            "ours_vs_bound": f"{t_ours / bound:.2f}x",
            "speedup_vs_peer": f"{t_peer / t_ours:.2f}x",
            "ours_GB/s": f"{p.nbytes() / t_ours / 1e9:.1f}",
            "ours_GFLOP/s": f"{flop / t_ours / 1e9:.1f}",
        })
    cols = list(rows[0].keys())
    print_table(rows, cols)
    print("->", write_rows("fused_head", [{**r, "read_GB/s": f"{bw / 1e9:.1f}"} for r in rows]))


if __name__ == "__main__":
    main()
