"""The decoder on its own thread (``accelerate(..., overlap=True)``) against the engine that
runs LM and decoder one after the other, through the drop-in on one packaged config's
shapes (random weights), per weight precision: single-stream real-time factor of the stream
and of ``generate_audio``, and time to the first audio. The package's own stream (which runs
its decoder on a second thread) is timed in the same run. Runs of each variant are
interleaved, so host noise falls on all of them alike.

    python benchmarks/bench_overlap.py [--config english] [--threads 2] [--runs 5]
        [--precisions fp32,bf16,int8] [--batch 16] [--record]

``--batch N``: also the aggregate of ``generate_audio_batch`` over N copies of the text
(fp32; N streams share each frame step), overlap off and on.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))  # peer support
from bench_e2e import TEXT, stream_run, voice_wav  # noqa: E402
from common import print_table, record_args, write_rows  # noqa: E402
from pocket_fixtures import random_tts_model  # noqa: E402

import calm_fast  # noqa: E402


def whole_call(model, state, text, sr):
    """Wall seconds and audio seconds of one generate_audio call."""
    t0 = time.perf_counter()
    wav = model.generate_audio(state, text)
    return time.perf_counter() - t0, wav.shape[-1] / sr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="english")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--workdir", default=None)
    record_args(ap)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="calm_fast_overlap_"))
    peer = random_tts_model(workdir, config=args.config, eos_threshold=1e9)
    torch.set_num_threads(args.threads)  # importing pocket_tts set it to 1
    sr, wav = peer.sample_rate, voice_wav()
    variants = {"package": (peer, peer.get_state_for_audio_prompt(wav))}
    for prec in args.precisions.split(","):
        for overlap in (False, True):
            m = calm_fast.accelerate(peer, precision=prec, max_streams=1, cache_mb=128,
                                     overlap=overlap)
            variants[(prec, overlap)] = (m, m.get_state_for_audio_prompt(wav))
    res = {k: [] for k in variants}
    whole = {k: [] for k in variants if k != "package"}
    if args.batch:  # engines with room for the batch
        for overlap in (False, True):
            m = calm_fast.accelerate(peer, max_streams=args.batch, cache_mb=1536,
                                     overlap=overlap)
            variants[("batch", overlap)] = (m, m.get_state_for_audio_prompt(wav))
    batch = {k: [] for k in variants if k[0] == "batch"}
    for k in batch:
        m, st = variants.pop(k)
        m.generate_audio_batch(st, [args.text] * 2, seed=1)  # untimed warm-up
        batch[k] = (m, st)
    for k, (m, st) in variants.items():  # untimed: first-call allocations
        stream_run(m, st, args.text, sr)
    for _ in range(args.runs):
        for k, (m, st) in variants.items():
            res[k].append(stream_run(m, st, args.text, sr))
            if k in whole:
                whole[k].append(whole_call(m, st, args.text, sr))
    p_rtf = statistics.median(r[2] / r[1] for r in res["package"])
    rows = [{"variant": "package stream", "precision": "fp32", "overlap": "thread",
             "ttfa_ms": round(1e3 * statistics.median(r[0] for r in res["package"]), 1),
             "stream_rtf": round(p_rtf, 2), "generate_audio_rtf": "", "vs_package": 1.0}]
    for k in variants:
        if k == "package":
            continue
        prec, overlap = k
        rtf = statistics.median(r[2] / r[1] for r in res[k])
        rows.append({"variant": "calm_fast drop-in", "precision": prec,
                     "overlap": "on" if overlap else "off",
                     "ttfa_ms": round(1e3 * statistics.median(r[0] for r in res[k]), 1),
                     "stream_rtf": round(rtf, 2),
                     "generate_audio_rtf": round(statistics.median(a / w for w, a in whole[k]),
                                                 2),
                     "vs_package": round(rtf / p_rtf, 2)})
    agg = {k: [] for k in batch}
    for _ in range(max(1, args.runs // 2)):
        for k, (m, st) in batch.items():
            t0 = time.perf_counter()
            wavs = m.generate_audio_batch(st, [args.text] * args.batch, seed=1)
            agg[k].append(sum(w.shape[-1] for w in wavs) / sr / (time.perf_counter() - t0))
    for (_, overlap), v in agg.items():
        rows.append({"variant": f"calm_fast batch of {args.batch}", "precision": "fp32",
                     "overlap": "on" if overlap else "off", "ttfa_ms": "",
                     "stream_rtf": "", "generate_audio_rtf": round(statistics.median(v), 2),
                     "vs_package": ""})
    for r in rows:
        r["config"], r["threads"], r["runs"] = args.config, args.threads, args.runs
    print_table(rows, ["variant", "precision", "overlap", "ttfa_ms", "stream_rtf",
                       "generate_audio_rtf", "vs_package"])
    print(f"-> {write_rows('overlap', rows, args)}")


if __name__ == "__main__":
    main()
