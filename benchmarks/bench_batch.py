"""Batch generation throughput on one manifest: the raw engine, the batch job, the Ray job
(1 and 2 local workers), and the pocket-tts package looping over the same rows, in ONE run.

    python benchmarks/bench_batch.py [--rows 300] [--long 4] [--threads 2] [--record]
    python benchmarks/bench_batch.py --rows 40 --long 2 --short-seconds 1.5   # a small run

Weights are random `pocket` shapes (calm_fast.model.config.preset("pocket") and the codec's
vae_preset("pocket"), exported to files as a trained model would be); every row speaks with
one shared voice prompt; EOS is off, so every row makes exactly its frames (short rows
``--short-seconds``, long rows ``--long-seconds``). Reported per path: rows/s and audio
seconds per wall second, and
  (a) raw engine: every row submitted to one Engine (voice shared, VAE decoding on), run
      to the end;
  (b) batch job: calm_fast.serve.batch.run_batch over the manifest file (model already in
      memory: files written, results manifest, resume bookkeeping) -- target within 10% of (a);
  (c) Ray job: the same with --ray on a local instance, 1 and 2 workers (threads split
      between them; the wall time includes starting the actors and loading the model);
  peer: the pocket-tts package's generate_audio per row, 1 thread; its best is one process
      per core (cores x the 1-thread rate, an upper bound) -- target (a) >= 3.5x it.
Prints a table; writes it to --out (default: a temporary folder), and to
benchmarks/results/batch.csv only with --record.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))  # peer support
from common import print_table, write_rows  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "A small model can speak faster than real time on two cores.",
    "Turn left at the second light, then keep going until you see the river.",
    "We will meet again tomorrow morning at nine.",
]


def voice_wav(path, seconds=5.0, sr=24_000):
    import soundfile as sf

    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sr)) / sr
    wav = 0.3 * torch.sin(2 * torch.pi * 160 * t) * (1 + 0.5 * torch.sin(3 * t))
    wav = wav + 0.02 * torch.randn(wav.shape, generator=g)
    sf.write(str(path), wav.numpy(), sr)
    return wav[None]


def make_manifest(path, rows, long, short_s, long_s):
    out = []
    for i in range(rows + long):
        secs = long_s if i >= rows else short_s
        out.append({"id": f"{'l' if i >= rows else 's'}{i:05d}",
                    "text": SENTENCES[i % len(SENTENCES)], "voice": "voice.wav",
                    "max_seconds": secs})
    with open(path, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    return out


def models(workdir: Path):
    """Random pocket LM + VAE as export files (cached in workdir), and the SentencePiece
    model the peer's random build trained (the LM uses the same one)."""
    from calm_fast.codec.vae import VAE, vae_preset
    from calm_fast.model.calm import CALM
    from calm_fast.model.conditioning import SentencePieceTokenizer
    from calm_fast.model.config import preset
    from calm_fast.runtime.export import export_model, load_model

    lm_p, vae_p = workdir / "lm.safetensors", workdir / "vae.safetensors"
    if not (lm_p.exists() and vae_p.exists()):
        tok = SentencePieceTokenizer(workdir / "spm4000.model")
        torch.manual_seed(0)
        lm = CALM(preset("pocket").with_(text_bins=tok.vocab_size), tok)
        with torch.no_grad():  # the published init zeroes the head's modulations
            for p in lm.parameters():
                p.add_(0.02 * torch.randn_like(p))
        export_model(lm_p, lm)
        export_model(vae_p, VAE(vae_preset("pocket")))
    return lm_p, vae_p, load_model(lm_p, expect="calm"), load_model(vae_p, expect="vae")


