"""The generation core: a batch of streams over one paged KV cache, frame by frame.

    sched = Scheduler(model, num_blocks=4096)     # packs the weights, owns cache + frame step
    sched.setup(0, 0, 0)
    s = sched.admit(0, Request(prefix, 200, seed=1), ring_slot=0)   # prefill, promise blocks
    out = sched.step([s])                          # one frame for every stream (StepOutput)
    sched.release(s)                               # free its rows and what it was promised

Every request keeps its own prefix, prompt, temperature, CFG scale, seed and stop rule:

    rows  = [cond streams..., null streams of the CFG requests...]
    z     = out_norm(paged backbone step(input_linear(previous latents)))    (fast/backbone)
    Z     = z_null + a (z_cond - z_null)  (+ short-context ring step)        (latent CFG)
    x     = LSD / consistency sampling of the head on Z, noise N(0, tau I) per stream
    eos   = out_eos(Z) > threshold

Streams keep their own positions in the paged cache, so prefixes of any length batch
together; a finished stream leaves the batch at once and its cache blocks are freed. Each
request draws its noise from its own generator (``seed``), so its frames do not depend on
what else is in the batch.

Block accounting: ``blocks_for`` is what a request may ever allocate; ``admit`` promises the
part not allocated yet (``reserved``), each ``step`` moves the blocks its rows take from
the promise to the stream, ``release`` returns the rest. ``available`` = free blocks not
promised: a caller that admits only requests that fit it (the Engine) never runs out of
cache mid-generation. CALMGenerator (one batch per call), Engine (continuous batching) and
the text-to-audio pipeline all run on this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from calm_fast import checks
from calm_fast.errors import ArgumentError, NonFiniteError
from calm_fast.fast import backbone as fb
from calm_fast.fast import ops
from calm_fast.fast.frame_step import BUCKETS, FrameInputs, FrameStep
from calm_fast.fast.head import pack_head
from calm_fast.model.calm import CALM
from calm_fast.model.sampling import EOSRule, gaussian_noise


@dataclass
class Request:
    """One generation request. Ranges are checked by ``Scheduler.check`` (every entry point
    calls it before anything is reserved); a value outside them raises ArgumentError /
    ArgumentTypeError naming the field."""

    prefix: torch.Tensor  # [P >= 1, d] finite float rows (CALM.prefix)
    max_frames: int  # int in [1, the model's context less the prefix and prompt]
    temperature: float = 0.7  # Gaussian temperature, in [0, 10]
    cfg_scale: float = 1.0  # latent CFG scale in [0, 50]; 1 = no CFG (no null branch runs)
    # int in [0, 2**63 - 1]; None: drawn from the global RNG (so torch.manual_seed fixes it)
    seed: int | None = None
    prompt_latents: torch.Tensor | None = None  # [L, C] finite normalised latents to continue
    null_prefix: torch.Tensor | None = None  # [P, d] finite; default: CALM.null_prefix()
    eos_threshold: float | None = -4.0  # finite EOS logit threshold; None: no EOS
    frames_after_eos: int = 0  # int in [0, 10000]
    min_frames: int = 0  # int in [0, max_frames]: EOS is ignored before it
    noise_clamp: float | None = None  # None, or the noise clamped to [-c, c], c in (0, 100]
    # The request's own noise generator (used as is, so the caller can read its state after
    # generation); None: a new one seeded with ``seed``.
    generator: torch.Generator | None = None
    # Aligned-text models (CALM.text_inputs): [>= max_frames, d] finite rows, row s added to
    # the input of frame s of the cond stream (the CFG null stream gets none); None: no text.
    frame_cond: torch.Tensor | None = None


@dataclass
class StepOutput:
    step: int
    ids: list  # indices (into the request list) of the streams that made a frame
    latents: torch.Tensor  # [len(ids), C]
    finished: list = field(default_factory=list)  # requests that ended at this step
    # requests that ended with an error at this step (also in ``finished``): idx -> error
    errors: dict = field(default_factory=dict)


@dataclass
class Stream:
    idx: int
    req: Request
    cond: int
    null: int | None
    gen: torch.Generator
    eos: EOSRule
    prev: torch.Tensor  # [C]; NaN = BOS
    made: int = 0  # frames emitted
    steps: int = 0  # frames computed (the EOS rule counts these)
    ring: int = 0  # short-context ring slot
    need: int = 0  # cache blocks it may ever allocate (Scheduler.blocks_for)
    held: int = 0  # cache blocks it has allocated so far
    # cache stream -> its first frame's backbone output [d], when the prefill computed it
    # (``admit(defer=...)``: that row rode along with the prefix, so its frame reads no weights)
    first: dict = field(default_factory=dict)


class Scheduler:
    """Generation over the fast paths, with the weights of a CALM module.

    head_steps: LSD / consistency steps per frame. precision: the backbone's and head's
    weights on CPU: "fp32" (the default and the parity mode), "bf16" (bf16 weights and
    matmul rows, fp32 products and sums: half the bytes a batch-1 frame reads) or "int8"
    (8-bit weights and rows, exact integer sums: a quarter of the bytes; fast/int8.py);
    ``int8=True`` is precision="int8". device: where the cache and the frame compute live; on CUDA each frame is a
    CUDA-graph replay (frame_step.FrameStep) and ``dtype`` may be bf16/fp16; there the
    cache (``num_blocks``, required) and the captured graphs are kept across calls. The
    weights are packed once here: build a new generator after training."""

    def __init__(self, model: CALM, *, head_steps: int = 1, block_size: int = 16,
                 num_blocks: int | None = None, int8: bool = False, device="cpu",
                 dtype=torch.float32, graphs: bool | None = None, max_streams: int = 512,
                 buckets=BUCKETS, precision: str = "fp32"):
        checks.instance("model", model, CALM, "a calm_fast CALM model")
        checks.integer("head_steps", head_steps, 1, 64)
        checks.integer("block_size", block_size, 1, 4096)
        checks.integer("num_blocks", num_blocks, 2, none=True)
        checks.integer("max_streams", max_streams, 1, 1 << 20)
        checks.instance("dtype", dtype, torch.dtype, "a torch.dtype")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError(f"device={device!r}, but CUDA is not available here "
                                "(torch.cuda.is_available() is False): use device='cpu'")
        if dev.type not in ("cpu", "cuda"):
            raise ArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.model, self.cfg = model, model.cfg
        self.head_steps, self.block_size, self.num_blocks = head_steps, block_size, num_blocks
        self.device, self.dtype, self.graphs = torch.device(device), dtype, graphs
        cpu = self.device.type == "cpu"
        precision = checks.precision(precision, int8)
        self.precision = precision
        if precision != "fp32" and not cpu:
            raise ArgumentError(f"precision={precision!r} is a CPU weight mode; use dtype on GPU")
        if not cpu and num_blocks is None:
            raise ArgumentError("a GPU generator needs num_blocks (its cache is kept across calls)")
        if cpu and dtype != torch.float32:
            raise ArgumentError("the CPU path computes in fp32 (bf16 matmuls are ~7x slower "
                                "here): for bf16 or int8 weights pass precision='bf16' / 'int8'")
        self.backbone = fb.pack(model.transformer)
        self.head = pack_head(model.flow_net.state_dict())
        # how the backbone step runs: "native" (our C++ step), "torch" (op by op), "int8"
        # (int8 linears op by op: the extension is not built) or "cuda" (Triton, CUDA graphs)
        self.layout = "native" if cpu else "cuda"
        if precision == "int8":
            self.backbone, self.head = self.backbone.quantized(), self.head.quantized()
            if fb.native_layers(self.backbone) is None:
                self.layout = "int8"
        elif precision == "bf16":  # every thread at decode batch sizes (cpu_linear)
            self.backbone, self.head = self.backbone.split(True), self.head.split(True)
        elif cpu:  # fp32: our C++ step or torch's, whichever this host runs faster
            self.backbone, self.layout = ops.cpu_layout(self.backbone, fb.step, fb.prefill)
            self.head = self.head.split()
        else:
            self.backbone = self.backbone.to(self.device, dtype)
            self.head = self.head.to(self.device, dtype)
        self.w_in = model.input_linear.weight.detach().t().contiguous().to(self.device, dtype)
        self.max_streams, self.buckets = max_streams, buckets
        self.cache = self.frame = None
        self.reserved = 0  # blocks promised to admitted streams, not yet allocated

    # -- validation ---------------------------------------------------------------------------
    @property
    def thread_invariant(self) -> bool:
        """Whether a frame step gives the same bits on any intra-op thread count: our C++
        step and linears (fp32 and bf16) cut every reduction by shape alone, never by
        thread count, and int8 sums are exact integers (python_tests/runtime/
        test_decode_overlap.py and test_generate.py check it), while torch's sgemm (the "torch" layout, the
        short-context module's linears) rounds some shapes differently on one thread and
        on two."""
        return (self.layout == "native" and ops.has_native("linear")
                and getattr(self.model, "short", None) is None)

    def check(self, i: int, r: Request) -> None:
        """Validate request ``i``: every field's type, range and finiteness (ArgumentError /
        ArgumentTypeError naming the field and the value; nothing is reserved)."""
        m, d, C = self.model, self.cfg.backbone.d_model, self.cfg.latent_dim
        where = f"request {i}"
        checks.instance(where, r, Request, "a calm_fast Request")
        for name, t in (("prefix", r.prefix), ("null_prefix", r.null_prefix)):
            if t is None and name == "null_prefix":
                continue
            checks.instance(f"{where}: {name}", t, torch.Tensor, "a torch.Tensor")
            if t.dim() != 2 or t.shape[1] != d or t.shape[0] == 0 or not t.is_floating_point():
                raise ArgumentError(f"{where}: {name} must be float [P >= 1, {d}], got "
                                    f"{t.dtype} {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ArgumentError(f"{where}: {name} holds NaN or Inf")
        if r.prompt_latents is not None:
            checks.instance(f"{where}: prompt_latents", r.prompt_latents, torch.Tensor,
                            "a torch.Tensor")
            if r.prompt_latents.dim() != 2 or not r.prompt_latents.is_floating_point():
                raise ArgumentError(f"{where}: prompt_latents must be float [L, {C}], got "
                                    f"{r.prompt_latents.dtype} {tuple(r.prompt_latents.shape)}")
            try:
                m.check_latents(f"{where}: prompt_latents", r.prompt_latents)
            except ValueError as e:
                raise ArgumentError(str(e)) from e
        checks.integer(f"{where}: max_frames", r.max_frames, 1)
        checks.real(f"{where}: temperature", r.temperature, 0.0, 10.0)
        checks.real(f"{where}: cfg_scale", r.cfg_scale, 0.0, 50.0)
        checks.integer(f"{where}: seed", r.seed, 0, 2**63 - 1, none=True)
        checks.real(f"{where}: eos_threshold", r.eos_threshold, none=True)
        checks.integer(f"{where}: frames_after_eos", r.frames_after_eos, 0, 10_000)
        checks.integer(f"{where}: min_frames", r.min_frames, 0, r.max_frames)
        checks.real(f"{where}: noise_clamp", r.noise_clamp, 0.0, 100.0, none=True, lo_open=True)
        checks.instance(f"{where}: generator", r.generator, torch.Generator, "a torch.Generator",
                        none=True)
        if r.frame_cond is not None:
            checks.instance(f"{where}: frame_cond", r.frame_cond, torch.Tensor, "a torch.Tensor")
            if not self.cfg.aligned_text:
                raise ArgumentError(f"{where}: frame_cond is for aligned-text models; model "
                                    f"{self.cfg.name!r} reads its text in the prefix")
            fc = r.frame_cond
            if fc.dim() != 2 or fc.shape[1] != d or not fc.is_floating_point():
                raise ArgumentError(f"{where}: frame_cond must be float [frames, {d}], got "
                                    f"{fc.dtype} {tuple(fc.shape)}")
            if fc.shape[0] < r.max_frames:
                raise ArgumentError(f"{where}: frame_cond has {fc.shape[0]} rows, fewer than "
                                    f"max_frames={r.max_frames}")
            if not torch.isfinite(fc).all():
                raise ArgumentError(f"{where}: frame_cond holds NaN or Inf")
        P, L = self.prefix_rows(r), self.prompt_rows(r)
        need = self._rows(r)
        if need > self.cfg.max_context:
            raise ArgumentError(f"{where}: prefix ({P}) + BOS + prompt ({L}) + max_frames "
                             f"({r.max_frames}) = {need} rows exceed the context of "
                             f"{self.cfg.max_context} rows")

    @staticmethod
    def prefix_rows(r: Request) -> int:
        """Rows of the longer prefix (the cond one, or the null one of CFG)."""
        return max(r.prefix.shape[0], 0 if r.null_prefix is None else r.null_prefix.shape[0])

    @staticmethod
    def prompt_rows(r: Request) -> int:
        return 0 if r.prompt_latents is None else r.prompt_latents.shape[0]

    def _rows(self, r: Request) -> int:
        """An upper bound on the rows either stream of a request holds."""
        return self.prefix_rows(r) + 1 + self.prompt_rows(r) + r.max_frames

    def blocks_for(self, r: Request, shared_rows: int = 0, null_shared: bool = False) -> int:
        """Cache blocks request ``r`` may ever allocate: per stream its rows (prefix, BOS,
        prompt, max_frames) less the full blocks it shares with a template of
        ``shared_rows`` rows (a shared partial block is copied on its first write); with
        ``null_shared`` its CFG null stream forks the default-null template."""
        bs, tail = self.block_size, 1 + self.prompt_rows(r) + r.max_frames
        need = -(-(r.prefix.shape[0] + tail) // bs) - shared_rows // bs
        if r.cfg_scale != 1:
            pn = 1 if r.null_prefix is None else r.null_prefix.shape[0]
            need += -(-(pn + tail) // bs) - (pn // bs if null_shared and r.null_prefix is None
                                             else 0)
        return need

    # -- the core ----------------------------------------------------------------------------
    def admit(self, i: int, r: Request, ring_slot: int, shared=None, shared_null=None,
              need: int | None = None, defer: list | None = None) -> Stream:
        """Prefill request ``i`` into new cache streams (its cond stream and, with CFG, its
        null stream) and its short-context ring slot. ``shared`` / ``shared_null``: a
        prefilled template (stream id, rows) whose rows are this request's first prefix
        rows: the stream forks it (blocks shared by refcount) and prefills only the rest.
        ``need``: the blocks it may ever allocate (default ``blocks_for``); what it has not
        allocated yet stays promised to it in ``reserved`` until ``release``.
        ``defer``: a list that receives (stream, cache stream, rows) for each cache stream
        instead of prefilling it here; ``prefill_deferred`` then prefills them all at once."""
        before = self.cache.manager.num_free_blocks
        m, C, cache = self.model, self.cfg.latent_dim, self.cache
        bos = m.bos_emb.detach().to(self.device, self.dtype)
        dev = lambda t: t.to(self.device, self.dtype)  # noqa: E731
        prompt = None if r.prompt_latents is None else dev(r.prompt_latents)
        feed = bos[None] if prompt is None else torch.cat([bos[None], prompt])
        lat_rows = feed[:-1] @ self.w_in  # rows before the first step's input
        # A deferred prefill also carries the first frame's input row (BOS or the prompt's
        # last latent, as _frame builds it): its output comes out of the same pass over the
        # weights, and the first frame skips the backbone (a whole weight read at batch 1).
        first = first_cond = None
        if defer is not None and self._fold:
            first = feed[-1:] @ self.w_in
            first_cond = first if r.frame_cond is None else first + dev(r.frame_cond[:1])

        def open_stream(prefix, template, first_row):
            if template is None:
                sid = cache.new_stream()
                rows = prefix
            else:
                sid = cache.fork(template[0])
                rows = prefix[template[1]:]
            try:
                rows = torch.cat([dev(rows), lat_rows] + ([] if first_row is None else [first_row]))
                if len(rows) and defer is not None:
                    pending.append((sid, rows))
                elif len(rows):
                    fb.prefill(self.backbone, cache, sid, rows, outputs=False)
            except BaseException:
                cache.free(sid)
                raise
            return sid

        pending = []
        cond = open_stream(r.prefix, shared, first_cond)
        null = None
        if r.cfg_scale != 1:
            npre = m.null_prefix().detach() if r.null_prefix is None else r.null_prefix
            try:
                null = open_stream(npre, shared_null, first)
            except BaseException:
                cache.free(cond)
                raise
        if self.frame.short is not None:
            self.frame.ring.reset([ring_slot])
            for row in feed[:-1]:
                self.frame.short.step(self.frame.ring, [ring_slot], row[None],
                                      attend=ops.ring_attention)
        prev = (torch.full((C,), float("nan"), device=self.device, dtype=self.dtype)
                if prompt is None else prompt[-1].clone())
        gen = r.generator
        if gen is None:
            seed = r.seed if r.seed is not None else int(torch.randint(0, 2**62, ()).item())
            gen = torch.Generator().manual_seed(seed)
        if need is None:
            need = self.blocks_for(r, 0 if shared is None else shared[1], shared_null is not None)
        used = before - self.cache.manager.num_free_blocks
        self.reserved += need - used
        s = Stream(i, r, cond, null, gen,
                   EOSRule(r.eos_threshold, r.frames_after_eos, r.min_frames), prev,
                   ring=ring_slot, need=need, held=used)
        if defer is not None:
            defer.extend((s, sid, rows) for sid, rows in pending)
        return s

    @property
    def _fold(self) -> bool:
        """Whether deferred prefills carry the first frame (not under CUDA graphs: the
        captured frame always runs the backbone)."""
        return not self.frame.graphs

    def prefill_deferred(self, pending: list) -> None:
        """Prefill what ``admit(..., defer=pending)`` left, every stream in one batched call
        (``fast.backbone.prefill_many``); the blocks it allocates come out of each stream's
        promise. On an error the caller releases the streams (their rows are partial)."""
        if not pending:
            return
        for s, sid, rows in pending:
            grew = self.cache.blocks_needed([sid], rows.shape[0])
            s.held += grew
            self.reserved -= grew
        outs = fb.prefill_many(self.backbone, self.cache, [(sid, rows) for _, sid, rows in pending],
                               outputs="last" if self._fold else False)
        if self._fold:  # each stream's last row was its first frame's input
            for (s, sid, _), z in zip(pending, outs):
                s.first[sid] = z

    def setup(self, need: int, nstreams: int, nrequests: int):
        """The cache, the short-context ring and the frame compute. Made once and kept across
        calls when ``num_blocks`` is given (always on GPU: fixed buffers, captured graphs;
        the engine's way on CPU), else sized to the call. Either way they hold one more
        block and stream (and ring slot) than asked: FrameStep's scratch row."""
        per_call = self.device.type == "cpu" and self.num_blocks is None
        if not per_call and max(nstreams, nrequests) > self.max_streams:
            raise ArgumentError(f"{nstreams} streams exceed max_streams={self.max_streams}")
        if per_call or self.cache is None:
            blocks, slots, rings = ((need + 1, nstreams + 1, nrequests + 1) if per_call else
                                    (self.num_blocks, self.max_streams + 1,
                                     self.max_streams + 1))
            self.reserved = 0  # a new cache: nothing is promised on it
            self.cache = self.backbone.make_cache(blocks, self.block_size, max_streams=slots,
                                                  dtype=self.dtype, device=self.device)
            short = getattr(self.model, "short", None)
            ring = (short.init_state(rings, dtype=self.dtype, device=self.device)
                    if short is not None else None)
            self.frame = FrameStep(self.model, self.cache, self.backbone, self.head,
                                   head_steps=self.head_steps, ring=ring, graphs=self.graphs,
                                   buckets=self.buckets)
        if self.frame.graphs and nstreams > self.frame.buckets[-1]:
            raise ArgumentError(f"{nstreams} backbone rows exceed the largest CUDA-graph bucket "
                                f"{self.frame.buckets[-1]}; pass larger buckets")
        return self.cache, self.frame.ring, self.frame.short

    def step(self, streams: list[Stream], step: int = 0) -> StepOutput:
        """One frame for every stream; finished streams are released and removed from
        ``streams`` (in place).

        Isolation: if the batched frame raises, whatever it changed is rolled back (cache
        rows, the streams' noise generators, the short-context rings, the block promises);
        each stream then tries the frame alone (rolled back too) to find which fail, those
        end with their error (``StepOutput.errors``), and the others run the frame as one
        batch: exactly the frames they would have had had the failing ones never been there.
        A stream whose frame is NaN / Inf ends with a NonFiniteError (its frame is not
        emitted); the other rows of the batch are independent of it."""
        saved = self._save(streams)
        try:
            return self._frame(streams, step)
        except Exception as e:  # noqa: BLE001 (any fault of one request must stay its own)
            self._restore(streams, saved)
            failed = {streams[0].idx: e} if len(streams) == 1 else {}
            if len(streams) > 1:
                for s in streams:  # a dry run each, to find the ones at fault
                    one = self._save([s])
                    try:
                        self._frame([s], step, dry=True)
                    except Exception as e1:  # noqa: BLE001
                        failed[s.idx] = e1
                    self._restore([s], one)
                if not failed:  # only the batch fails: run them one by one
                    failed = None
            if failed is None:
                parts, keep = [], []
                for s in list(streams):
                    one = [s]
                    parts.append(self.step(one, step))
                    keep += one
                streams[:] = keep
            else:
                bad = [s for s in streams if s.idx in failed]
                for s in bad:
                    self.release(s)
                rest = [s for s in streams if s.idx not in failed]
                parts = [StepOutput(step, [], torch.empty(0, self.cfg.latent_dim),
                                    [s.idx for s in bad], failed)]
                if rest:
                    parts.append(self.step(rest, step))
                streams[:] = rest
            return StepOutput(step, [i for p in parts for i in p.ids],
                              torch.cat([p.latents for p in parts]),
                              [i for p in parts for i in p.finished],
                              {k: v for p in parts for k, v in p.errors.items()})

    def _save(self, streams: list[Stream]) -> dict:
        """What a frame changes, to undo a failed one."""
        ids = [i for s in streams for i in (s.cond, s.null) if i is not None]
        saved = {"reserved": self.reserved, "pos": {i: self.cache.position(i) for i in ids},
                 "streams": [(s.gen.get_state(), s.held, s.steps, s.made, s.prev,
                              s.eos.eos_at) for s in streams]}
        ring = self.frame.ring if self.frame is not None else None
        if ring is not None:
            slots = torch.tensor([s.ring for s in streams], dtype=torch.long,
                                 device=ring.count.device)
            saved["ring"] = (slots, ring.k[slots].clone(), ring.v[slots].clone(),
                             ring.count[slots].clone())
        return saved

    def _restore(self, streams: list[Stream], saved: dict) -> None:
        for i, p in saved["pos"].items():
            if self.cache.position(i) > p:
                self.cache.truncate(i, self.cache.position(i) - p)
        for s, (g, held, steps, made, prev, eos_at) in zip(streams, saved["streams"]):
            s.gen.set_state(g)
            s.held, s.steps, s.made, s.prev, s.eos.eos_at = held, steps, made, prev, eos_at
        self.reserved = saved["reserved"]
        if "ring" in saved:
            slots, k, v, count = saved["ring"]
            ring = self.frame.ring
            ring.k[slots], ring.v[slots], ring.count[slots] = k, v, count

    def _frame(self, streams: list[Stream], step: int, dry: bool = False) -> StepOutput:
        """The batched frame (``dry``: the caller rolls it back, so nothing is released)."""
        m, cache, C = self.model, self.cache, self.cfg.latent_dim
        dev = self.device
        n = len(streams)
        pick = [k for k, s in enumerate(streams) if s.null is not None]  # the CFG requests
        ids = [s.cond for s in streams] + [streams[k].null for k in pick]
        owner = streams + [streams[k] for k in pick]
        # rows whose backbone output the prefill already made (their first frame)
        pre = [j for j, sid in enumerate(ids) if sid in owner[j].first]
        run = [j for j, sid in enumerate(ids) if sid not in owner[j].first]
        for s in streams:  # the blocks this frame's rows allocate come out of the promise
            grew = cache.blocks_needed([i for i in (s.cond, s.null)
                                        if i is not None and i not in s.first], 1)
            s.held += grew
            self.reserved -= grew
        prev = torch.stack([s.prev for s in streams])
        prev = torch.where(torch.isnan(prev), m.bos_emb.detach().to(dev, prev.dtype), prev)
        run_ids = [ids[j] for j in run]
        pos = torch.tensor([cache.position(s) for s in run_ids], device=dev, dtype=torch.long)
        slots = (cache.reserve(run_ids, 1)[:, 0] if run_ids else
                 torch.empty(0, dtype=torch.long, device=dev))
        null = list(range(n))
        alpha = [1.0] * n
        for j, k in enumerate(pick):
            null[k], alpha[k] = n + j, streams[k].req.cfg_scale
        temps = [s.req.temperature for s in streams]
        gens = [s.gen for s in streams]
        clamps = [s.req.noise_clamp for s in streams]
        draws = self.head_steps if self.cfg.head.kind != "lsd" else 1
        noise = torch.stack([gaussian_noise(temps, C, generators=gens, clamp=clamps)
                             for _ in range(draws)])
        lng = dict(dtype=torch.long, device=dev)
        row_src = list(range(n)) + pick
        add = None
        if any(s.req.frame_cond is not None for s in streams):
            add = torch.zeros(len(run), self.cfg.backbone.d_model, device=dev, dtype=self.dtype)
            for r, j in enumerate(run):
                s = owner[j]
                if j < n and s.req.frame_cond is not None:
                    add[r] = s.req.frame_cond[s.steps]
        z_pre = None
        if pre:
            z_pre = torch.stack([owner[j].first[ids[j]] for j in pre])
        f = FrameInputs(prev, torch.tensor([row_src[j] for j in run], **lng), pos, slots,
                        cache.page_table(run_ids) if run_ids else None, torch.arange(n, **lng),
                        torch.tensor(null, **lng),
                        torch.tensor(alpha, device=dev)[:, None], noise.to(dev),
                        None if self.frame.ring is None else
                        torch.tensor([s.ring for s in streams], **lng), add,
                        None if not pre else torch.tensor(run, **lng),
                        None if not pre else torch.tensor(pre, **lng), z_pre)
        out, logits = self.frame(f)
        logits = logits.float().cpu()
        bad = (~torch.isfinite(out.float()).all(1)).cpu() | ~torch.isfinite(logits)
        emitted, keep_ix, finished, errors = [], [], [], {}
        for k, s in enumerate(streams):
            if bad[k]:
                errors[s.idx] = NonFiniteError(
                    f"request {s.idx}: its frame {s.steps} holds NaN or Inf (temperature "
                    f"{s.req.temperature}, cfg_scale {s.req.cfg_scale}); the request was ended")
                finished.append(s)
                continue
            here = s.steps
            s.steps += 1
            keep = s.eos.keep(here, float(logits[k]))
            if keep:
                s.prev = out[k]
                s.made += 1
                emitted.append(k)
            last = s.eos.eos_at is not None and here + 1 >= s.eos.eos_at + s.eos.frames_after_eos
            if not keep or last or s.made >= s.req.max_frames:
                finished.append(s)
            else:
                keep_ix.append(k)
        result = StepOutput(step, [streams[k].idx for k in emitted], out[emitted],
                            [s.idx for s in finished], errors)
        if not dry:
            for s in streams:
                s.first.clear()
            for s in finished:
                self.release(s)
            streams[:] = [streams[k] for k in keep_ix]
        return result

    def release(self, s: Stream) -> None:
        """Free a stream's cache rows and what it still had promised (each stream is
        released once: finished streams leave the batch in the same step)."""
        for sid in (s.cond, s.null):
            if sid is not None:
                self.cache.free(sid)
        self.reserved -= s.need - s.held
        s.need = s.held = 0

    @property
    def free_blocks(self) -> int:
        """Free cache blocks, less the one kept for FrameStep's scratch row."""
        return self.cache.manager.num_free_blocks - 1

    @property
    def available(self) -> int:
        """Free blocks not promised to admitted streams."""
        return self.free_blocks - self.reserved
