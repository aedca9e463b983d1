"""Shared by the server tests: tiny random models exported to a folder, a real uvicorn on
127.0.0.1 (a free port, in a thread), and small HTTP helpers over http.client."""
import http.client
import io
import json
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tiny_models import export_tiny  # noqa: F401 (the servers' tests import it from here)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def live_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="error", lifespan="on"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 20 or not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        th.join(timeout=10)


def request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers dict, body bytes); ``body`` a dict is sent as JSON."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    c.request(method, path, body, h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def post_json(port, path, body, **kw):
    return request(port, "POST", path, body, **kw)


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """A multipart/form-data body: fields {name: str}, files {name: (filename, bytes)}."""
    b = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                  .encode())
    for k, (fn, data) in files.items():
        out.write(f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{fn}\""
                  f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{b}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={b}"


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Samples (float32, mono) and rate of an encoded file, through PyAV."""
    import av

    c = av.open(io.BytesIO(data))
    st = c.streams.audio[0]
    rate = st.rate
    parts = [f.to_ndarray().astype(np.float32).reshape(-1) for f in c.decode(st)]
    c.close()
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate


def wav_pcm(data: bytes) -> np.ndarray:
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    return np.frombuffer(data[44:], "<i2")


def sine_wav(path, seconds=1.0, rate=1600):
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path
