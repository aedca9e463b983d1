"""The `pocket` head (6 AdaLN res-blocks of width 512, 32-dim latents, 1024-dim condition,
LSD with 2 time inputs): the published module in eager torch (the peer's own code) vs our
fused CPU path over SplitLinear weights (and, as `plain`, over plain [in, out] weights:
one single-threaded sgemm per matmul), and torch.compile of the reference with --compile), one LSD step, batch
1/8/64/256, with the weights' read time at the measured bandwidth as the roofline.

    python benchmarks/bench_fused_head.py [--threads 2] [--compile] [--device cuda]

On CUDA the fused paths are the torch one (cuBLAS, plain weights) and the Triton kernels
(`triton_ms`); where the pocket-tts package is not installed, the eager module is our own
calm_fast.model.head.AdaLNHead (the same math and key layout, tested equal to the peer's).
With --record, appends to benchmarks/results/fused_head[_gpu].csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, record_args, write_rows  # noqa: E402
from roofline import matmul_flops, read_bandwidth  # noqa: E402

from common import synced  # noqa: E402

from calm_fast.fast.head import head_cpu, head_ref, pack_head  # noqa: E402
from calm_fast.kernels.fused_head import head_triton


def build_peer(W=512, depth=6, latent=32, cond=1024):
    torch.manual_seed(0)
    try:
        from pocket_tts.modules.mlp import SimpleMLPAdaLN
    except ImportError:
        from calm_fast.model.config import HeadConfig
        from calm_fast.model.head import AdaLNHead

        return AdaLNHead(HeadConfig(W, depth, "lsd"), latent, cond).eval()
    return SimpleMLPAdaLN(latent, W, latent, cond, depth, num_time_conds=2).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(head_ref)")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--device", default="cpu")
    record_args(ap)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    peer = build_peer().to(dev)
    # after the import: importing pocket_tts runs torch.set_num_threads(1) (tts_model.py)
    torch.set_num_threads(args.threads)
    p = pack_head(peer.state_dict())
    ps = p if cuda else p.split()
    bw = read_bandwidth(1 << 30 if cuda else 256 << 20, device=dev)
    flops = matmul_flops(4096 if cuda else 1024, device=dev)
    print(f"measured: read {bw / 1e9:.1f} GB/s, fp32 matmul {flops / 1e9:.1f} GFLOP/s; "
          f"head weights {p.nbytes() / 1e6:.1f} MB")
    compiled = torch.compile(head_ref) if args.compile else None
    rows = []
    for B in map(int, args.batches.split(",")):
        c, x = torch.randn(B, 1024, device=dev), torch.randn(B, 32, device=dev)
        s, t = torch.zeros(B, 1, device=dev), torch.ones(B, 1, device=dev)
        T = lambda f: timeit(synced(f, dev))  # noqa: E731
        with torch.inference_mode():
            want = peer(c, s, t, x)
            for q in (p, ps):
                torch.testing.assert_close(head_cpu(q, c, x, (0.0, 1.0)), want,
                                           rtol=1e-4, atol=1e-4)
            t_peer = T(lambda: peer(c, s, t, x))
            t_ours = T(lambda: head_cpu(ps, c, x, (0.0, 1.0)))
            t_plain = T(lambda: head_cpu(p, c, x, (0.0, 1.0)))
            t_comp = T(lambda: compiled(p, c, x, [s, t])) if compiled else None
            t_tri = None
            if cuda:
                torch.testing.assert_close(head_triton(p, c, x, (0.0, 1.0)), want,
                                           rtol=1e-3, atol=1e-3)
                t_tri = T(lambda: head_triton(p, c, x, (0.0, 1.0)))
        flop = 2 * B * sum(v.numel() for k, v in p.__dict__.items()
                           if isinstance(v, torch.Tensor) and v.dim() >= 2)
        bound = max(p.nbytes() / bw, flop / flops)
        rows.append({
            "batch": B,
            "peer_eager_ms": f"{t_peer * 1e3:.2f}",
            "ours_ms": f"{t_ours * 1e3:.2f}",
            "plain_ms": f"{t_plain * 1e3:.2f}",
            "compile_ms": f"{t_comp * 1e3:.2f}" if t_comp else "",
            "triton_ms": f"{t_tri * 1e3:.3f}" if t_tri else "",
            "bound_ms": f"{bound * 1e3:.2f}",
            "ours_vs_bound": f"{t_ours / bound:.2f}x",
            "speedup_vs_peer": f"{t_peer / t_ours:.2f}x",
            "ours_GB/s": f"{p.nbytes() / t_ours / 1e9:.1f}",
            "ours_GFLOP/s": f"{flop / t_ours / 1e9:.1f}",
        })
    cols = list(rows[0].keys())
    print_table(rows, cols)
    print("->", write_rows("fused_head" + ("_gpu" if cuda else ""), args=args, rows=[{**r, "read_GB/s": f"{bw / 1e9:.1f}"} for r in rows]))


if __name__ == "__main__":
    main()