@torch.no_grad()
def raw_engine(lm, vae, rows, voice, a):
    from calm_fast.runtime.engine import Engine
    from calm_fast.runtime.scheduler import Request

    c = lm.cfg.backbone
    block_bytes = 2 * c.num_layers * c.kv_heads * c.head_dim * 4 * 16
    t0 = time.perf_counter()  # the engine's construction counts, as in the batch job
    eng = Engine(lm, num_blocks=max(64, int(a.cache_mb * 2**20 // block_bytes)),
                 max_streams=a.max_streams, vae=vae, decode_frames=a.decode_frames)
    v = vae.encode(vae.pad(voice[None]))[0]
    shared = eng.share(lm.prefix(voice=v).detach())
    for i, r in enumerate(rows):
        eng.submit(Request(lm.prefix(text=r["text"], voice=v).detach(),
                           round(r["max_seconds"] * lm.cfg.frame_rate),
                           seed=i, eos_threshold=None), shared=shared)
    samples = 0
    for ev in eng.run():
        if ev.audio is not None:
            samples += ev.audio.shape[-1]
    return time.perf_counter() - t0, samples / vae.cfg.sample_rate


def batch_job(manifest, out, a, **kw):
    from calm_fast.serve.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = run_batch(manifest, out, progress=False, eos_threshold=None, max_streams=a.max_streams,
                  cache_mb=a.cache_mb, decode_frames=a.decode_frames, **kw)
    assert s["failed"] == 0, s
    return time.perf_counter() - t0, s["audio_s"]


@torch.no_grad()
def peer_loop(peer, rows, voice, threads):
    torch.set_num_threads(threads)
    state = peer.get_state_for_audio_prompt(voice)
    t0 = time.perf_counter()
    samples = 0
    for r in rows:
        frames = round(r["max_seconds"] * 12.5)
        peer._estimate_max_gen_len = lambda n, f=frames: f  # EOS is off: exactly these frames
        samples += peer.generate_audio(state, r["text"]).shape[-1]
    return time.perf_counter() - t0, samples / peer.sample_rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300, help="short rows")
    ap.add_argument("--long", type=int, default=4, help="long rows")
    ap.add_argument("--short-seconds", type=float, default=2.0)
    ap.add_argument("--long-seconds", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-streams", type=int, default=32)
    ap.add_argument("--cache-mb", type=float, default=1024)
    ap.add_argument("--decode-frames", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="Ray worker counts ('' to skip Ray)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs of (a) and (b), best kept")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "calm_fast_batch"))
    ap.add_argument("--out", default=None, help="where the table goes (JSON)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/results")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pocket_fixtures import random_tts_model

    peer = random_tts_model(work, eos_threshold=1e9)  # also trains work/spm4000.model
    torch.set_num_threads(a.threads)  # importing pocket_tts set it to 1
    lm_p, vae_p, lm, vae = models(work)
    manifest = work / "manifest.jsonl"
    rows = make_manifest(manifest, a.rows, a.long, a.short_seconds, a.long_seconds)
    voice = voice_wav(work / "voice.wav")
    n = len(rows)
    res = []

    def add(path, wall, audio, note=""):
        res.append({"path": path, "rows": n, "audio_s": round(audio, 1), "wall_s": round(wall, 2),
                    "rows_per_s": round(n / wall, 2), "audio_s_per_s": round(audio / wall, 2),
                    "note": note})
        print(f"  {path}: {wall:.1f} s", flush=True)

    print(f"{n} rows ({a.rows} x {a.short_seconds} s + {a.long} x {a.long_seconds} s), "
          f"{a.threads} threads", flush=True)
    raw_engine(lm, vae, rows[:4], voice, a)  # warm-up (first-call allocations)
    labels = {"lm": lm_p.name, "vae": vae_p.name}
    ra, rb = [], []
    for _ in range(a.repeat):  # (a) and (b) alternate: a shared machine drifts
        ra.append(raw_engine(lm, vae, rows, voice, a))
        rb.append(batch_job(manifest, work / "out_b", a, lm_model=lm, vae_model=vae,
                            labels=labels))
    add("(a) raw engine", *min(ra), f"best of {a.repeat}")
    add("(b) batch job", *min(rb), f"best of {a.repeat}; files + results manifest")
    if a.workers:
        import ray

        ray.init(num_cpus=a.threads, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        for w in (int(x) for x in a.workers.split(",")):
            add(f"(c) Ray job, {w} worker(s)",
                *batch_job(manifest, work / f"out_ray{w}", a, checkpoint=lm_p,
                           vae=vae_p, ray_address="", workers=w,
                           cpus_per_worker=max(1, a.threads // w)),
                "incl. actor start + model load")
        ray.shutdown()
    if not a.no_peer:
        wall, audio = peer_loop(peer, rows, voice, 1)
        add("peer, 1 thread", wall, audio, "pocket-tts generate_audio per row")
        best = dict(res[-1])
        cores = a.threads
        best.update(path=f"peer best ({cores} processes, bound)",
                    rows_per_s=round(cores * best["rows_per_s"], 2),
                    audio_s_per_s=round(cores * best["audio_s_per_s"], 2), wall_s="",
                    note=f"{cores} x the 1-thread rate")
        res.append(best)
    a_rate, b_rate = res[0]["audio_s_per_s"], res[1]["audio_s_per_s"]
    res[1]["note"] += f"; {b_rate / a_rate:.3f} x (a) (target >= 0.9)"
    if not a.no_peer:
        res[0]["note"] = f"{a_rate / res[-1]['audio_s_per_s']:.2f} x peer best (target >= 3.5)"
    print_table(res, ["path", "rows", "audio_s", "wall_s", "rows_per_s", "audio_s_per_s",
                      "note"])
    out = Path(a.out) if a.out else work / "bench_batch.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    if a.record:
        print(f"appended to {write_rows('batch', [{**r, 'threads': a.threads} for r in res], a)}")


if __name__ == "__main__":
    main()
