"""``calm-fast serve``: an OpenAI-compatible streaming TTS server over ONE engine.

    app = create_app(synth, ServerConfig(max_streams=16))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
  POST /v1/audio/speech   OpenAI fields (model, input, voice, response_format wav|pcm|mp3|
                          opus|aac|flac, speed, stream) + temperature, cfg_scale, seed.
                          stream=true (default): chunked, sent as made (WAV with an
                          open-ended header); false: one body with its length.
  GET  /v1/audio/speech   the same fields as query parameters (what the page's <audio> plays)
  POST /tts               pocket-tts form fields: text, voice_url (a voice name or id),
                          voice_wav (a prompt upload) -> chunked WAV
  GET  /v1/audio/voices   voices: built-in names and uploaded ids
  POST /v1/audio/voices   multipart "file" (+ "name"): a prompt -> {"id": ...}
  GET  /health, GET /metrics (Prometheus text), GET / (the page)

Every request is a job on the one ``Service`` (serve/service.py), so concurrent requests
are batched frame by frame. The status is decided before the first byte: the endpoint waits
for the job's first audio (or its error) and only then starts the response, so a request
that waits too long gets a 503 and a bad one a 400. A client that disconnects cancels its
job: its cache blocks are freed within one frame step. Limits: ``max_input_chars`` (413),
running + waiting jobs beyond ``max_streams + max_queue`` (429), no audio within
``queue_timeout`` s (503); every error is JSON: {"error": {"message", "type", "param"}}.
"""
import asyncio
import contextlib
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (FileResponse, JSONResponse, PlainTextResponse, Response,
                               StreamingResponse)
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from calm_fast.serve.audio_out import (FORMATS, MEDIA_TYPES, Resampler, Tempo, av_available,
                                       encoder, wav_header)
from calm_fast.serve.service import Job, JobError, Service

STATIC = Path(__file__).resolve().parent / "static"
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse", "default")
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerConfig:
    max_input_chars: int = 4096
    max_streams: int = 16  # jobs generating at once (one engine request each)
    max_queue: int = 64  # jobs waiting beyond those
    queue_timeout: float = 30.0  # s without first audio -> 503
    max_upload_mb: float = 20.0
    max_seconds: float = 30.0  # per sentence chunk
    chunk_chars: int = 300  # sentences are packed into chunks of at most this many chars
    cache_mb: float = 256.0
    decode_frames: int = 8
    sample_rate: int | None = None  # output rate (None: the model's)
    eos_threshold: float | None = -4.0
    default_voice: str | None = None
    voices_dir: str | None = None  # uploaded voices are kept here too (else memory only)
    precision: str = "fp32"  # weights of the LM and head: fp32, bf16 or int8 (CPU)
    overlap: bool = True  # decode on a thread of its own while the engine makes frames


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.ttfb = [0] * (len(TTFB_BUCKETS) + 1)
        self.ttfb_sum, self.ttfb_n = 0.0, 0
        self.cancelled = 0

    def count(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def first_byte(self, s: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(TTFB_BUCKETS) if s <= b), len(TTFB_BUCKETS))
            self.ttfb[i] += 1
            self.ttfb_sum += s
            self.ttfb_n += 1

    def text(self, svc: Service) -> str:
        lines = ["# HELP calm_fast_queue_depth Jobs waiting for a stream or cache blocks.",
                 "# TYPE calm_fast_queue_depth gauge", f"calm_fast_queue_depth {svc.queue_depth}",
                 "# HELP calm_fast_running_streams Jobs generating now.",
                 "# TYPE calm_fast_running_streams gauge",
                 f"calm_fast_running_streams {svc.running}",
                 "# HELP calm_fast_audio_seconds_total Seconds of audio made.",
                 "# TYPE calm_fast_audio_seconds_total counter",
                 f"calm_fast_audio_seconds_total {svc.audio_seconds:.3f}",
                 "# HELP calm_fast_engine_steps_total Frame steps of the engine.",
                 "# TYPE calm_fast_engine_steps_total counter",
                 f"calm_fast_engine_steps_total {svc.steps}",
                 "# HELP calm_fast_cancelled_total Jobs cancelled by a client disconnect.",
                 "# TYPE calm_fast_cancelled_total counter",
                 f"calm_fast_cancelled_total {self.cancelled}",
                 "# HELP calm_fast_cache_free_blocks Free KV-cache blocks.",
                 "# TYPE calm_fast_cache_free_blocks gauge",
                 f"calm_fast_cache_free_blocks {svc.engine.sched.free_blocks}",
                 "# HELP calm_fast_requests_total HTTP requests by route and status.",
                 "# TYPE calm_fast_requests_total counter"]
        with self.lock:
            for (route, code), n in sorted(self.requests.items()):
                lines.append(f'calm_fast_requests_total{{route="{route}",code="{code}"}} {n}')
            lines += ["# HELP calm_fast_ttfb_seconds Time from request to first audio byte.",
                      "# TYPE calm_fast_ttfb_seconds histogram"]
            acc = 0
            for b, n in zip(TTFB_BUCKETS, self.ttfb):
                acc += n
                lines.append(f'calm_fast_ttfb_seconds_bucket{{le="{b}"}} {acc}')
            lines.append(f'calm_fast_ttfb_seconds_bucket{{le="+Inf"}} {acc + self.ttfb[-1]}')
            lines.append(f"calm_fast_ttfb_seconds_sum {self.ttfb_sum:.6f}")
            lines.append(f"calm_fast_ttfb_seconds_count {self.ttfb_n}")
        return "\n".join(lines) + "\n"


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("calm-fast", description="accepted and ignored: one model per server")
    input: str = Field(..., min_length=1, description="the text to speak")
    voice: str | None = Field(None, description="a voice name or uploaded id")
    response_format: str = Field("mp3", description="wav | pcm | mp3 | opus | aac | flac")
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream: bool = True
    stream_format: str = Field("audio", description="only 'audio' (raw chunks)")
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    cfg_scale: float = Field(1.0, ge=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**31)
    instructions: str | None = None


