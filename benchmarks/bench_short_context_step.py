"""One short-context generation step at the paper's music shapes (4 layers x 1536, 24
heads, K = 10): ShortContext.step through the torch reference op (eager), the same under
torch.compile, and (on CUDA) with the fused Triton ring attention; batch 1/8/64/256.

    python benchmarks/bench_short_context_step.py [--device cpu|cuda] [--threads 2]

The bound is the step's weight bytes + ring bytes over the measured read bandwidth.
With --record, appends to benchmarks/results/short_context_step.csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_bench_args, print_table, synced, timeit, write_rows  # noqa: E402
from roofline import read_bandwidth  # noqa: E402

from calm_fast.fast import ops  # noqa: E402
from calm_fast.model.config import preset  # noqa: E402
from calm_fast.kernels import short_context_step as sk  # noqa: E402
from calm_fast.model.short_context import ShortContext  # noqa: E402


def main() -> None:
    args, dev = kernel_bench_args(__doc__)
    cfg = preset("music")
    torch.manual_seed(0)
    sc = ShortContext(cfg.short_context, cfg.latent_dim, cfg.backbone.d_model).to(dev).eval()
    bw = read_bandwidth(1 << 28 if dev.type == "cpu" else 1 << 30, device=dev)
    wbytes = sum(p.numel() * p.element_size() for p in sc.parameters())
    print(f"measured read {bw / 1e9:.1f} GB/s; weights {wbytes / 1e6:.1f} MB")
    impls = {"eager_ref": sk.ring_attention_ref}
    if dev.type == "cuda":
        impls["triton"] = sk.ring_attention_triton
    rows = []
    orig = ops.ring_attention
    for B in map(int, args.batches.split(",")):
        x = torch.randn(B, cfg.latent_dim, device=dev)
        state = sc.init_state(B, device=dev)
        state.count.fill_(25)  # a full ring (the steady state)
        slots = torch.arange(B, device=dev)
        times = {}
        with torch.inference_mode():
            for name, fn in impls.items():
                ops.ring_attention = fn
                times[name] = timeit(synced(lambda: sc.step(state, slots, x), dev),
                                     min_time=0.5)
            ops.ring_attention = sk.ring_attention_ref
            if not args.no_compile:
                try:
                    step = torch.compile(sc.step)
                    times["compile_ref"] = timeit(synced(lambda: step(state, slots, x), dev),
                                                  min_time=0.5)
                except Exception as e:  # report, do not hide: compile is a comparison only
                    print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
        ops.ring_attention = orig
        ring = 2 * B * cfg.short_context.context * cfg.short_context.transformer.d_model * 4 \
            * cfg.short_context.transformer.num_layers
        bound = (wbytes + ring) / bw
        best = min(times.values())
        rows.append({"device": dev.type, "batch": B,
                     **{f"{k}_ms": f"{v * 1e3:.3f}" for k, v in times.items()},
                     "bound_ms": f"{bound * 1e3:.3f}", "best_vs_bound": f"{best / bound:.2f}x",
                     "best_GB/s": f"{(wbytes + ring) / best / 1e9:.1f}"})
        print(rows[-1], flush=True)
    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k)
                  if k in rows[-1] else 99)
    print_table(rows, cols)
    print("->", write_rows("short_context_step" + ("_gpu" if dev.type == "cuda" else ""), rows, args))


if __name__ == "__main__":
    main()
