"""Servers over loopback: calm_fast's `serve` vs the pocket-tts package's own `serve`, on the
same random `pocket` weights (english.yaml shapes, fp32, CPU), with 1/4/16/64 concurrent
clients.

    python benchmarks/bench_server.py [--clients 1,4,16,64] [--requests 1] [--threads 2]
                                      [--precision fp32|bf16|int8] [--record] [--out DIR]

Each server runs in its own process (built from the same seed: the package's TTSModel with
random weights, python_tests/pocket_fixtures.py; ours takes those weights through
calm_fast.accelerate), one after the other, so they never share the CPU. Every client
POSTs the same form to `/tts` (both servers have it; chunked WAV from the default voice,
the same 5 s prompt for both) ``--requests`` times in a row. EOS is disabled in both, and
ours is capped at the audio length the package makes for the text, so both make the same
audio. Per server and client count: aggregate real-time factor (audio seconds made / wall
seconds), p50 / p95 time to the first audio byte after the WAV header, failures.
Results: printed, and written to ``--out`` (default: a temp folder); with ``--record``
appended to benchmarks/results/server.csv (benchmarks/common.write_rows).
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python_tests"))  # peer support (not shipped)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "Hello world, this is a test."  # ~3 s of audio (the package's length estimate)


def voice_wav(seconds=5.0, sr=24_000):
    import torch

    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sr)) / sr
    wav = 0.3 * torch.sin(2 * torch.pi * 160 * t) * (1 + 0.5 * torch.sin(3 * t))
    return (wav + 0.02 * torch.randn(wav.shape, generator=g))[None]


# -- the server processes ------------------------------------------------------------------
def serve_peer(port: int, workdir: str, threads: int) -> None:
    import torch
    import uvicorn
    from pocket_fixtures import random_tts_model

    import pocket_tts.main as pm

    model = random_tts_model(workdir, eos_threshold=1e9)
    torch.set_num_threads(threads)
    pm.tts_model = model
    pm.default_voice_state = model.get_state_for_audio_prompt(voice_wav())
    uvicorn.run(pm.web_app, host="127.0.0.1", port=port, log_level="warning")


def serve_ours(port: int, workdir: str, threads: int, max_seconds: float, streams: int,
               precision: str = "fp32") -> None:
    import torch
    from pocket_fixtures import random_tts_model

    from calm_fast.runtime.voices import encode_prompt, save_voice
    from calm_fast.serve.models import from_pocket_package
    from calm_fast.serve.server import ServerConfig, serve

    model = random_tts_model(workdir, eos_threshold=1e9)
    torch.set_num_threads(threads)
    synth = from_pocket_package(model)
    vdir = Path(workdir) / "ours_voices"
    save_voice(vdir / "bench.safetensors", encode_prompt(synth.vae, voice_wav()), synth.vae)
    cfg = ServerConfig(max_streams=streams, max_queue=256, queue_timeout=600,
                       max_seconds=max_seconds, eos_threshold=None, cache_mb=1536,
                       decode_frames=8, default_voice="bench", voices_dir=str(vdir),
                       precision=precision)
    serve(synth, "127.0.0.1", port, cfg, log_level="warning")


# -- the clients ---------------------------------------------------------------------------
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def form(text: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n{text}\r\n"
            f"--{b}--\r\n").encode()
    return body, f"multipart/form-data; boundary={b}"


def one_request(port: int, sr: int = 24_000, text: str | None = None
                ) -> tuple[float, float, int]:
    """(seconds to the first audio byte, audio seconds, status)."""
    body, ctype = form(text or TEXT)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    c.request("POST", "/tts", body, {"Content-Type": ctype})
    r = c.getresponse()
    got, first = b"", None
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        got += chunk
        if first is None and len(got) > 44:
            first = time.perf_counter() - t0
    c.close()
    n = max(0, len(got) - 44) // 2
    return (first if first is not None else float("nan")), n / sr, r.status


def wait_health(port: int, proc, timeout=600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def level(port: int, clients: int, requests: int, expect_s: float | None) -> dict:
    ttfb, audio, fails = [], [], 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client():
        nonlocal fails
        barrier.wait()
        for _ in range(requests):
            try:
                f, a, st = one_request(port)
            except OSError:
                f, a, st = float("nan"), 0.0, 0
            with lock:
                ok = st == 200 and a > 0 and (expect_s is None or abs(a - expect_s) < 0.2)
                fails += 0 if ok else 1
                if ok:
                    ttfb.append(f)
                    audio.append(a)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=client) for _ in range(clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    ttfb.sort()
    q = (lambda p: ttfb[min(len(ttfb) - 1, int(p * len(ttfb)))] * 1e3) if ttfb else (
        lambda p: float("nan"))
    return {"clients": clients, "requests": clients * requests,
            "audio_s": round(sum(audio), 2), "wall_s": round(wall, 2),
            "rtf": round(sum(audio) / wall, 3), "ttfb_p50_ms": round(q(0.5), 1),
            "ttfb_p95_ms": round(q(0.95), 1), "failures": fails}


def run_server(kind: str, args, max_seconds: float | None = None) -> list[dict]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--workdir",
           args.workdir, "--threads", str(args.threads)]
    if max_seconds is not None:
        cmd += ["--max-seconds", str(max_seconds), "--streams", str(max(args.levels)),
                "--precision", args.precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = []
    try:
        wait_health(port, proc)
        _, warm_s, st = one_request(port)  # untimed warm-up; it also gives the length
        if st != 200:
            raise RuntimeError(f"{kind} warm-up answered {st}")
        for c in args.levels:
            r = level(port, c, args.requests, warm_s)
            rows.append({"server": kind if kind == "peer" or args.precision == "fp32"
                         else f"{kind}-{args.precision}", **r,
                         "audio_per_request_s": round(warm_s, 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main():
    global TEXT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent client counts")
    ap.add_argument("--requests", type=int, default=1, help="requests per client, in a row")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "calm_fast_e2e"))
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "calm_fast_bench"),
                    help="folder for server.csv when not --record")
    ap.add_argument("--record", action="store_true",
                    help="append to benchmarks/results/server.csv instead")
    ap.add_argument("--only", choices=("ours", "peer"), default=None)
    ap.add_argument("--text", default=TEXT, help="what every request says")
    ap.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                    help="our server's LM weights (`calm-fast serve --precision`); the "
                         "package always runs fp32")
    # child modes
    ap.add_argument("--serve", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "peer":
        return serve_peer(args.port, args.workdir, args.threads)
    if args.serve == "ours":
        return serve_ours(args.port, args.workdir, args.threads, args.max_seconds, args.streams,
                          args.precision)
    args.levels = [int(c) for c in args.clients.split(",")]
    TEXT = args.text
    rows = []
    if args.only != "ours":
        rows += run_server("peer", args)
        secs = rows[-1]["audio_per_request_s"]
    else:
        secs = 6.0
    if args.only != "peer":
        # the package's frames for this text (EOS off), plus a frame so ours is never short
        rows += run_server("ours", args, max_seconds=secs + 0.04)
    from common import print_table, write_rows

    print_table(rows, ["server", "clients", "requests", "audio_s", "wall_s", "rtf",
                       "ttfb_p50_ms", "ttfb_p95_ms", "failures"])
    for c in args.levels:
        p = next((r for r in rows if r["server"] == "peer" and r["clients"] == c), None)
        o = next((r for r in rows if r["server"].startswith("ours") and r["clients"] == c), None)
        if p and o and p["rtf"]:
            print(f"{c:3d} clients: ours/peer RTF {o['rtf'] / p['rtf']:.2f}x, p50 TTFB "
                  f"{p['ttfb_p50_ms'] / max(o['ttfb_p50_ms'], 1e-9):.2f}x faster")
    if args.record:
        print(f"appended to {write_rows('server', rows, args)}")
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "server.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
