"""A load test over loopback: 64 concurrent clients x 3 requests each against a real
`calm-fast serve` process (tiny model, short inputs): no failure, every body complete,
the server's peak RSS reported (and bounded); bounded in count and in time."""
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from serve_helpers import export_tiny, free_port

CLIENTS, PER_CLIENT = 64, 3


def _rss_peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_64_concurrent_clients(tmp_path):
    paths = export_tiny(tmp_path)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "calm_fast.cli", "serve", "--port", str(port),
                          "--checkpoint", str(paths["lm"]), "--vae", str(paths["vae"]),
                          "--max-streams", "64", "--max-queue", "256", "--max-seconds", "0.5",
                          "--eos-threshold", "off", "--log-level", "warning",
                          "--cache-mb", "64"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.monotonic() - t0 < 60, "server did not start"
            time.sleep(0.2)
        failures, sizes, ttfb = [], [], []
        barrier = threading.Barrier(CLIENTS)

        def client(i):
            barrier.wait()
            for k in range(PER_CLIENT):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    t = time.monotonic()
                    c.request("POST", "/v1/audio/speech", json.dumps(
                        {"input": f"Client {i} says {k}.", "response_format": "pcm",
                         "seed": i * 10 + k}), {"Content-Type": "application/json"})
                    r = c.getresponse()
                    first = r.read1(65536)
                    ttfb.append(time.monotonic() - t)
                    body = first + r.read()
                    if r.status != 200:
                        failures.append((i, k, r.status, body[:200]))
                    else:
                        sizes.append(len(body))
                    c.close()
                except OSError as e:
                    failures.append((i, k, repr(e)))

        start = time.monotonic()
        ths = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
        wall = time.monotonic() - start
        peak = _rss_peak_mb(p.pid)
        ttfb.sort()
        print(f"\n{CLIENTS} clients x {PER_CLIENT}: {wall:.1f} s, failures {len(failures)}, "
              f"p50 TTFB {ttfb[len(ttfb) // 2] * 1000:.0f} ms, p95 "
              f"{ttfb[int(len(ttfb) * 0.95)] * 1000:.0f} ms, peak server RSS {peak:.0f} MB")
        assert not failures, failures[:5]
        assert len(sizes) == CLIENTS * PER_CLIENT
        assert set(sizes) == {7 * 128 * 2}  # 0.5 s cap = 7 frames of 128 samples, pcm16
        assert peak < 4096
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        assert "calm_fast_running_streams 0" in text and "calm_fast_queue_depth 0" in text
    finally:
        p.terminate()
        p.wait(15)
