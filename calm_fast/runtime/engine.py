"""Continuous batching: streams join and leave at any frame, over one kept KV cache.

    engine = Engine(model, num_blocks=4096, max_streams=64)
    voice = engine.share(model.prefix(voice=v))            # prefilled once, forked per request
    a = engine.submit(Request(model.prefix(text="Hi.", voice=v), 200, seed=1), shared=voice)
    for ev in engine.run():                                 # or engine.step() in your loop
        ...ev.request, ev.latent (one frame), ev.finished

Each request keeps its own temperature, CFG scale, seed, stop rule and prompt; its frames
equal single-request generation with the same seed whatever else is in the batch (each
request draws its noise from its own generator).

Sharing: a prefix registered with ``share()`` is prefilled once into a template stream; a
request whose prefix starts with those rows forks it (its full blocks are shared by
refcount, the partial last one is copied on the first write) and prefills only the rest.
The default null prefix of latent CFG is shared the same way, automatically.

Admission control: a request is admitted only when the cache can hold everything it may
ever write (prefix + prompt + max_frames rows, for each of its streams, less the blocks it
shares), counting what the admitted requests may still write. Others wait in FIFO order:
nothing fails mid-generation, and ``queue_depth`` says how many wait.

Audio (with ``vae=``): the frames made in a step are decoded as one VAE batch. With
``decode_frames=N`` a stream's frames are decoded in chunks of 1, 2, 4, ... up to N frames
(and whatever is left when it finishes): the first audio comes after one frame, and later
chunks amortise the decoder's per-call cost over several frames. A step's streams are
decoded in calls of at most ``DECODE_ROWS`` stream-frames (whole chunks: 64 streams with
8-frame chunks decode as 8 calls of 8 x 8). Chunks do not shrink when many streams run:
that measured faster at 16 and 64 streams (per-call costs and the A/B:
benchmarks/results/design_notes.md).

The audio is the same whatever the chunks: only where it is cut changes.

Overlap (``overlap=True``, with a vae): the decoder runs on its own thread
(``runtime.decode_worker``) with one intra-op thread while the engine thread's LM, on the
others, makes the next frames; a step's events come out once their audio is decoded (a
later ``step()``, in order), except a stream's first chunk, which is waited for (the time
to first audio stays one frame plus one decode, on every thread). With more than
``OVERLAP_STREAMS`` streams the decoding goes back to the engine thread. While the decoder
is idle the LM takes its core back, where its step gives the same bits on any thread count
(``Scheduler.thread_invariant``: our C++ step); elsewhere it keeps to the other cores
whatever the timing. So the frames equal the engine's without overlap (bit for bit where
invariant, to fp32 rounding elsewhere) and are the same from run to run: a step's thread
count changes its bits only where it follows the requests, never the timing.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from calm_fast import checks
from calm_fast.codec.vae import VAE
from calm_fast.codec.istft import ISTFTVAE
from calm_fast.errors import ArgumentError, CacheFullError
from calm_fast.runtime.decode_slots import DecodeSlots
from calm_fast.runtime.decode_worker import DecodeWorker, lm_threads
from calm_fast.fast import backbone as fb
from calm_fast.runtime.scheduler import Request, Scheduler, Stream
from calm_fast.model.calm import CALM


@dataclass
class Shared:
    """A prefilled prefix template: cache stream ``stream`` holding ``rows`` rows, valid only
    in the engine that made it and until ``unshare``."""

    stream: int
    rows: torch.Tensor  # [P, d] the prefix rows (requests must start with them)
    engine: object = field(default=None, repr=False, compare=False)
    alive: bool = True
    # made from K/V (share_kv), not from rows: ``rows`` are placeholders that requests
    # repeat, so a request can never prefill them itself
    kv_only: bool = False


@dataclass
class Event:
    request: int  # the id submit() returned
    latent: torch.Tensor | None  # [C] this step's frame (normalised), None when no frame
    finished: bool
    # with a vae: [channels, k * frame_size], the stream's frames decoded this step (k = 1
    # per step by default; see decode_frames), or None when none were
    audio: torch.Tensor | None = None
    # the error that ended the request (its fault alone: the others' frames are unchanged)
    error: Exception | None = None


@dataclass
class _Pending:
    rid: int
    req: Request
    shared: Shared | None
    need: int  # blocks it may ever allocate


class Engine:
    """A continuous-batching generator over one kept cache (see the module docstring).

    num_blocks: the KV-cache budget in blocks of ``block_size`` rows (a memory budget:
    bytes = num_blocks x ``cache.stats()["bytes_per_block"]``). max_streams: at most this
    many requests generate at once. Other options as ``CALMGenerator``."""

    DECODE_ROWS = 64  # stream-frames per decode call (calls split by stream)
    # overlap: with more running streams than this, decode on the engine thread (on every
    # core) after each step instead: at batch 16 the aggregate measured 11% lower with the
    # decoder on its own core (benchmarks/results/overlap.csv)
    OVERLAP_STREAMS = 4

    def __init__(self, model: CALM, *, num_blocks: int, max_streams: int = 64,
                 block_size: int = 16, head_steps: int = 1, int8: bool = False,
                 device="cpu", dtype=torch.float32, graphs: bool | None = None,
                 vae=None, decode_frames: int = 1, precision: str = "fp32",
                 overlap: bool = False):
        checks.integer("decode_frames", decode_frames, 1, 1024)
        checks.instance("overlap", overlap, bool, "True or False")
        checks.integer("max_streams", max_streams, 1, 1 << 16)
        checks.integer("num_blocks", num_blocks, 2)
        if vae is not None:
            checks.instance("vae", vae, (VAE, ISTFTVAE), "a calm_fast VAE (SEANet or iSTFT)")
        # cache streams: a cond and a null stream per request, templates, the scratch row
        self.sched = Scheduler(model, head_steps=head_steps, block_size=block_size,
                               num_blocks=num_blocks, int8=int8, device=device, dtype=dtype,
                               graphs=graphs, max_streams=2 * max_streams + 16,
                               precision=precision)
        self.sched.setup(0, 2 * max_streams, 0)  # (checks the CUDA-graph buckets)
        self.model, self.cache = model, self.sched.cache
        self.block_size = block_size
        self.waiting: deque[_Pending] = deque()
        self.active: list[Stream] = []
        self.free_rings = list(range(max_streams))
        self._next_id = 0
        self._null: Shared | None = None
        self._templates = 0  # blocks held by templates
        self.decoder = None
        if vae is not None:  # every frame made in a step is decoded in one VAE batch
            if vae.cfg.latent_dim != model.cfg.latent_dim:
                raise ArgumentError(f"the VAE takes {vae.cfg.latent_dim}-dim latents, the model "
                                 f"makes {model.cfg.latent_dim}")
            self.decoder = DecodeSlots(vae, max_streams, max_frames_per_call=decode_frames)
        # with overlap every call on the decoder's state goes through the worker, in order;
        # the calling thread's torch thread count is initialised before the worker sets
        # its own (a thread not yet initialised would take the worker's 1 later)
        torch.get_num_threads()
        self._worker = DecodeWorker(self.decoder) if overlap and vae is not None else None
        self._held: deque = deque()  # [events, future of their audio or None], in order
        self.decode_frames = decode_frames
        self._undecoded: dict[int, list] = {}  # request id -> its frames not decoded yet
        self._chunks: dict[int, int] = {}  # request id -> audio chunks delivered

    # -- prefixes ---------------------------------------------------------------------------
    def share(self, rows: torch.Tensor) -> Shared:
        """Prefill ``rows`` [P, d] once as a template for ``submit(..., shared=)``. Raises
        CacheFullError (nothing changed) when the cache cannot hold it now."""
        d = self.model.cfg.backbone.d_model
        checks.instance("rows", rows, torch.Tensor, "a torch.Tensor")
        if rows.dim() != 2 or rows.shape[1] != d or rows.shape[0] == 0 \
                or not rows.is_floating_point():
            raise ArgumentError(f"a shared prefix must be float [P >= 1, {d}], got "
                                f"{rows.dtype} {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise ArgumentError("a shared prefix holds NaN or Inf")
        sid = self._template_stream(rows.shape[0])
        fb.prefill(self.sched.backbone, self.cache, sid,
                   rows.detach().to(self.sched.device, self.sched.dtype), outputs=False)
        self._templates += self._template_blocks(rows.shape[0])
        return Shared(sid, rows.detach().clone(), engine=self)

    def _template_blocks(self, rows: int) -> int:
        return -(-rows // self.block_size)

    def _template_stream(self, rows: int) -> int:
        """A new cache stream for a template of ``rows`` rows, or CacheFullError (nothing
        changed) when blocks not promised to admitted requests cannot hold it."""
        need = self._template_blocks(rows)
        if need > self.sched.available:
            raise CacheFullError(f"a shared prefix of {rows} rows needs {need} blocks; "
                                 f"{self.sched.available} are not promised to admitted "
                                 "requests")
        return self.cache.new_stream()

    def share_kv(self, k: torch.Tensor, v: torch.Tensor) -> Shared:
        """A template from K/V computed elsewhere (a Pocket TTS exported voice: the
        package's attention cache after its voice prompt): k, v [layers, P, kv_heads,
        head_dim], keys already rotated for positions 0..P-1, as this cache keeps them.
        Requests pass ``shared=`` and start their prefix with the returned ``rows`` (P
        placeholder rows). CacheFullError (nothing changed) when it does not fit now."""
        c = self.model.cfg.backbone
        want = (c.num_layers, c.kv_heads, c.head_dim)
        for name, t in (("k", k), ("v", v)):
            checks.instance(name, t, torch.Tensor, "a torch.Tensor")
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != want or t.shape[1] == 0 \
                    or not t.is_floating_point():
                raise ArgumentError(f"{name} must be float [{want[0]} layers, P >= 1, "
                                    f"{want[1]} kv heads, {want[2]}], got {t.dtype} "
                                    f"{tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ArgumentError(f"shared {name} holds NaN or Inf")
        if k.shape != v.shape:
            raise ArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        P = k.shape[1]
        if P >= self.model.cfg.max_context:
            raise ArgumentError(f"{P} shared rows do not fit the context of "
                                f"{self.model.cfg.max_context}")
        sid = self._template_stream(P)
        slots = self.cache.reserve([sid], P)[0]
        for li in range(c.num_layers):
            self.cache.write(li, slots, k[li].to(self.cache.k.device),
                             v[li].to(self.cache.v.device))
        self._templates += self._template_blocks(P)
        rows = torch.zeros(P, c.d_model, dtype=self.sched.dtype)
        return Shared(sid, rows, engine=self, kv_only=True)

    def _own(self, s, what: str) -> None:
        checks.instance(what, s, Shared, "a Shared template from Engine.share")
        if s.engine is not self:
            raise ArgumentError(f"{what} was made by another Engine: share the prefix with "
                                "this engine (its cache holds its own templates)")
        if not s.alive:
            raise ArgumentError(f"{what} was unshared: share the prefix again")

    def unshare(self, s: Shared) -> None:
        """Drop a template: requests already forked from it keep their blocks; waiting
        requests that named it prefill their whole prefix instead."""
        self._own(s, "the template")
        if s.kv_only and any(p.shared is s for p in self.waiting):
            raise ArgumentError("requests still wait on this K/V template, and they cannot "
                                "prefill it themselves: cancel them or let them run first")
        s.alive = False
        for p in self.waiting:
            if p.shared is s:
                p.shared = None
                p.need = self.sched.blocks_for(p.req, 0, null_shared=True)
        self.cache.free(s.stream)
        self._templates -= self._template_blocks(s.rows.shape[0])

    def _null_template(self) -> Shared:
        if self._null is None:
            self._null = self.share(self.model.null_prefix().detach())
        return self._null

    # -- requests ---------------------------------------------------------------------------
    def submit(self, r: Request, shared: Shared | None = None) -> int:
        """Queue a request; returns its id. Invalid requests raise here (nothing queued)."""
        rid = self._next_id
        self.sched.check(rid, r)
        if shared is not None:
            self._own(shared, "shared")
            P = shared.rows.shape[0]
            if r.prefix.shape[0] < P or not torch.equal(r.prefix[:P].to(shared.rows.dtype),
                                                          shared.rows):
                raise ArgumentError("the request's prefix does not start with the shared rows")
        # the default null prefix of CFG is always shared (one template per engine)
        need = self.sched.blocks_for(r, 0 if shared is None else shared.rows.shape[0],
                                     null_shared=True)
        capacity = self.cache.manager.num_blocks - 1 - self._templates
        if need > capacity:
            raise ArgumentError(f"request needs {need} cache blocks, more than the "
                             f"{capacity} the engine has: raise num_blocks or lower max_frames")
        self._next_id += 1
        self.waiting.append(_Pending(rid, r, shared, need))
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a waiting or running request (its blocks are freed now)."""
        for p in self.waiting:
            if p.rid == rid:
                self.waiting.remove(p)
                return True
        for s in self.active:
            if s.idx == rid:
                self._finish(s)
                self.active.remove(s)
                for held in self._held:  # its frames still being decoded are not delivered
                    held[0] = [e for e in held[0] if e.request != rid]
                return True
        return False

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def decoding(self) -> int:
        """Steps whose events wait for their audio (overlap): step() until this is 0 too."""
        return len(self._held)

    @property
    def reserved(self) -> int:
        """Cache blocks promised to running requests and not allocated yet."""
        return self.sched.reserved

    def _admit(self) -> None:
        """Admit, in order, every waiting request that fits; their prefixes are prefilled
        together in one batched pass (``Scheduler.prefill_deferred``), so that requests
        arriving at once reach their first frame together instead of one prefill after
        another."""
        pending, admitted = [], []
        try:
            self._admit_each(pending, admitted)
            self.sched.prefill_deferred(pending)
        except BaseException:
            # rows may be partial: release them, and the requests wait again, in order (the
            # one whose own admission raised is dropped with the error, as it always was)
            for p, s in reversed(admitted):
                self.sched.release(s)
                self.free_rings.append(s.ring)
                self.waiting.appendleft(p)
            raise
        for _, s in admitted:
            self.active.append(s)
            if self._worker is not None:
                self._worker.open(s.ring)
            elif self.decoder is not None:
                self.decoder.open(s.ring)

    def _admit_each(self, pending: list, admitted: list) -> None:
        while self.waiting and self.free_rings:
            p = self.waiting[0]
            null_t = None
            if p.req.cfg_scale != 1 and p.req.null_prefix is None:
                if self._null is None and self.sched.available < 1 + p.need:
                    return
                null_t = self._null_template()
            if p.need > self.sched.available:
                return  # FIFO: later requests wait behind the first that does not fit
            self.waiting.popleft()
            ring = self.free_rings.pop()
            tmpl = None if p.shared is None else (p.shared.stream, p.shared.rows.shape[0])
            ntmpl = None if null_t is None else (null_t.stream, null_t.rows.shape[0])
            try:
                s = self.sched.admit(p.rid, p.req, ring, shared=tmpl, shared_null=ntmpl,
                                     need=p.need, defer=pending)
            except BaseException:
                self.free_rings.append(ring)
                raise
            admitted.append((p, s))

    def _forget(self, s: Stream) -> None:
        """Return a request's ring slot and decoder slot (its cache streams and promised
        blocks are released by the scheduler)."""
        self.free_rings.append(s.ring)
        if self.decoder is not None:
            if self._worker is not None:
                self._worker.close(s.ring)
            else:
                self.decoder.close(s.ring)
            self._undecoded.pop(s.idx, None)
            self._chunks.pop(s.idx, None)

    def _finish(self, s: Stream) -> None:
        self.sched.release(s)
        self._forget(s)

    # -- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit what fits, run one frame for every running request; one event per request
        that made a frame or finished (with ``overlap``: the events whose audio is decoded
        by now, in order, which may be those of earlier steps)."""
        self._admit()
        if self._worker is not None:
            return self._step_overlapped()
        if not self.active:
            return []
        streams = list(self.active)
        out = self.sched.step(streams)  # releases the finished streams (rows and promise)
        events, done = self._events(out)
        if self.decoder is not None:
            calls, _ = self._plan_decode(out.ids, out.latents, done)
            audio = _decode_calls(self.decoder, calls)
            for ev in events:
                ev.audio = audio.get(ev.request)
        self._retire(streams, done)
        return events

    def _events(self, out):
        made = dict(zip(out.ids, out.latents))
        done = set(out.finished)
        return [Event(s.idx, made.get(s.idx), s.idx in done, None, out.errors.get(s.idx))
                for s in self.active if s.idx in made or s.idx in done], done

    def _retire(self, streams: list[Stream], done: set) -> None:
        for s in self.active:
            if s.idx in done:
                self._forget(s)
        self.active = streams

    def _step_overlapped(self) -> list[Event]:
        if self.active:
            streams = list(self.active)
            threads = torch.get_num_threads()
            overlapped = threads > 1 and len(streams) <= self.OVERLAP_STREAMS
            # the decoder thread has one core while it decodes and the LM the rest (same
            # seed, same audio: see lm_threads)
            with lm_threads(self._worker, overlapped, self.sched.thread_invariant):
                out = self.sched.step(streams)
            events, done = self._events(out)
            calls, first = self._plan_decode(out.ids, out.latents, done)
            fut = None
            if calls and (first or not overlapped):
                # here, on every thread, after what the worker holds: a first chunk (the
                # time to first audio), a process given one core (e.g. a Ray actor of one
                # CPU: none to lend), or many streams (both sides then use every core alone)
                self._worker.sync()
                fut = Future()
                fut.set_result(_decode_calls(self.decoder, calls))
            elif calls:
                fut = self._worker.run(_decode_calls, self.decoder, calls)
            self._retire(streams, done)
            self._held.append([events, fut])
            if sum(f is not None and not f.done() for _, f in self._held) > 2:
                self._wait(1)  # a decoder that falls behind holds the LM
        elif self._held:  # nothing left to generate: the decodes still running
            self._wait(1)
        return self._release()

    def _wait(self, n: int) -> None:
        """Block until the first ``n`` held steps are decoded."""
        for _, fut in list(self._held)[:n]:
            if fut is not None:
                fut.result()

    def _release(self) -> list[Event]:
        """The held events, in order, up to the first step still being decoded."""
        events = []
        while self._held and (self._held[0][1] is None or self._held[0][1].done()):
            evs, fut = self._held.popleft()
            if fut is not None:
                audio = fut.result()
                for ev in evs:
                    ev.audio = audio.get(ev.request)
            events += evs
        return events

    def _plan_decode(self, ids, latents, done) -> tuple[list, bool]:
        """Queue this step's frames per stream; plan the decode of each stream whose next
        chunk is complete (chunk c holds min(2^c, decode_frames, DECODE_ROWS) frames) or
        that finished, in VAE calls of at most DECODE_ROWS stream-frames per chunk length.
        Returns the calls [(request ids, rings, latents [n, frames, C])] and whether one of
        them holds a stream's first chunk."""
        if ids:
            lat = self.model.denormalize(latents.float().cpu())
            for i, rid in enumerate(ids):
                self._undecoded.setdefault(rid, []).append(lat[i])
        groups: dict[int, list[int]] = {}
        cap = max(1, min(self.decode_frames, self.DECODE_ROWS))
        for rid, frames in self._undecoded.items():
            want = min(2 ** self._chunks.get(rid, 0), cap)
            if frames and (len(frames) >= want or rid in done):
                groups.setdefault(len(frames), []).append(rid)
        if not groups:
            return [], False
        ring = {s.idx: s.ring for s in self.active}
        dev = next(self.decoder.vae.parameters()).device
        calls, first = [], False
        for frames, rids in groups.items():
            per_call = max(1, self.DECODE_ROWS // frames)  # <= DECODE_ROWS stream-frames
            for i in range(0, len(rids), per_call):
                part = rids[i:i + per_call]
                lat = torch.stack([torch.stack(self._undecoded[r]) for r in part]).to(dev)
                calls.append((part, [ring[r] for r in part], lat))
            for r in rids:
                first = first or self._chunks.get(r, 0) == 0
                self._undecoded[r] = []
                self._chunks[r] = self._chunks.get(r, 0) + 1
        return calls, first

    def run(self):
        """Step until every submitted request has finished, yielding the events."""
        while self.waiting or self.active or self._held:
            if not self.active and self.waiting:
                self._admit()
                if not self.active and not self._held:  # nothing will ever free blocks
                    p = self.waiting[0]
                    raise CacheFullError(
                        f"request {p.rid} needs {p.need} blocks; only "
                        f"{self.sched.free_blocks} are free with nothing "
                        "running (shared prefixes hold the rest: unshare some)")
            yield from self.step()

    def generate_all(self) -> dict[int, torch.Tensor]:
        """Run to the end; the frames [T, C] of each request id."""
        frames: dict[int, list] = {}
        for ev in self.run():
            lst = frames.setdefault(ev.request, [])
            if ev.latent is not None:
                lst.append(ev.latent.float().cpu())
        C = self.model.cfg.latent_dim
        return {k: torch.stack(v) if v else torch.empty(0, C) for k, v in frames.items()}

    def stats(self) -> dict:
        return {**self.cache.stats(), "queue_depth": self.queue_depth, "running": self.running,
                "reserved_blocks": self.sched.reserved, "template_blocks": self._templates}


def _decode_calls(decoder: DecodeSlots, calls) -> dict:
    """Run planned decoder calls: request id -> its audio."""
    audio = {}
    for rids, rings, lat in calls:
        audio.update(zip(rids, decoder.decode(rings, lat)))
    return audio
