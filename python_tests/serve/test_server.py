"""calm-fast serve over loopback: a real uvicorn on 127.0.0.1, one engine, tiny random models.

Formats decode, streams deliver audio before the request ends, a disconnect frees the
request's cache blocks, limits answer 413/429/503, bad fields answer JSON naming them, and
the audio of concurrent requests equals each request alone with the same seed."""
import http.client
import json
import threading
import time

import numpy as np
import pytest

from serve_helpers import (decode_audio, export_tiny, live_server, multipart, post_json,
                           request, sine_wav, wav_pcm)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="module")
def srv(paths):
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.server import ServerConfig, create_app

    synth = load_synth(paths["lm"], vae=paths["vae"])
    cfg = ServerConfig(max_streams=8, max_queue=8, max_seconds=1.0, eos_threshold=None,
                       max_input_chars=500, queue_timeout=20, chunk_chars=40)
    app = create_app(synth, cfg)
    with live_server(app) as port:
        yield port, app


def speech(port, **body):
    body.setdefault("input", "Hello there.")
    return post_json(port, "/v1/audio/speech", body)


def wait_idle(svc, timeout=10):
    t0 = time.monotonic()
    while svc.running or svc.queue_depth:
        assert time.monotonic() - t0 < timeout, "the service did not go idle"
        time.sleep(0.01)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "aac", "flac"])
def test_every_format_decodes(srv, fmt):
    port, app = srv
    st, h, full = speech(port, response_format=fmt, seed=3, stream=False)
    assert st == 200, full[:300]
    st2, h2, streamed = speech(port, response_format=fmt, seed=3, stream=True)
    assert st2 == 200 and h2.get("transfer-encoding") == "chunked"
    assert "content-length" in h
    rate = int(h["x-sample-rate"])
    if fmt == "pcm":
        pcm = np.frombuffer(full, "<i2")
        assert len(pcm) == 13 * 128 and full == streamed  # 1 s cap = 13 frames of 128
        return
    if fmt == "wav":
        assert full[4:8] != b"\xff\xff\xff\xff" and streamed[4:8] == b"\xff\xff\xff\xff"
        assert wav_pcm(full).tobytes() == wav_pcm(streamed).tobytes()
        assert len(wav_pcm(full)) == 13 * 128 and rate == 1600
        return
    for data in (full, streamed):
        x, r = decode_audio(data)
        assert len(x) / r > 0.5 and np.isfinite(x).all()  # ~1.04 s of audio


