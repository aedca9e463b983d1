"""Single-query decode attention over the paged cache, Pocket TTS shapes (16 heads x 64):
ours (ops.paged_decode_attention: the C++ kernel on CPU, Triton on CUDA) vs gather + SDPA
(the eager reference) vs SDPA over a dense [B, H, ctx, D] cache (what an eager model with a
contiguous cache runs) and torch.compile of it; batch 1/8/64/256, context 250 and 1000.

    python benchmarks/bench_paged_attention.py [--device cpu|cuda] [--threads 2]

The bound is the K/V bytes over the measured read bandwidth. With --record, appends to
benchmarks/results/paged_attention[_gpu].csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_bench_args, print_table, synced, timeit, write_rows  # noqa: E402
from roofline import read_bandwidth  # noqa: E402

from calm_fast.fast import ops  # noqa: E402
from calm_fast.fast.cache import PagedKVCache  # noqa: E402

H, D, BS = 16, 64, 16


def case(B, ctx, dev, compiled):
    cache = PagedKVCache(1, B * (ctx // BS + 2), BS, H, D, max_streams=B, device=dev)
    g = torch.Generator().manual_seed(0)
    streams = [cache.new_stream() for _ in range(B)]
    slots = cache.reserve(streams, ctx)
    k = torch.randn(B, ctx, H, D, generator=g)
    v = torch.randn(B, ctx, H, D, generator=g)
    cache.write(0, slots, k.to(dev), v.to(dev))
    q = torch.randn(B, H, D, generator=g).to(dev)
    table = [t.to(dev) for t in cache.page_table(streams)]
    out = torch.empty_like(q)
    kd, vd = k.to(dev).transpose(1, 2).contiguous(), v.to(dev).transpose(1, 2).contiguous()

    def dense():
        return F.scaled_dot_product_attention(q[:, :, None], kd, vd)[:, :, 0]

    impls = {
        "ours": lambda: ops.paged_decode_attention(q, cache.k[0], cache.v[0], *table, out=out),
        "gather_sdpa": lambda: ops.paged_decode_attention_ref(q, cache.k[0], cache.v[0], *table),
        "dense_sdpa": dense,
    }
    if compiled is not None:
        impls["compile_dense"] = lambda: compiled(q, kd, vd)
    torch.testing.assert_close(impls["ours"](), dense(), rtol=1e-4, atol=1e-4)
    return {k: timeit(synced(f, dev), min_time=0.3) for k, f in impls.items()}


def main() -> None:
    args, dev = kernel_bench_args(__doc__)
    bw = read_bandwidth(1 << 28 if dev.type == "cpu" else 1 << 30, device=dev)
    print(f"measured read {bw / 1e9:.1f} GB/s")
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(
            lambda q, k, v: F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0])
    rows = []
    for B in map(int, args.batches.split(",")):
        for ctx in (250, 1000):
            t = case(B, ctx, dev, compiled)
            nbytes = 2 * B * ctx * H * D * 4
            rows.append({"device": dev.type, "batch": B, "ctx": ctx,
                         **{f"{k}_us": f"{v * 1e6:.0f}" for k, v in t.items()},
                         "bound_us": f"{nbytes / bw * 1e6:.0f}",
                         "ours_GB/s": f"{nbytes / t['ours'] / 1e9:.1f}",
                         "ours_pct_roofline": f"{100 * nbytes / t['ours'] / bw:.0f}%"})
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0].keys()))
    name = "paged_attention" + ("_gpu" if dev.type == "cuda" else "")
    print("->", write_rows(name, rows, args))


if __name__ == "__main__":
    main()
