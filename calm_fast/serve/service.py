"""One engine for every client: jobs in, audio chunks out, batched frame by frame.

    svc = Service(synth, max_streams=16).start()        # one background thread
    job = svc.submit(Job.speech(synth, "Hello. How are you?", voice=lat, seed=1))
    for kind, x in job.chunks():                        # ("audio", float32 [n]) ..., ("done", None)
        ...
    svc.cancel(job)                                      # a client that left: blocks freed now

The thread owns the ``Engine`` (continuous batching over one KV cache) and steps it while
any job runs; every running job is one engine request at a time, so requests of all clients
share each frame step. A job is a plan of segments (``runtime.text_chunks``): sentence
chunks are generated one after the other, each continuing the previous one (its text is
the previous chunk's text + its own, its prompt the previous chunk's frames), and one VAE
decoder state per job runs through all of them, so chunk boundaries have no gap, no click
and no prosody restart. Pauses are silence. The frames of a step are decoded as one VAE
batch (``DecodeSlots``), in chunks of 1, 2, 4 ... ``decode_frames`` frames per job.
With ``overlap`` (the default) the decoding runs on its own thread and core
(``runtime.decode_worker``) while the engine makes the next frames: every decoder call and
every output of a job go through that one FIFO thread, so a job's chunks, pauses and its
end still arrive in order.

Request i of a job (its i-th chunk) uses seed ``seed + i``; the engine gives every request
the frames it would make alone, so what a client receives does not depend on the others.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import math
import queue
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from calm_fast.errors import ArgumentError, CacheFullError
from calm_fast.fast import ops
from calm_fast.runtime.decode_slots import DecodeSlots
from calm_fast.runtime.decode_worker import DecodeWorker, lm_threads
from calm_fast.runtime.engine import Engine
from calm_fast.runtime.scheduler import Request
from calm_fast.runtime.text_chunks import Say, plan
from calm_fast.runtime.voices import KVVoice, text_inputs

CONTEXT_SECONDS = 20.0  # at most this much of the previous chunk is its successor's prompt


class JobError(ValueError):
    """A job that cannot run (bad text, voice, length): the message says what to fix."""


@dataclass
class Segment:
    text: str | None = None  # the chunk's text (speech)
    tags: tuple | None = None  # music tags
    pause: float = 0.0  # seconds of silence (a pause segment)


@dataclass
class Job:
    segments: list
    voice: "torch.Tensor | KVVoice | None" = None  # raw VAE latents [T, C], or K/V
    prompt: torch.Tensor | None = None  # normalised latents [L, C] to continue (audio prompt)
    temperature: float = 0.7
    cfg_scale: float = 1.0
    seed: int | None = None
    max_seconds: float = 30.0  # per chunk
    eos_threshold: float | None = -4.0
    frames_after_eos: int = 2
    continue_chunks: bool = True
    warm_decoder: bool = True  # run the prompt's frames through the decoder first
    # filled in by the service
    id: int = -1
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    _out: object = None  # callable(kind, payload)
    _q: object = None

    @classmethod
    def speech(cls, synth, text: str, voice=None, max_chars: int = 300, **kw) -> "Job":
        if not synth.can_speak:
            raise JobError(f"model {synth.name!r} has no text input (or no tokenizer): it "
                           "cannot read text")
        try:
            items = plan(text, max_chars=max_chars)
        except ValueError as e:
            raise JobError(str(e)) from e
        if not any(isinstance(x, Say) for x in items):
            raise JobError("the text has nothing to say")
        segs = [Segment(text=x.text) if isinstance(x, Say) else Segment(pause=x.seconds)
                for x in items]
        return cls(segs, voice=voice, **kw)

    def chunks(self, timeout: float | None = None):
        """Iterate (kind, payload) until done or error (for a consumer in another thread)."""
        while True:
            kind, x = self._q.get(timeout=timeout)
            yield kind, x
            if kind in ("done", "error"):
                return


class _Run:
    """A job the thread is running: its decoder slot, its current request, its frames."""

    def __init__(self, job: Job, slot: int):
        self.job, self.slot = job, slot
        self.seg = -1  # index of the segment running
        self.chunk = 0  # speech chunks submitted so far
        self.rid = None
        self.frames: list = []  # normalised frames of the running chunk
        self.undecoded: list = []
        self.decoded_chunks = 0
        self.prev_text: str | None = None
        self.prev_frames: torch.Tensor | None = None
        self.chunk_done = False
        self.cancelled = False


class Service:
    def __init__(self, synth, *, max_streams: int = 16, cache_mb: float = 256.0,
                 decode_frames: int = 8, precision: str = "fp32", block_size: int = 16,
                 max_templates: int = 8, overlap: bool = True):
        self.synth = synth
        lm = synth.lm
        c = lm.cfg.backbone
        block_bytes = 2 * c.num_layers * c.kv_heads * c.head_dim * 4 * block_size
        self.num_blocks = max(64, int(cache_mb * 2**20 // block_bytes))
        self.engine = Engine(lm, num_blocks=self.num_blocks, max_streams=max_streams,
                             head_steps=synth.head_steps, precision=precision,
                             block_size=block_size)
        self.decoder = DecodeSlots(synth.vae, max_streams, max_frames_per_call=decode_frames)
        self._threads = torch.get_num_threads()  # the engine thread's, for a large model
        self._worker = DecodeWorker(self.decoder) if overlap else None
        self._decodes: deque = deque()  # futures of the decodes in flight (overlap)
        self.max_streams, self.decode_frames = max_streams, decode_frames
        # voice prompt -> its prefilled [bos, voice] rows (Engine.share): every request in a
        # voice forks them instead of prefilling the prompt again (LRU, a few blocks each)
        self.templates: OrderedDict = OrderedDict()
        self.max_templates = max_templates
        self.pending: deque[Job] = deque()
        self.runs: dict[int, _Run] = {}  # job id -> run
        self.by_rid: dict[int, _Run] = {}
        self.free_slots = list(range(max_streams))[::-1]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._cancels: list[int] = []
        self._thread = None
        self._stop = False
        self.error: BaseException | None = None
        self.audio_seconds = 0.0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.steps = 0

    # -- public ------------------------------------------------------------------------------
    def start(self) -> "Service":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="calm-fast-engine",
                                            daemon=True)
            self._thread.start()
            # A daemon thread still alive when the interpreter finalises is killed by
            # CPython <= 3.13 with pthread_exit; if that happens while torch frees a tensor
            # (a C++ noexcept destructor that takes the GIL), the forced unwind aborts the
            # process ("terminate called without an active exception": seen with the
            # pocket-tts package's decoder thread). atexit runs before that: stop and join.
            ref = weakref.ref(self)
            atexit.register(lambda: (svc := ref()) is not None and svc.close())
        return self

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._worker is not None:  # what it holds is delivered first
            self._worker.shutdown()

    def submit(self, job: Job, out=None) -> Job:
        """Queue a job. ``out(kind, payload)`` is called from the engine thread for each
        chunk; without it the chunks go to ``job.chunks()``."""
        if self.error is not None:
            raise RuntimeError(f"the engine thread failed: {self.error}")
        job.id = next(self._ids)
        if out is None:
            job._q = queue.Queue()
            out = lambda kind, x: job._q.put((kind, x))  # noqa: E731
        job._out = out
        if job.seed is None:
            job.seed = random.randrange(2**31)
        with self._lock:
            self.pending.append(job)
            self._wake.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (waiting or running); its cache blocks are freed by the next loop turn
        (at most one frame step away)."""
        with self._lock:
            self._cancels.append(job.id)
            self._wake.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.pending) + self.engine.queue_depth

    @property
    def running(self) -> int:
        return len(self.runs)

    def waiting_since(self) -> list[float]:
        return [j.created for j in list(self.pending)]

    # -- the thread --------------------------------------------------------------------------
    def _loop(self):
        torch.set_grad_enabled(False)
        threads = ops.engine_threads(self.synth.lm, self.engine.sched.device)
        # A new thread takes its torch thread count, at its first parallel call, from the
        # last value set in any thread (the decode worker sets 1 for itself): so this one
        # is initialised first and set explicitly, to the caller's count for a large model.
        torch.get_num_threads()
        torch.set_num_threads(threads if threads is not None else self._threads)
        try:
            while True:
                with self._lock:
                    while (not self._stop and not self.pending and not self.runs
                           and not self._cancels):
                        self._wake.wait(0.5)
                    if self._stop:
                        break
                    cancels, self._cancels = self._cancels, []
                if self._worker is not None:
                    self._worker.check()  # a decode (or a client's callback) that failed
                for jid in cancels:
                    self._drop(jid)
                self._start_pending()
                if self.runs:
                    self._step()
        except BaseException as e:  # noqa: BLE001 -- every client hears of it
            self.error = e
            for run in list(self.runs.values()):
                run.job._out("error", f"engine failure: {e}")
            raise

    def _drop(self, jid: int) -> None:
        with self._lock:
            for j in list(self.pending):
                if j.id == jid:
                    self.pending.remove(j)
                    return
        run = self.runs.get(jid)
        if run is not None:
            self._end(run)

    def _end(self, run: _Run, kind: str | None = None, payload=None) -> None:
        if run.rid is not None:
            self.engine.cancel(run.rid)  # frees its blocks (no-op when it finished)
            self.by_rid.pop(run.rid, None)
            run.rid = None
        self._dec(self.decoder.close, run.slot)
        self.free_slots.append(run.slot)  # a reopen is queued after this close
        self.runs.pop(run.job.id, None)
        if kind is not None:
            self._dec(run.job._out, kind, payload)

    def _start_pending(self) -> None:
        while self.free_slots:
            with self._lock:
                if not self.pending:
                    return
                job = self.pending.popleft()
            run = _Run(job, self.free_slots.pop())
            self._dec(self.decoder.open, run.slot)
            self.runs[job.id] = run
            if job.prompt is not None and job.warm_decoder:  # the prompt's audio came first
                lat = self.synth.lm.denormalize(job.prompt.float())
                for i in range(0, lat.shape[0], self.decode_frames):
                    self._dec(self.decoder.decode, [run.slot],
                              lat[None, i:i + self.decode_frames])
            self._advance(run)

    def _advance(self, run: _Run) -> None:
        """Start the job's next segment (pauses are emitted at once); finish at the end."""
        job = run.job
        while True:
            run.seg += 1
            if run.seg >= len(job.segments):
                self.jobs_done += 1
                self._end(run, "done", None)
                return
            seg = job.segments[run.seg]
            if seg.pause > 0:
                n = int(round(seg.pause * self.synth.sample_rate))
                self._dec(self._emit, run.job, np.zeros(n, np.float32))
                continue
            try:
                req = self._request(run, seg)
                rid = self.engine.submit(req, shared=self._template(job.voice, req))
            except (ValueError, RuntimeError) as e:
                self.jobs_failed += 1
                self._end(run, "error", str(e))
                return
            run.rid, run.frames, run.chunk_done = rid, [], False
            run.chunk += 1
            self.by_rid[rid] = run
            return

    def _template(self, voice, req: Request):
        """The shared template of ``voice`` (made on first use), or None: no voice, or the
        cache cannot hold one now (the request then prefills its whole prefix)."""
        kv = isinstance(voice, KVVoice)  # K/V only: always a template (nothing to prefill)
        if voice is None or (self.max_templates <= 0 and not kv):
            return None
        key = ("kv:" + voice.key if kv else
               hashlib.sha1(voice.detach().float().cpu().numpy().tobytes()).hexdigest())
        shared = self.templates.get(key)
        if shared is None:
            if kv:  # CacheFullError (no room now) ends this job with that message
                shared = self.engine.share_kv(voice.k, voice.v)
            else:
                rows = self.synth.lm.prefix(voice=voice).detach()
                if not torch.equal(req.prefix[:rows.shape[0]], rows):
                    return None  # (a prefix that does not start with the voice rows)
                try:
                    shared = self.engine.share(rows)
                except CacheFullError:
                    return None
            self.templates[key] = shared
            self._evict()
        self.templates.move_to_end(key)
        return shared

    def _evict(self) -> None:
        """Drop the oldest templates beyond ``max_templates``; a K/V template that waiting
        requests still name stays (they cannot prefill it) until a later eviction."""
        for old in list(self.templates)[:max(0, len(self.templates) - self.max_templates)]:
            try:
                self.engine.unshare(self.templates[old])
            except ArgumentError:
                continue
            del self.templates[old]

    def _prefix(self, text, voice, tags):
        """([bos, voice, tags, text] rows, None), or for an aligned-text model ([bos, voice]
        rows, the text's frame rows); a KVVoice's [bos, voice] part is its placeholder rows
        (its template holds the K/V)."""
        return text_inputs(self.synth.lm, text=text, voice=voice, tags=tags)

    def _request(self, run: _Run, seg: Segment) -> Request:
        job, lm = run.job, self.synth.lm
        text = seg.text
        prompt = job.prompt if run.chunk == 0 else None
        # an aligned-text model speaks each chunk from its own durations: no text carried over
        if (job.continue_chunks and run.prev_frames is not None and text is not None
                and not lm.cfg.aligned_text):
            keep = int(CONTEXT_SECONDS * self.synth.frame_rate)
            text = f"{run.prev_text} {text}"
            prompt = run.prev_frames[-keep:]
        prefix, rows = self._prefix(text, job.voice, seg.tags)
        if prompt is not None and prefix.shape[0] + prompt.shape[0] + 2 > lm.cfg.max_context:
            (prefix, rows), prompt = self._prefix(seg.text, job.voice, seg.tags), None
        room = lm.cfg.max_context - prefix.shape[0] - (0 if prompt is None else prompt.shape[0])
        frames = min(max(1, math.ceil(job.max_seconds * self.synth.frame_rate)), room - 1)
        if frames < 1:
            raise JobError(f"the prompt fills the model's context of {lm.cfg.max_context} rows")
        if rows is not None:  # the durations fix the length
            return Request(prefix.detach(), len(rows), temperature=job.temperature,
                           cfg_scale=job.cfg_scale, seed=job.seed + run.chunk,
                           frame_cond=rows.detach(), eos_threshold=None)
        return Request(prefix.detach(), frames, temperature=job.temperature,
                       cfg_scale=job.cfg_scale, seed=job.seed + run.chunk,
                       prompt_latents=None if prompt is None else prompt.detach(),
                       eos_threshold=job.eos_threshold,
                       frames_after_eos=job.frames_after_eos)

    def _dec(self, fn, *args):
        """``fn(*args)`` on the decoder's thread, after everything queued before it (with
        overlap), else now: the calls on decoder state and a job's outputs."""
        if self._worker is None:
            return fn(*args)
        return self._worker.run(fn, *args)

    def _emit(self, job: Job, wav: np.ndarray) -> None:
        if job.started is None:
            job.started = time.monotonic()
        self.audio_seconds += len(wav) / self.synth.sample_rate
        job._out("audio", wav)

    def _step(self) -> None:
        # the decoder thread has a core of its own while it decodes and the LM the rest (a
        # job's audio must not depend on timing: see lm_threads)
        with lm_threads(self._worker, len(self.runs) <= Engine.OVERLAP_STREAMS,
                        self.engine.sched.thread_invariant):
            events = self.engine.step()
        self.steps += 1
        for ev in events:
            run = self.by_rid.get(ev.request)
            if run is None:
                continue
            if ev.latent is not None:
                lat = ev.latent.float().cpu()
                run.frames.append(lat)
                run.undecoded.append(lat)
            if ev.finished:
                run.chunk_done = True
        self._decode()
        for run in list(self.runs.values()):
            if run.chunk_done and run.rid is not None and not run.undecoded:
                self.by_rid.pop(run.rid, None)
                run.rid = None
                if run.frames:
                    seg = run.job.segments[run.seg]
                    run.prev_text = seg.text
                    run.prev_frames = torch.stack(run.frames)
                self._advance(run)

    def _decode(self) -> None:
        groups: dict[int, list[_Run]] = {}
        for run in self.runs.values():
            if not run.undecoded:
                continue
            want = min(2 ** run.decoded_chunks, self.decode_frames)
            if len(run.undecoded) >= want or run.chunk_done:
                n = min(len(run.undecoded), self.decode_frames)
                groups.setdefault(n, []).append(run)
        for n, runs in groups.items():
            lat = self.synth.lm.denormalize(torch.stack([torch.stack(r.undecoded[:n])
                                                         for r in runs]))
            first = any(r.decoded_chunks == 0 for r in runs)
            for r in runs:
                del r.undecoded[:n]
                r.decoded_chunks += 1
            args = ([r.slot for r in runs], [r.job for r in runs], lat)
            if self._worker is None:
                self._decode_and_emit(*args)
            elif first or (torch.get_num_threads() > 1
                           and len(self.runs) > Engine.OVERLAP_STREAMS):
                # here, after what the worker holds (as the engine does): a job's first
                # chunk (its time to first audio: no hand-over to a sleeping thread), or
                # many streams of an LM that uses every core (decoded on them all)
                self._worker.sync()
                self._decode_and_emit(*args)
            else:
                self._decodes.append(self._worker.run(self._decode_and_emit, *args))
                # a decoder that falls behind holds the engine
                while len(self._decodes) > 4 or (self._decodes and self._decodes[0].done()):
                    self._decodes.popleft().result()

    def _decode_and_emit(self, slots: list, jobs: list, lat: torch.Tensor) -> None:
        wav = self.decoder.decode(slots, lat)
        for job, w in zip(jobs, wav):
            self._emit(job, w[0].float().numpy().copy())
