"""Which CPU layout runs a model's batch-1 frame faster on THIS host, measured, not assumed.

Two ways run an fp32 backbone step on a CPU: our panel-packed weights through one C++ call
per step (``PackedBackbone.split()``: every core at any batch size), or plain [in, out]
weights op by op through torch (its sgemm, oneDNN). Which one wins depends on the host: on
AVX2-class hosts torch's small-row sgemm is far from the machine's peak and ours leads by
~2x, while on hosts with a strong oneDNN the two are close at batch 1 (issue 18's
measurements; benchmarks/results/frame_step.csv has both rows). ``fast.ops.cpu_layout``
asks here once per process, CPU model, thread count and model shape: a few interleaved
batch-1 steps of each layout on a scratch cache, the median of each, and torch only when it
beats ours by ``MARGIN`` (a tie keeps the one that scales with the batch).
"""
from __future__ import annotations

import statistics
import time

import torch

MARGIN = 0.9  # torch is chosen when its median step is below 0.9 x ours
_CHOICES: dict = {}  # (cpu, threads, shapes) -> "native" | "torch"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def shape_key(p) -> tuple:
    """What the timing depends on: depth, widths, heads (the weights' values do not)."""
    L = p.layers[0]
    return (len(p.layers), p.d_model, p.heads, p.kv_heads, p.head_dim, tuple(L.w1.shape))


@torch.no_grad()
def time_layouts(layouts: dict, step, prefill, ctx: int = 32, reps: int = 7,
                 warmup: int = 2) -> dict:
    """Median seconds of a batch-1 ``step`` for each of ``layouts`` {name: PackedBackbone},
    interleaved (host noise falls on all alike), each on its own scratch cache with ``ctx``
    rows already in it (by ``prefill``). ``step``/``prefill``: fast.backbone's (passed in:
    backbone asks ops, which asks here)."""
    any_p = next(iter(layouts.values()))
    rows = ctx + warmup + reps + 1
    block = 16
    caches = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, any_p.d_model, generator=g)
    for name, p in layouts.items():
        cache = p.make_cache(-(-rows // block) + 2, block, max_streams=2)
        s = cache.new_stream()
        prefill(p, cache, s, torch.randn(ctx, any_p.d_model, generator=g), outputs=False)
        for _ in range(warmup):
            step(p, cache, [s], x)
        caches[name] = (cache, s)
    times = {name: [] for name in layouts}
    for _ in range(reps):
        for name, p in layouts.items():
            cache, s = caches[name]
            t0 = time.perf_counter()
            step(p, cache, [s], x)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def choose(plain, split, step, prefill, timer=None) -> str:
    """"native" (``split``) or "torch" (``plain``) for this host, measured once per process,
    CPU model, thread count and shape."""
    key = (cpu_model(), torch.get_num_threads(), shape_key(plain))
    if key not in _CHOICES:
        t = (timer or time_layouts)({"native": split, "torch": plain}, step, prefill)
        _CHOICES[key] = "torch" if t["torch"] < MARGIN * t["native"] else "native"
    return _CHOICES[key]
