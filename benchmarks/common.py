"""Shared helpers for the benchmark scripts: timing, machine description, CSV rows."""
from __future__ import annotations

import csv
import subprocess
import datetime as _dt
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model (or GPU name) and core count, for the results table."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from calm_fast.fast.calibrate import cpu_model

    return f"{cpu_model()} x{os.cpu_count()}"


# the instruction sets a CPU speed claim depends on (what /proc/cpuinfo calls them)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
             "amx_int8", "amx_tile")


def isa() -> str:
    """The CPU's flags among ISA_FLAGS, space-separated ("" where /proc/cpuinfo is absent)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ISA_FLAGS if f in have)
    except OSError:
        pass
    return ""


def timeit(fn, *, warmup: int = 3, min_time: float = 0.5, max_iters: int = 10_000) -> float:
    """Median seconds per call over repeated blocks (robust to a noisy shared machine)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(samples) < 5) and len(samples) < max_iters:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def kernel_bench_args(doc: str):
    """The options every per-op benchmark takes; sets the thread count. -> (args, device)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--no-compile", action="store_true")
    record_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def synced(fn, device):
    """fn followed by a device synchronisation (so GPU timings measure the work)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it (the code that
    was measured), or "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "calm_fast", "csrc",
                                "kernels", "benchmarks/common.py"], cwd=root).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def record_args(ap) -> None:
    """--record: append to the tracked benchmarks/results/<name>.csv; without it the rows go
    to a scratch folder (--results-dir, default a temp folder), so a run does not dirty a
    checkout."""
    ap.add_argument("--record", action="store_true",
                    help="append the rows to benchmarks/results/<name>.csv (tracked)")
    ap.add_argument("--results-dir", default=str(SCRATCH),
                    help=f"where the CSV goes without --record (default {SCRATCH})")


SCRATCH = Path(os.environ.get("TMPDIR", "/tmp")) / "calm_fast_bench"


def write_rows(name: str, rows: list[dict], args=None) -> Path:
    """Append rows to <name>.csv with date/machine/version/commit columns: in the tracked
    benchmarks/results when ``args.record`` (see ``record_args``), else in
    ``args.results_dir`` (default a scratch folder)."""
    import calm_fast

    record = bool(getattr(args, "record", False))
    out = RESULTS if record else Path(getattr(args, "results_dir", None) or SCRATCH)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    stamp = {
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "calm_fast": calm_fast.__version__,
        "commit": commit(),
        "threads": torch.get_num_threads(),
    }
    rows = [{**stamp, **r, "isa": isa()} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, in order
    header = []
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    if header and all(k in header for k in fields):
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header).writerows(rows)
        return path
    # new columns (or a new table): rewrite under the union of the columns, so that every
    # old row keeps its values under its own names
    old = []
    if header:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    union = list(dict.fromkeys(header + fields))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=union)
        w.writeheader()
        w.writerows(old + rows)
    tmp.replace(path)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
