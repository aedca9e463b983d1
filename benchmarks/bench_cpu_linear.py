"""One `pocket` projection (1024 -> 4096, fp32) on CPU: our panel GEMM (cpu_linear.SplitLinear)
against torch's F.linear, best of 5 short timings per row count. The row says which copy of
the kernels ran (`_C.isa`, csrc/isa_kernels.h) and whether the build is native or portable:
run it under CALM_FAST_ISA=build|avx2|avx512 to compare the copies of one build.

    python benchmarks/bench_cpu_linear.py [--threads 1] [--batches 1,8,64] [--record]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_bench_args, print_table, timeit, write_rows  # noqa: E402

from calm_fast.fast import ops  # noqa: E402
from calm_fast.fast.cpu_linear import SplitLinear  # noqa: E402

K, N = 1024, 4096


def main() -> None:
    args, _ = kernel_bench_args(__doc__)
    C = ops.native()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(K, N, generator=g)
    ours, wt = SplitLinear(w), w.t().contiguous()
    rows = []
    for m in map(int, args.batches.split(",")):
        x = torch.randn(m, K, generator=g)
        t_ours = min(timeit(lambda: ours(x), min_time=0.2, max_iters=200) for _ in range(5))
        t_torch = min(timeit(lambda: F.linear(x, wt), min_time=0.2, max_iters=200)
                      for _ in range(5))
        rows.append({"kernels": C.isa, "build": "native" if C.native_build else "portable",
                     "rows": m, "ours_ms": f"{t_ours * 1e3:.3f}",
                     "torch_ms": f"{t_torch * 1e3:.3f}",
                     "ours_GFLOP/s": f"{2 * m * K * N / t_ours / 1e9:.0f}",
                     "ours_GB/s": f"{K * N * 4 / t_ours / 1e9:.1f}",
                     "speedup_vs_torch": f"{t_torch / t_ours:.2f}x"})
    print_table(rows, list(rows[0].keys()))
    print("->", write_rows("cpu_linear", rows, args))


if __name__ == "__main__":
    main()
