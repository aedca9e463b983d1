"""Text to audio, end to end, in ONE run: the pocket-tts package vs calm_fast on the same
config and the same random weights (``english.yaml`` = the `pocket` shapes, fp32, CPU).

    python benchmarks/bench_e2e.py [--threads 2] [--batches 1,4,16,64] [--runs 3]
    python benchmarks/bench_e2e.py --config english_7m_2026-10     # any packaged config
    python benchmarks/bench_e2e.py --families [NAME,NAME...]       # one config per family

Both generate the same text with EOS disabled (the package's own length estimate sets the
frames: ~10 s), from a voice state exported beforehand (so time to first audio excludes
voice encoding, for both). Reported:
  * single stream: real-time factor (audio s / wall s) and time to the first audio chunk,
    the package through its own threaded pipeline, calm_fast through calm_fast.accelerate;
  * per-frame breakdown at batch 1: backbone step, head, decoder (ms; ours also on its
    multi-frame chunks: the drop-in decodes 1, 2, then 4 frames per call);
  * aggregate throughput of calm_fast's engine at each batch (voice prefix shared, one VAE
    batch per frame), against the package's best: one process per core, i.e. twice its
    1-thread single-stream rate (an upper bound for the package);
  * int8: calm_fast's int8 weights vs the package's own quantize=True.
  * bf16: calm_fast's bf16 weights (bf16 rows, fp32 sums) vs the package's fp32 and quantize=True,
    and its next-frame latent error against our fp32.
With --record, appends to benchmarks/results/e2e.csv and draws benchmarks/results/e2e_throughput.png.
``--config NAME``: the same on that packaged config's shapes (random weights; rows in
e2e_configs.csv, with a config column, unless NAME is english); the per-frame
breakdown times the LSD head of the older configs only (other heads: their rows are left out).
``--families``: the first three rows (single-stream RTF, time to first audio, best
throughput) for one config per model family (FAMILIES, or the comma-separated names given),
one table, e2e_families.csv with --record.
``--shipped``: instead, the shipped default TTS model (a trained calm_fast model, its own
iSTFT VAE), single stream as `calm-fast tts` runs it.
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
from common import print_table, timeit, record_args, write_rows  # noqa: E402
from pocket_fixtures import random_tts_model  # noqa: E402

import calm_fast  # noqa: E402
from calm_fast.model.sampling import lsd_sample  # noqa: E402

TEXT = ("Hello world. I am a small text to speech model, and I run on two CPU cores, "
        "faster than real time.")
# one packaged config per model family: the 6- and 24-layer LSD models, the 18M / 7M
# drifting models with a Mimi of their own decoder shapes, the 2M pointwise model, and the
# 6-layer drifting one
FAMILIES = ("english", "english_2026-09_24l", "english_18m_2026-10", "english_7m_refl_2026-10",
            "english_2m_2026-10", "english_drifting_26-09")


def voice_wav(seconds=5.0, sr=24_000):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sr)) / sr
    wav = 0.3 * torch.sin(2 * torch.pi * 160 * t) * (1 + 0.5 * torch.sin(3 * t))
    return (wav + 0.02 * torch.randn(wav.shape, generator=g))[None]


def stream_run(model, state, text, sr):
    """(seconds to the first chunk, wall seconds, audio seconds) of one streamed call."""
    t0 = time.perf_counter()
    it = model.generate_audio_stream(state, text)
    first = next(it)
    t1 = time.perf_counter()
    n = first.shape[-1] + sum(c.shape[-1] for c in it)
    return t1 - t0, time.perf_counter() - t0, n / sr


def single_stream(model, state, runs, sr, text=TEXT):
    stream_run(model, state, text, sr)  # untimed: first-call allocations, for both models
    res = [stream_run(model, state, text, sr) for _ in range(runs)]
    ttfa = statistics.median(r[0] for r in res)
    rtf = statistics.median(r[2] / r[1] for r in res)
    return ttfa, rtf, res[0][2]


@torch.no_grad()
def peer_breakdown(peer):
    """ms per frame: flow-LM step (backbone + head), head alone, Mimi decode of one frame."""
    from pocket_tts.modules.stateful_module import increment_steps, init_states

    f = peer.flow_lm
    st = init_states(f, batch_size=1, sequence_length=400)
    x = torch.full((1, 1, f.ldim), float("nan"))
    empty = torch.empty(1, 0, f.dim)

    def lm_step():
        nonlocal x
        x, _ = f._sample_next_latent(x, empty, st, 1, peer.temp, None, 1e9)
        x = x[:, None]
        increment_steps(f, st, 1)

    lm = timeit(lm_step, warmup=3, min_time=1.0)
    c, noise = torch.randn(1, f.dim), torch.randn(1, f.ldim)
    s, t = torch.zeros(1, 1), torch.ones(1, 1)
    head = timeit(lambda: f.flow_net(c, s, t, noise), warmup=3, min_time=0.5)
    ms = init_states(peer.mimi, batch_size=1, sequence_length=2000)
    lat = torch.randn(1, 1, f.ldim)

    def dec():
        peer.mimi.decode_from_latent(lat, ms)
        increment_steps(peer.mimi, ms, 16)

    return {"lm": lm * 1e3, "head": head * 1e3, "decoder": timeit(dec, warmup=3, min_time=1.0)
            * 1e3}


@torch.no_grad()
def ours_breakdown(fast, state):
    """ms per frame: engine frame step (batch 1), head alone, one VAE decode slot frame."""
    from calm_fast.runtime.generate import Request

    eng = fast.engine
    lm = fast.lm
    # the LM step alone: no decoder, and no decode worker (overlap) to hand frames to
    dec, worker = eng.decoder, eng._worker
    eng.decoder, eng._worker = None, None
    prefix = torch.cat([state.rows, lm.conditioner(torch.arange(20))])
    rid = eng.submit(Request(prefix, 1000, eos_threshold=None, seed=0))
    for _ in range(5):
        eng.step()
    step = timeit(eng.step, warmup=2, min_time=1.0)
    eng.cancel(rid)
    eng.decoder, eng._worker = dec, worker
    head_fn = eng.sched.frame._head_fn
    packed = eng.sched.head
    Z, noise = torch.randn(1, lm.cfg.backbone.d_model), torch.randn(1, lm.cfg.latent_dim)
    head = timeit(lambda: lsd_sample(lambda c, x, ts: head_fn(packed, c, x, ts), Z, noise, 1),
                  warmup=3, min_time=0.5)
    slots = dec
    slots.open(0)
    lat = torch.randn(1, 1, lm.cfg.latent_dim)
    d = timeit(lambda: slots.decode([0], lat), warmup=3, min_time=1.0)
    n = eng.decode_frames  # the engine's steady-state chunk
    lat = torch.randn(1, n, lm.cfg.latent_dim)
    dn = timeit(lambda: slots.decode([0], lat), warmup=3, min_time=1.0) / n
    slots.close(0)
    return {"lm": step * 1e3, "head": head * 1e3, "decoder": d * 1e3,
            f"decoder, {n} frames per call": dn * 1e3}


def throughput(fast, state, batch, sr, text=TEXT):
    t0 = time.perf_counter()
    wavs = fast.generate_audio_batch(state, [text] * batch, seed=1)
    wall = time.perf_counter() - t0
    return sum(w.shape[-1] for w in wavs) / sr / wall


def headline(config, args, batches, workdir):
    """The models of one config and the first three rows (single-stream RTF, time to first
    audio, best throughput) with what the rest of the table needs (dict)."""
    peer = random_tts_model(workdir, config=config, eos_threshold=1e9)
    # after the build: importing pocket_tts runs torch.set_num_threads(1) (tts_model.py)
    torch.set_num_threads(args.threads)
    sr = peer.sample_rate
    fast = calm_fast.accelerate(peer, max_streams=max(batches), cache_mb=1536)
    wav = voice_wav()
    p_state, o_state = peer.get_state_for_audio_prompt(wav), fast.get_state_for_audio_prompt(wav)
    text = args.text
    p_ttfa, p_rtf, secs = single_stream(peer, p_state, args.runs, sr, text)
    o_ttfa, o_rtf, o_secs = single_stream(fast, o_state, args.runs, sr, text)
    torch.set_num_threads(1)
    p_rtf1 = single_stream(peer, p_state, max(1, args.runs - 1), sr, text)[1]
    torch.set_num_threads(args.threads)
    thr = {b: throughput(fast, o_state, b, sr, text) for b in batches}
    best_b = max(thr, key=thr.get)
    # the package's best: one process per core, i.e. twice its 1-thread single-stream rate
    # (an upper bound, as bench_batch.py takes it)
    peer_best = max(p_rtf, 2 * p_rtf1)
    rows = [
        {"metric": "single-stream RTF (x real time)", "peer": p_rtf, "ours": o_rtf,
         "ratio": o_rtf / p_rtf, "target": ">= 2x"},
        {"metric": "time to first audio (ms)", "peer": p_ttfa * 1e3, "ours": o_ttfa * 1e3,
         "ratio": p_ttfa / o_ttfa, "target": ">= 3x (ours <= 1/3)"},
        {"metric": f"best throughput (x RT; ours at batch {best_b})", "peer": peer_best,
         "ours": thr[best_b], "ratio": thr[best_b] / peer_best, "target": ">= 3.5x"},
    ]
    return dict(peer=peer, fast=fast, wav=wav, sr=sr, o_state=o_state, rows=rows, thr=thr,
                p_rtf=p_rtf, p_rtf1=p_rtf1, peer_best=peer_best, secs=secs, o_secs=o_secs)


def _finish(rows, args, secs, config, always_config=False):
    for r in rows:
        # e2e.csv (english) keeps the columns it was started with; other tables name theirs
        if config != "english" or always_config:
            r["config"] = config
        r["threads"], r["audio_s"] = args.threads, round(secs, 2)
        for k in ("peer", "ours", "ratio"):
            if isinstance(r[k], float):
                r[k] = round(r[k], 2)


def families(args, batches):
    """--families: the headline rows of one config per family, against the package's own
    generate_audio / generate_audio_stream on the same random weights."""
    from pocket_tts.utils.config import CONFIGS_DIR

    known = {p.stem for p in Path(CONFIGS_DIR).glob("*.yaml")}
    names = args.families.split(",") if args.families else [f for f in FAMILIES if f in known]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"not a packaged config: {', '.join(bad)} (known: "
                         f"{', '.join(sorted(known))})")
    rows = []
    for name in names:
        h = headline(name, args, batches, args.workdir)  # one tokenizer for all
        _finish(h["rows"], args, h["secs"], name, always_config=True)
        rows += h["rows"]
        print_table(h["rows"], ["config", "metric", "peer", "ours", "ratio"])
        del h  # the next config's models (a 24-layer one is large)
    print_table(rows, ["config", "metric", "peer", "ours", "ratio", "target"])
    print(f"appended to {write_rows('e2e_families', rows, args)}")


def shipped(threads: int, runs: int, args=None):
    """The shipped default TTS (calm_fast/assets/default/), single stream, the way
    `calm-fast tts` runs it (a Service with one stream, default voice, EOS on): real-time
    factor and time to the first audio chunk, VAE decode included."""
    from calm_fast.serve.commands import _voice
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.service import Job, Service

    torch.set_num_threads(threads)
    synth = load_synth()
    svc = Service(synth, max_streams=1).start()
    sr = synth.sample_rate
    ttfa, rtf = [], []
    try:
        for i in range(runs + 1):  # the first run warms up
            job = Job.speech(synth, TEXT, voice=_voice(synth, None), seed=i,
                             temperature=synth.temperature, max_seconds=30.0)
            t0 = time.perf_counter()
            svc.submit(job)
            first, n = None, 0
            for kind, x in job.chunks(timeout=120):
                if kind == "audio" and len(x):
                    first = first or time.perf_counter() - t0
                    n += len(x)
                elif kind == "error":
                    raise RuntimeError(x)
            wall = time.perf_counter() - t0
            if i:
                ttfa.append(first)
                rtf.append(n / sr / wall)
    finally:
        svc.close()
    rows = [{"metric": "shipped default TTS single-stream RTF (x real time)", "peer": "",
             "ours": statistics.median(rtf), "ratio": "", "target": ">= 20x"},
            {"metric": "shipped default TTS time to first audio (ms)", "peer": "",
             "ours": statistics.median(ttfa) * 1e3, "ratio": "", "target": "<= 60"}]
    for r in rows:
        r["threads"], r["audio_s"] = threads, round(n / sr, 2)
        r["ours"] = round(r["ours"], 2)
    print_table(rows, ["metric", "ours", "target"])
    print(f"appended to {write_rows('e2e', rows, args)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "calm_fast_e2e"))
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--shipped", action="store_true",
                    help="only the shipped default TTS model's single-stream rows")
    ap.add_argument("--config", default="english",
                    help="the packaged pocket-tts config whose shapes are run (default english)")
    ap.add_argument("--families", nargs="?", const="", default=None, metavar="NAMES",
                    help="the first three rows for one config per family (or for the "
                         f"comma-separated NAMES): {', '.join(FAMILIES)}")
    ap.add_argument("--text", default=TEXT, help="the text spoken (default: a ~10 s sentence)")
    record_args(ap)
    args = ap.parse_args()
    if args.shipped:
        return shipped(args.threads, args.runs, args)
    batches = [int(b) for b in args.batches.split(",")]
    if args.families is not None:
        return families(args, batches)
    h = headline(args.config, args, batches, args.workdir)
    peer, fast, wav, sr, o_state = h["peer"], h["fast"], h["wav"], h["sr"], h["o_state"]
    rows, thr, peer_best, secs = h["rows"], h["thr"], h["peer_best"], h["secs"]
    p_rtf, p_rtf1, o_secs = h["p_rtf"], h["p_rtf1"], h["o_secs"]
    # the per-frame breakdown calls the package's LSD head and its flow LM's step directly:
    # the newer heads (one-step, z_proj) take other arguments there
    lsd = (getattr(peer.flow_lm, "flow_type", "lsd") == "lsd"
           and getattr(peer.flow_lm, "z_proj", None) is None)
    pb, ob = (peer_breakdown(peer), ours_breakdown(fast, o_state)) if lsd else ({}, {})
    if not lsd:
        print(f"({args.config}: no per-frame breakdown; it times the LSD head only)")
    for k in ob:  # ours also times the decoder on its steady-state multi-frame chunks
        rows.append({"metric": f"batch-1 {k} ms/frame", "peer": pb.get(k, pb["decoder"]),
                     "ours": ob[k], "ratio": pb.get(k, pb["decoder"]) / ob[k], "target": ""})
    for b in batches:
        rows.append({"metric": f"throughput batch {b} (x RT)", "peer": "", "ours": thr[b],
                     "ratio": thr[b] / peer_best, "target": ""})
    if not args.no_int8:
        qpeer = random_tts_model(args.workdir, config=args.config, eos_threshold=1e9,
                                 quantize=True)
        torch.set_num_threads(args.threads)
        qfast = calm_fast.accelerate(peer, int8=True, max_streams=1, cache_mb=128)
        q_p = single_stream(qpeer, qpeer.get_state_for_audio_prompt(wav), args.runs, sr,
                            args.text)[1]
        q_o = single_stream(qfast, qfast.get_state_for_audio_prompt(wav), args.runs, sr,
                            args.text)[1]
        rows.append({"metric": "int8 single-stream RTF (peer quantize=True)", "peer": q_p,
                     "ours": q_o, "ratio": q_o / q_p, "target": "> 1x"})
    if not args.no_bf16:
        rows += bf16_rows(peer, fast, o_state, wav, sr, args, p_rtf,
                          None if args.no_int8 else q_p)
    _finish(rows, args, secs, args.config)
    print_table(rows, ["metric", "peer", "ours", "ratio", "target"])
    print(f"(audio per call: peer {secs:.2f} s, ours {o_secs:.2f} s; peer 1-thread RTF "
          f"{p_rtf1:.2f})")
    other = args.config != "english"  # the other configs' rows: a table with their name
    path = write_rows("e2e_configs" if other else "e2e", rows, args)
    print(f"appended to {path}")
    png = f"e2e_throughput_{args.config}.png" if other else "e2e_throughput.png"
    plot(thr, p_rtf, peer_best, Path(path).with_name(png), args.threads, args.config)


def bf16_rows(peer, fast, state, wav, sr, args, p_rtf, q_p):
    """precision="bf16" (bf16 weights and rows, fp32 sums): single stream against the package's fp32
    and quantize=True, and its latent error against fp32 (teacher-forced at temperature 0:
    the next frame after the fp32 model's own first t frames, t = 10, 20, ... 90)."""
    from calm_fast.runtime.generate import CALMGenerator, Request

    bfast = calm_fast.accelerate(peer, precision="bf16", max_streams=1, cache_mb=128)
    b_ttfa, b_o, _ = single_stream(bfast, bfast.get_state_for_audio_prompt(wav), args.runs, sr,
                                   args.text)
    rows = [{"metric": "bf16 single-stream RTF (peer fp32)", "peer": p_rtf, "ours": b_o,
             "ratio": b_o / p_rtf, "target": ">= 3x"}]
    if q_p is not None:
        rows.append({"metric": "bf16 single-stream RTF (peer quantize=True)", "peer": q_p,
                     "ours": b_o, "ratio": b_o / q_p, "target": ">= 1.7x"})
    rows.append({"metric": "bf16 time to first audio (ms)", "peer": "", "ours": b_ttfa * 1e3,
                 "ratio": "", "target": ""})
    lm = fast.lm
    ids = fast._chunks(args.text, 50, None)[0][0]
    prefix = torch.cat([state.rows, lm.conditioner(ids)])
    fp = CALMGenerator(lm).generate([Request(prefix, 100, temperature=0.0,
                                             eos_threshold=None)])[0]
    bg = CALMGenerator(lm, precision="bf16")
    errs = []
    for t in range(10, 100, 10):
        x = bg.generate([Request(prefix, 1, temperature=0.0, eos_threshold=None,
                                 prompt_latents=fp[:t])])[0][0]
        errs.append(100 * float((x - fp[t]).norm() / fp[t].norm()))
    rows.append({"metric": "bf16 next-frame latent error vs fp32 (% relative, median of 9)",
                 "peer": "", "ours": statistics.median(errs), "ratio": "", "target": ""})
    return rows


def plot(thr, p_rtf, peer_best, out, threads, config="english"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = sorted(thr)
    ax.plot(bs, [thr[b] for b in bs], "o-", label="calm_fast engine (shared voice prefix)")
    ax.axhline(p_rtf, color="gray", ls="--", label=f"pocket-tts, 1 stream, {threads} threads")
    ax.axhline(peer_best, color="k", ls=":", label="pocket-tts, 1 process per core (bound)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("audio seconds per wall second")
    shapes = "pocket shapes" if config == "english" else config
    ax.set_title(f"Text to audio, {shapes}, fp32 CPU, {threads} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