def create_app(synth, config: ServerConfig | None = None, service: Service | None = None):

    from calm_fast.runtime.voices import (KVVoice, builtin_voices, encode_prompt,
                                          is_safetensors, load_voice)

    cfg = config or ServerConfig()
    svc = service or Service(synth, max_streams=cfg.max_streams, cache_mb=cfg.cache_mb,
                             decode_frames=cfg.decode_frames, precision=cfg.precision,
                             overlap=cfg.overlap)
    metrics = Metrics()
    out_rate = cfg.sample_rate or synth.sample_rate
    uploaded: dict[str, object] = {}  # voice id -> latents
    if cfg.voices_dir:
        Path(cfg.voices_dir).mkdir(parents=True, exist_ok=True)
        for p in Path(cfg.voices_dir).glob("*.safetensors"):
            try:
                uploaded[p.stem] = load_voice(p, synth.lm.cfg.prompt_dim, synth.lm)
            except ValueError:
                pass

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="calm_fast", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible streaming TTS on one continuous-batching engine")
    app.state.service, app.state.metrics, app.state.config = svc, metrics, cfg

    def err(status, message, param=None, kind="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                       "code": status}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        metrics.count(request.url.path, e.status)
        return err(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "form")]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else str(
            first.get("msg", "invalid request"))
        metrics.count(request.url.path, 422)
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error",
                                       "param": param, "code": 422},
                             "detail": [{k: v for k, v in x.items() if k != "ctx"}
                                        for x in e.errors()]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return err(e.status_code, str(e.detail), kind="http_error")

    # -- voices --------------------------------------------------------------------------------
    default_voice = cfg.default_voice or getattr(synth, "default_voice", None)

    def voice_latents(name, param="voice"):
        if name is None or name == "":
            name = default_voice
            if name is None:
                return None
        if name in uploaded:
            return uploaded[name]
        builtin = builtin_voices()
        if name in builtin:
            return load_voice(builtin[name], synth.lm.cfg.prompt_dim)
        if name in OPENAI_VOICES:  # OpenAI clients always send one: the default voice
            return None if default_voice in (None, name) else voice_latents(None)
        known = sorted(set(builtin) | set(uploaded))
        raise ApiError(400, f"unknown voice {name!r}; known: {known or 'none'} (upload one with "
                       "POST /v1/audio/voices)", param)

    async def read_upload(f: UploadFile, param: str) -> bytes:
        data = await f.read(int(cfg.max_upload_mb * 2**20) + 1)
        if len(data) > cfg.max_upload_mb * 2**20:
            raise ApiError(413, f"{param}: the upload is larger than {cfg.max_upload_mb} MB",
                           param)
        if not data:
            raise ApiError(400, f"{param}: the upload is empty", param)
        return data

    def encode_bytes(data: bytes, suffix: str):
        """A voice from uploaded bytes: audio (encoded by the VAE), or a voice file (ours, or
        one exported by the pocket-tts package, which fits only the model it came from)."""
        if not synth.can_clone:
            raise ApiError(400, "this model takes no voice prompt", "voice")
        is_file = is_safetensors(data)
        suffix = ".safetensors" if is_file else suffix or ".wav"
        with tempfile.NamedTemporaryFile(suffix=suffix) as t:
            t.write(data)
            t.flush()
            try:
                if is_file:
                    return load_voice(t.name, synth.lm.cfg.prompt_dim, synth.lm)
                return encode_prompt(synth.encoder, t.name)
            except (ValueError, OSError) as e:
                what = "voice file" if is_file else "voice audio"
                raise ApiError(400, f"the {what} cannot be used: "
                               f"{str(e).replace(t.name, 'the upload')}", "file") from None

    # -- speech --------------------------------------------------------------------------------
    async def speak(request: Request, route: str, text: str, voice, fmt: str, speed: float,
                    stream: bool, temperature=None, cfg_scale: float = 1.0, seed=None):
        t0 = time.monotonic()
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not one of {list(FORMATS)}",
                           "response_format")
        why = av_available(fmt)
        if why:
            raise ApiError(400, f"response_format {fmt!r} cannot be encoded here: {why}",
                           "response_format")
        if len(text) > cfg.max_input_chars:
            raise ApiError(413, f"input is {len(text)} characters, more than the limit of "
                           f"{cfg.max_input_chars}", "input")
        if not text.strip():
            raise ApiError(400, "input is empty", "input")
        if svc.running + svc.queue_depth >= cfg.max_streams + cfg.max_queue:
            raise ApiError(429, f"too many requests: {svc.running} running and "
                           f"{svc.queue_depth} waiting; retry later", None, "rate_limit_error")
        lat = voice_latents(voice) if not hasattr(voice, "shape") else voice
        try:
            job = Job.speech(synth, text, voice=lat, seed=seed, cfg_scale=cfg_scale,
                             max_chars=cfg.chunk_chars,
                             temperature=synth.temperature if temperature is None
                             else temperature, max_seconds=cfg.max_seconds,
                             eos_threshold=cfg.eos_threshold)
        except JobError as e:
            raise ApiError(400, str(e), "input") from None
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            svc.submit(job, out=lambda k, x: loop.call_soon_threadsafe(q.put_nowait, (k, x)))
        except RuntimeError as e:  # the engine thread died: say so, do not hang
            raise ApiError(503, str(e), None, "server_error") from None
        try:
            first = await asyncio.wait_for(q.get(), cfg.queue_timeout)
        except asyncio.TimeoutError:
            svc.cancel(job)
            raise ApiError(503, f"no audio within {cfg.queue_timeout:g} s: the server is "
                           "busy; retry later", None, "server_busy") from None
        except BaseException:
            svc.cancel(job)
            raise
        if first[0] == "error":
            raise ApiError(400, f"cannot generate: {first[1]}", "input")
        tempo = Tempo(speed, out_rate) if speed != 1.0 else None
        rs = Resampler(synth.sample_rate, out_rate)
        enc = encoder("pcm" if fmt == "wav" and not stream else fmt, out_rate)

        def shape(x):
            x = rs.process(x)
            return tempo.process(x) if tempo is not None else x

        def tail():
            x = rs.flush()
            if tempo is not None:
                x = np.concatenate([tempo.process(x), tempo.flush()])
            return x

        async def chunks():
            done = False
            sent_first = False
            try:
                item = first
                while True:
                    kind, x = item
                    if kind == "error":  # mid-stream: the status is sent, so end the body
                        break
                    if kind == "done":
                        done = True
                        b = enc.write(tail()) + enc.close()
                        if b:
                            yield b
                        break
                    b = enc.write(shape(x))
                    if b:
                        if not sent_first:
                            metrics.first_byte(time.monotonic() - t0)
                            sent_first = True
                        yield b
                    item = await q.get()
            finally:
                if not done:
                    svc.cancel(job)
                    metrics.cancelled += 1

        metrics.count(route, 200)
        headers = {"X-Sample-Rate": str(out_rate), "Cache-Control": "no-store"}
        if stream:
            return StreamingResponse(chunks(), media_type=MEDIA_TYPES[fmt], headers=headers)
        body = b"".join([b async for b in chunks()])
        if fmt == "wav":
            body = wav_header(out_rate, len(body) // 2) + body
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    @app.post("/v1/audio/speech")
    async def speech(r: SpeechRequest, request: Request):
        if r.stream_format != "audio":
            raise ApiError(400, f"stream_format {r.stream_format!r} is not supported; use "
                           "'audio'", "stream_format")
        return await speak(request, "/v1/audio/speech", r.input, r.voice, r.response_format,
                           r.speed, r.stream, r.temperature, r.cfg_scale, r.seed)

    @app.get("/v1/audio/speech")
    async def speech_get(request: Request, input: str, voice: str | None = None,
                         response_format: str = "wav", speed: float = 1.0,
                         temperature: float | None = None, cfg_scale: float = 1.0,
                         seed: int | None = None):
        try:
            r = SpeechRequest(input=input, voice=voice, response_format=response_format,
                              speed=speed, temperature=temperature, cfg_scale=cfg_scale,
                              seed=seed)
        except Exception as e:  # pydantic's ValidationError -> the same 422 as the POST
            raise RequestValidationError(e.errors()) from None
        return await speak(request, "/v1/audio/speech", r.input, r.voice, r.response_format,
                           r.speed, True, r.temperature, r.cfg_scale, r.seed)

    @app.post("/tts")
    async def tts_form(request: Request, text: str = Form(...),
                       voice_url: str | None = Form(None),
                       voice_wav: UploadFile | None = File(None)):
        voice = voice_url
        if voice_wav is not None and voice_wav.filename:
            data = await read_upload(voice_wav, "voice_wav")
            voice = await run_in_threadpool(encode_bytes, data,
                                            Path(voice_wav.filename).suffix)
        elif voice_url and voice_url.startswith(("http://", "https://", "hf://")):
            raise ApiError(400, "voice_url: remote voices are not fetched; upload the audio as "
                           "voice_wav or POST /v1/audio/voices", "voice_url")
        return await speak(request, "/tts", text, voice, "wav", 1.0, True)

    @app.get("/v1/audio/voices")
    async def list_voices():
        out = [{"id": n, "name": n, "builtin": True} for n in builtin_voices()]
        out += [{"id": n, "name": n, "builtin": False} for n in uploaded]
        return {"voices": out, "default": default_voice, "can_clone": synth.can_clone}

    @app.post("/v1/audio/voices")
    async def add_voice(file: UploadFile = File(...), name: str | None = Form(None)):
        data = await read_upload(file, "file")
        if name is not None and (not name or len(name) > 64 or not all(
                c.isalnum() or c in "-_" for c in name)):
            raise ApiError(400, "name: use 1 to 64 letters, digits, '-' or '_'", "name")
        voice = await run_in_threadpool(encode_bytes, data, Path(file.filename or "").suffix)
        vid = name or "voice-" + uuid.uuid4().hex[:10]
        uploaded[vid] = voice
        if cfg.voices_dir:
            from calm_fast.runtime.voices import save_voice

            dst = os.path.join(cfg.voices_dir, vid + ".safetensors")
            if is_safetensors(data):  # a voice file is kept as it came (it loaded above)
                Path(dst).write_bytes(data)
            else:
                save_voice(dst, voice, synth.encoder)
        metrics.count("/v1/audio/voices", 200)
        # a K/V voice's rows are its whole [bos, voice] prefix: one more than its frames
        frames = voice.rows - 1 if isinstance(voice, KVVoice) else int(voice.shape[0])
        return {"id": vid, "frames": frames, "seconds": round(frames / synth.frame_rate, 3),
                "kind": "kv" if isinstance(voice, KVVoice) else "latents"}

    @app.get("/health")
    async def health():
        ok = svc.error is None
        body = {"status": "ok" if ok else "error", "model": synth.name,
                "sample_rate": out_rate, "running": svc.running,
                "queue_depth": svc.queue_depth, "max_streams": cfg.max_streams,
                "formats": [f for f in FORMATS if av_available(f) is None]}
        if not ok:
            body["error"] = str(svc.error)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.text(svc), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def serve(synth, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    import uvicorn

    app = create_app(synth, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

