"""Measure this machine's ceilings: memory read bandwidth and fp32 matmul throughput.

Every speed claim in calm_fast is stated against these (percentage of the roofline), so
they are measured in the same run as the benchmark, not copied from a datasheet.

    python benchmarks/roofline.py [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

try:
    from .common import timeit
except ImportError:
    from common import timeit


def read_bandwidth(nbytes: int = 256 << 20, device="cpu", min_time: float = 1.0) -> float:
    """Bytes/second of a streaming read (a sum over a buffer far larger than the caches)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run():
        x.sum()
        sync()

    return nbytes / timeit(run, min_time=min_time)


def matmul_flops(n: int = 1024, dtype=torch.float32, device="cpu") -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)

    def run():
        a @ b
        sync()

    return 2 * n ** 3 / timeit(run, min_time=1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"read bandwidth: {read_bandwidth(device=args.device) / 1e9:.1f} GB/s")
    print(f"fp32 matmul:    {matmul_flops(device=args.device) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