def test_stream_delivers_audio_before_the_request_ends(srv):
    port, app = srv
    svc = app.state.service
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    text = " ".join(f"Sentence number {i} is here." for i in range(6))  # 6 chunks x 1 s
    c.request("POST", "/v1/audio/speech", json.dumps(
        {"input": text, "response_format": "pcm", "seed": 1}),
        {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    first = r.read1(65536)
    assert len(first) > 0
    assert svc.running == 1  # still generating while the client holds its first audio
    rest = r.read()
    c.close()
    total = len(first) + len(rest)
    assert total == 6 * 13 * 128 * 2  # every chunk made, nothing lost at the seams


def test_disconnect_cancels_and_frees_blocks(srv):
    port, app = srv
    svc = app.state.service
    wait_idle(svc)
    free0 = svc.engine.sched.free_blocks
    cancelled0 = app.state.metrics.cancelled
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    text = " ".join(f"A long sentence {i}." for i in range(20))  # 10 chunks of 13 frames
    steps0 = svc.steps
    c.request("POST", "/v1/audio/speech", json.dumps(
        {"input": text, "response_format": "pcm", "seed": 1}),
        {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.read1(4096)
    assert svc.running == 1
    c.sock.close()  # the client goes away mid-stream
    c.close()
    t0 = time.monotonic()
    while svc.running or svc.engine.sched.free_blocks != free0:
        assert time.monotonic() - t0 < 10, "the request kept generating after a disconnect"
        time.sleep(0.01)
    assert app.state.metrics.cancelled == cancelled0 + 1
    assert svc.steps - steps0 < 10 * 13  # it did not run to the end


def test_bad_fields_answer_json_naming_them(srv):
    port, _ = srv
    cases = [({"input": "hi", "speed": 9}, 422, "speed"),
             ({"input": "hi", "speed": "fast"}, 422, "speed"),
             ({}, 422, "input"),
             ({"input": ""}, 422, "input"),
             ({"input": "hi", "seed": -1}, 422, "seed"),
             ({"input": "hi", "temperature": -1}, 422, "temperature"),
             ({"input": "hi", "response_format": "ogg"}, 400, "response_format"),
             ({"input": "hi", "voice": "nobody"}, 400, "voice"),
             ({"input": "hi", "stream_format": "sse"}, 400, "stream_format"),
             ({"input": "   "}, 400, "input"),
             ({"input": "hi [pause:99s]"}, 400, "input"),
             ({"input": "x" * 501}, 413, "input")]
    for body, status, param in cases:
        st, h, data = post_json(port, "/v1/audio/speech", body)
        assert st == status, (body, data)
        assert h["content-type"].startswith("application/json")
        err = json.loads(data)["error"]
        assert err["param"] == param and param in err["message"] or err["param"] == param, err
    st, _, data = request(port, "POST", "/v1/audio/speech", b"{not json",
                          {"Content-Type": "application/json"})
    assert st == 422 and "error" in json.loads(data)
    body, ctype = multipart({"text": "hi", "voice_url": "https://example.invalid/v.wav"}, {})
    st, _, data = request(port, "POST", "/tts", body, {"Content-Type": ctype})
    assert st == 400 and json.loads(data)["error"]["param"] == "voice_url"


def test_concurrent_requests_equal_each_alone(srv):
    """Batched frame by frame with a bad request among them: each gets its solo audio."""
    port, app = srv
    texts = ["One.", "Two is longer. It has two sentences.", "Three three three.", "Four!"]
    alone = [speech(port, input=t, seed=10 + i, response_format="pcm")[2]
             for i, t in enumerate(texts)]
    out = [None] * (len(texts) + 1)
    barrier = threading.Barrier(len(out))

    def go(i):
        barrier.wait()
        if i == len(texts):  # a bad request in the same instant
            out[i] = speech(port, input="hi", voice="nobody")
        else:
            out[i] = speech(port, input=texts[i], seed=10 + i, response_format="pcm")

    steps0 = app.state.service.steps
    ths = [threading.Thread(target=go, args=(i,)) for i in range(len(out))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert out[-1][0] == 400
    frames = sum(len(a) // 256 for a in alone)
    assert app.state.service.steps - steps0 < frames  # they shared frame steps
    for i, a in enumerate(alone):
        st, _, b = out[i]
        assert st == 200
        x, y = np.frombuffer(a, "<i2").astype(int), np.frombuffer(b, "<i2").astype(int)
        assert len(x) == len(y) and np.abs(x - y).max() <= 2  # <= 2 LSB of 16-bit audio


def test_voices_upload_list_and_use(srv, tmp_path):
    port, _ = srv
    wav = sine_wav(tmp_path / "me.wav").read_bytes()
    body, ctype = multipart({"name": "me"}, {"file": ("me.wav", wav)})
    st, _, data = request(port, "POST", "/v1/audio/voices", body, {"Content-Type": ctype})
    assert st == 200, data
    assert json.loads(data)["id"] == "me"
    st, _, data = request(port, "GET", "/v1/audio/voices")
    assert {"id": "me", "name": "me", "builtin": False} in json.loads(data)["voices"]
    st, _, a = speech(port, voice="me", seed=2, response_format="pcm")
    st2, _, b = speech(port, seed=2, response_format="pcm")
    assert st == st2 == 200 and a != b  # the voice prompt conditions the audio
    st, _, c = speech(port, voice="alloy", seed=2, response_format="pcm")  # OpenAI name
    assert st == 200 and c == b
    body, ctype = multipart({"text": "Hello."}, {"voice_wav": ("p.wav", wav)})
    st, h, data = request(port, "POST", "/tts", body, {"Content-Type": ctype})
    assert st == 200 and data[:4] == b"RIFF" and len(wav_pcm(data)) == 13 * 128
    body, ctype = multipart({}, {"file": ("bad.wav", b"not audio at all")})
    st, _, data = request(port, "POST", "/v1/audio/voices", body, {"Content-Type": ctype})
    assert st == 400 and "cannot be used" in json.loads(data)["error"]["message"]


def test_voice_files_upload_as_voices(srv, tmp_path):
    """POST /v1/audio/voices takes a voice file too: ours (latents) or a pocket-tts voice
    state (attention K/V) of this model, which speaks exactly as the latents it holds."""
    from safetensors.torch import save_file

    from calm_fast.runtime.voices import encode_prompt, save_voice
    from tiny_models import pocket_voice_state

    port, app = srv
    synth = app.state.service.synth
    lat = encode_prompt(synth.vae, sine_wav(tmp_path / "me.wav"))
    save_voice(tmp_path / "lat.safetensors", lat, synth.vae)
    save_file(pocket_voice_state(synth.lm, lat), str(tmp_path / "kv.safetensors"))
    out = {}
    for name in ("lat", "kv"):
        # no file name: a voice file is told from audio by its bytes
        body, ctype = multipart({"name": f"file-{name}"},
                                {"file": ("", (tmp_path / f"{name}.safetensors").read_bytes())})
        st, _, data = request(port, "POST", "/v1/audio/voices", body, {"Content-Type": ctype})
        assert st == 200, data
        info = json.loads(data)
        assert info["frames"] == lat.shape[0] and info["kind"] == {"lat": "latents",
                                                                   "kv": "kv"}[name]
        st, _, out[name] = speech(port, voice=f"file-{name}", seed=4, response_format="pcm")
        assert st == 200
    _, _, plain = speech(port, seed=4, response_format="pcm")
    assert out["lat"] == out["kv"] != plain
    # a state of another model (one layer too few) is refused, naming what is wrong
    bad = pocket_voice_state(synth.lm, lat)
    bad = {k: v for k, v in bad.items() if not k.startswith("transformer.layers.0.")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    body, ctype = multipart({}, {"file": ("v.safetensors", (tmp_path / "bad.safetensors")
                                          .read_bytes())})
    st, _, data = request(port, "POST", "/v1/audio/voices", body, {"Content-Type": ctype})
    msg = json.loads(data)["error"]["message"]
    assert st == 400 and "voice file" in msg and "layer 0" in msg and "/tmp" not in msg


def test_uploaded_voice_files_are_kept_in_voices_dir(paths, tmp_path):
    """With --voices-dir, an uploaded pocket-tts voice state is kept as it came and a new
    server speaks with it as the first did."""
    from safetensors.torch import save_file

    from calm_fast.runtime.voices import encode_prompt
    from calm_fast.serve.models import load_synth
    from calm_fast.serve.server import ServerConfig, create_app
    from tiny_models import pocket_voice_state

    synth = load_synth(paths["lm"], vae=paths["vae"])
    lat = encode_prompt(synth.vae, sine_wav(tmp_path / "me.wav"))
    save_file(pocket_voice_state(synth.lm, lat), str(tmp_path / "kv.safetensors"))
    cfg = ServerConfig(max_seconds=0.5, eos_threshold=None, voices_dir=str(tmp_path / "v"))
    got = []
    for first in (True, False):
        with live_server(create_app(synth, cfg)) as port:
            if first:
                body, ctype = multipart({"name": "kv"}, {"file": (
                    "kv.safetensors", (tmp_path / "kv.safetensors").read_bytes())})
                st, _, data = request(port, "POST", "/v1/audio/voices", body,
                                      {"Content-Type": ctype})
                assert st == 200, data
            got.append(speech(port, voice="kv", seed=1, response_format="pcm"))
    assert (tmp_path / "v" / "kv.safetensors").read_bytes() == \
        (tmp_path / "kv.safetensors").read_bytes()
    assert got[0][0] == got[1][0] == 200 and got[0][2] == got[1][2]


def test_speed_changes_duration(srv):
    port, _ = srv
    _, _, one = speech(port, seed=1, response_format="pcm")
    _, _, fast = speech(port, seed=1, response_format="pcm", speed=2.0)
    assert abs(len(fast) / len(one) - 0.5) < 0.1


def test_health_metrics_and_page(srv):
    port, _ = srv
    speech(port, seed=1, response_format="wav")
    st, _, data = request(port, "GET", "/health")
    h = json.loads(data)
    assert st == 200 and h["status"] == "ok" and h["sample_rate"] == 1600
    assert "wav" in h["formats"]
    st, hd, text = request(port, "GET", "/metrics")
    text = text.decode()
    assert st == 200 and hd["content-type"].startswith("text/plain")
    for name in ("calm_fast_queue_depth", "calm_fast_running_streams",
                 "calm_fast_audio_seconds_total", "calm_fast_ttfb_seconds_bucket",
                 "calm_fast_ttfb_seconds_count"):
        assert name in text
    count = [ln for ln in text.splitlines() if ln.startswith("calm_fast_ttfb_seconds_count")]
    assert int(count[0].split()[-1]) >= 1
    secs = [ln for ln in text.splitlines() if ln.startswith("calm_fast_audio_seconds_total")]
    assert float(secs[0].split()[-1]) > 0
    st, hd, page = request(port, "GET", "/")
    assert st == 200 and b"<audio" in page and hd["content-type"].startswith("text/html")
    st, hd, data = request(port, "GET", "/v1/audio/speech?input=Hi.&seed=1")
    assert st == 200 and data[:4] == b"RIFF"
    st, hd, data = request(port, "GET", "/v1/audio/speech?input=Hi.&speed=0")
    assert st == 422 and json.loads(data)["error"]["param"] == "speed"


def test_limits_429_and_503(srv):
    port, app = srv
    cfg, svc = app.state.config, app.state.service
    wait_idle(svc)
    long = " ".join(f"Long sentence {i}." for i in range(25))
    old = cfg.max_streams, cfg.max_queue, cfg.queue_timeout
    hold = []

    def holder():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v1/audio/speech", json.dumps({"input": long,
                                                          "response_format": "pcm"}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read1(1024)
        hold.append(c)

    try:
        for _ in range(8):  # fill every engine stream
            holder()
        assert svc.running == 8
        cfg.max_queue, cfg.queue_timeout = 1, 0.3
        st, _, data = speech(port)  # waits for a stream that never frees in time
        assert st == 503, data
        assert json.loads(data)["error"]["type"] == "server_busy"
        cfg.max_queue = 0
        st, _, data = speech(port)
        assert st == 429 and json.loads(data)["error"]["type"] == "rate_limit_error"
    finally:
        cfg.max_streams, cfg.max_queue, cfg.queue_timeout = old
        for c in hold:
            c.sock.close()
            c.close()
    wait_idle(svc)
    assert speech(port)[0] == 200  # and the server serves again
