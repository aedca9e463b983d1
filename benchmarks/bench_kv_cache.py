"""KV-cache benchmarks: manager operations per second (C++ vs the Python twin) and CPU paged
decode attention (C++ kernel vs gather + SDPA), at Pocket TTS shapes (16 heads x 64).

    python benchmarks/bench_kv_cache.py [--threads 2] [--quick]

Prints a table; with --record, appends it to benchmarks/results/kv_cache.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, timeit, record_args, write_rows  # noqa: E402
from roofline import read_bandwidth  # noqa: E402

from calm_fast.fast import ops  # noqa: E402
from calm_fast._C import KVManager  # noqa: E402
from calm_fast.fast.cache import PagedKVCache  # noqa: E402
from calm_fast.fast.kv_manager_py import PyKVManager  # noqa: E402


def manager_workload(Manager, steps: int, streams: int = 64, batched: bool = False) -> float:
    """A decode-like mix: every step appends one row per stream and exports the page table;
    every 32 steps a stream is trimmed to a window, freed, or forked. Returns ops/second."""
    m = Manager(8192, 16)
    ids = [m.new_stream() for _ in range(streams)]
    for s in ids:
        m.append(s, 40)  # a prompt
    buf = [np.zeros(streams + 1, np.int32), np.zeros(4 * 8192, np.int32),
           np.zeros(streams, np.int32), np.zeros(streams, np.int32)]
    ops_done = 0
    t0 = time.perf_counter()
    for step in range(steps):
        if batched:  # one call appends a row to every stream (all or nothing)
            m.append_batch(np.asarray(ids, np.int64), 1)
        else:
            for s in ids:
                m.append(s, 1)
        m.page_table(np.asarray(ids, np.int64), *buf)
        ops_done += len(ids) + 1
        if step % 32 == 31:
            i = step // 32 % len(ids)
            m.trim_front(ids[i], 100)
            m.free(ids[i])
            ids[i] = m.fork(ids[(i + 1) % len(ids)])
            ops_done += 3
    return ops_done / (time.perf_counter() - t0)


def attention_case(batch: int, ctx: int, heads=16, kv_heads=16, dim=64, block=16):
    cache = PagedKVCache(1, batch * (ctx // block + 2), block, kv_heads, dim,
                         max_streams=batch)
    g = torch.Generator().manual_seed(0)
    streams = [cache.new_stream() for _ in range(batch)]
    slots = cache.reserve(streams, ctx)
    cache.write(0, slots, torch.randn(batch, ctx, kv_heads, dim, generator=g),
                torch.randn(batch, ctx, kv_heads, dim, generator=g))
    q = torch.randn(batch, heads, dim, generator=g)
    table = cache.page_table(streams)
    out = torch.empty_like(q)
    fast = lambda: ops.paged_decode_attention(q, cache.k[0], cache.v[0], *table, out=out)  # noqa: E731
    ref = lambda: ops.paged_decode_attention_ref(q, cache.k[0], cache.v[0], *table)  # noqa: E731
    torch.testing.assert_close(fast(), ref(), rtol=1e-4, atol=1e-4)
    kv_bytes = 2 * batch * ctx * kv_heads * dim * 4
    return timeit(fast), timeit(ref), kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    record_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    steps = 64 if args.quick else 512
    cpp = manager_workload(KVManager, steps)
    py = manager_workload(PyKVManager, steps)
    cpp_b = manager_workload(KVManager, steps, batched=True)
    rows.append({"bench": "manager_ops", "case": "64 streams decode mix", "ours": "C++",
                 "value": f"{cpp:,.0f} ops/s", "baseline": f"{py:,.0f} ops/s (Python twin)",
                 "roofline": "", "speedup": f"{cpp / py:.1f}x"})
    rows.append({"bench": "manager_ops", "case": "same, append_batch", "ours": "C++ batched",
                 "value": f"{cpp_b:,.0f} ops/s", "baseline": f"{py:,.0f} ops/s (Python twin)",
                 "roofline": "", "speedup": f"{cpp_b / py:.1f}x"})
    bw = read_bandwidth()
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s")
    for batch in (1, 8, 64):
        for ctx in (250, 1000):
            t_fast, t_ref, nbytes = attention_case(batch, ctx)
            rows.append({"bench": "paged_attention", "case": f"B={batch} ctx={ctx} 16x64",
                         "ours": "C++ OpenMP",
                         "value": f"{t_fast * 1e6:,.0f} us ({nbytes / t_fast / 1e9:.1f} GB/s)",
                         "roofline": f"{100 * nbytes / t_fast / bw:.0f}% of read BW",
                         "baseline": f"{t_ref * 1e6:,.0f} us (gather+SDPA)",
                         "speedup": f"{t_ref / t_fast:.1f}x"})
    print_table(rows, ["bench", "case", "ours", "value", "roofline", "baseline", "speedup"])
    print("->", write_rows("kv_cache", rows, args))


if __name__ == "__main__":
    main()
