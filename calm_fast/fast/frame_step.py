"""The compute of one generation frame, on any device, as one CUDA graph on GPU.

    rows  : backbone rows = [cond streams..., null streams of the CFG requests...]
    x     = prev[row_src] @ W_in (+ add: aligned text rows)       (BOS already substituted)
    z     = out_norm(fast_backbone.step_rows(x))                  (paged KV cache)
    Z     = z[null] + alpha (z[cond] - z[null])                   (latent CFG; null = cond
                                                                   and alpha = 1 without CFG)
    Z    += short-context ring step(prev)                         (music models)
    x     = LSD / consistency head on (Z, pre-drawn noise)        eos = out_eos(Z)

Everything host-side (which streams, their cache slots, page table, noise draws, EOS
decisions) is done by the caller (generate.CALMGenerator); ``FrameStep.__call__`` is pure
tensor work. On CPU it runs eagerly. On CUDA the whole step is captured once per batch
bucket (1, 2, 4, ... rows) over fixed-address input buffers and replayed: eager torch
launches ~15 kernels per backbone layer plus ~5 per head block, and at decode batch sizes
the launch overhead, not the GPU, is the cost (benchmarks/results/frame_step_gpu.csv).
A batch is padded to its bucket; padded rows read no pages (zero attention), write their
K/V to a scratch slot and their ring row to a scratch ring, and are dropped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_fast.fast import backbone as fb
from calm_fast.fast import ops
from calm_fast.fast.cache import PagedKVCache
from calm_fast.fast.cpu_linear import SplitLinear
from calm_fast.fast import head as fh
from calm_fast.model.sampling import consistency_sample, latent_cfg, lsd_sample

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class FrameInputs:
    """One frame's inputs. N request rows, R >= N backbone rows (cond rows first)."""

    prev: torch.Tensor  # [N, C] previous latent per request (BOS substituted)
    row_src: torch.Tensor  # [R] long: the request row each backbone row reads
    pos: torch.Tensor  # [R] long: RoPE position of each backbone row
    slots: torch.Tensor  # [R] long: cache slot each backbone row writes
    table: tuple  # cache.page_table(...) of the R backbone streams
    cond: torch.Tensor  # [N] long: backbone row of each request's cond stream
    null: torch.Tensor  # [N] long: backbone row of its null stream (= cond without CFG)
    alpha: torch.Tensor  # [N, 1] CFG scale (1 without CFG)
    noise: torch.Tensor  # [steps, N, C]: the initial draw, then the consistency re-noisings
    ring: torch.Tensor | None = None  # [N] long: short-context ring slot per request
    add: torch.Tensor | None = None  # [R, d]: rows added to the inputs (aligned-text models)
    # Backbone rows whose output is already known (a first frame made by the prefill): then
    # row_src / pos / slots / table / add describe only the ``run`` rows [R1], the ``pre``
    # rows [P] take ``z_pre`` [P, d], and cond / null index the R1 + P rows. Eager only.
    run: torch.Tensor | None = None
    pre: torch.Tensor | None = None
    z_pre: torch.Tensor | None = None


class FrameStep:
    """The frame compute of a CALM model over a paged cache (see the module docstring).

    ``backbone``, ``head``: the model's weights packed for the cache's device (the caller
    packs them once: split on CPU, moved/cast on GPU). ``ring``: the model's ShortContextState (one slot per request plus a scratch slot at
    the end, used by padded rows) when the model has a short context. ``graphs``: run
    through the fixed bucket buffers (default: on for CUDA caches), captured as CUDA graphs
    on CUDA and run eagerly over the same buffers elsewhere (how CI tests the padding)."""

    def __init__(self, model, cache: PagedKVCache, backbone: fb.PackedBackbone, head, *,
                 head_steps: int = 1, ring=None, graphs: bool | None = None,
                 buckets=BUCKETS, head_impl: str | None = None):
        self.model, self.cfg, self.cache = model, model.cfg, cache
        self.device = cache.k.device
        self.head_steps, self.ring = head_steps, ring
        dt = cache.k.dtype
        cpu = self.device.type == "cpu"
        short = getattr(model, "short", None)
        if (short is None) != (ring is None):
            raise ValueError("a short-context model needs its ring state, and only it")
        # the short-context module runs as is (tiny, a few ops per layer), on the cache's device
        self.short = short if short is None or cpu else copy.deepcopy(short).to(self.device, dt)
        self.backbone, self.head = backbone, head
        # the head through ops (Triton on CUDA, the fused torch path on CPU), or forced
        if head_impl not in (None, "torch", "triton"):
            raise ValueError(f"head_impl must be 'torch' or 'triton', got {head_impl!r}")
        self._head_fn = {None: fh.head, "torch": fh.head_cpu, "triton": ops.head_triton}[head_impl]
        mv = lambda t: t.detach().to(self.device, dt)  # noqa: E731
        self.w_in = mv(model.input_linear.weight).t().contiguous()
        self.norm = (mv(model.out_norm.weight), mv(model.out_norm.bias), model.out_norm.eps)
        self.eos_w, self.eos_b = mv(model.out_eos.weight), mv(model.out_eos.bias)
        # on CPU the input and EOS projections go through our C++ linear too: torch's sgemm
        # rounds a 5-row product differently on one thread and on two, and the engine
        # changes the LM's thread count between steps (Scheduler.thread_invariant)
        self._in_lin = self._eos_lin = None
        if cpu and dt == torch.float32 and ops.has_native("linear"):
            self._in_lin = SplitLinear(self.w_in)
            self._eos_lin = SplitLinear(self.eos_w.t().contiguous(), self.eos_b)
        self.graphs = ops.cuda_graphs(self.device) if graphs is None else graphs
        self.buckets = tuple(sorted(buckets))
        self._captured = {}
        self._static = None

    # -- the math ---------------------------------------------------------------------------
    def compute(self, f: FrameInputs):
        """(latents [N, C], eos logits [N]) of one frame; pure tensor ops."""
        d = self.cfg.backbone.d_model
        z = None
        if f.row_src.shape[0]:
            x = f.prev[f.row_src].to(self.w_in.dtype)
            x = self._in_lin(x) if self._in_lin is not None else x @ self.w_in
            if f.add is not None:
                x = x + f.add.to(x.dtype)
            z = fb.step_rows(self.backbone, self.cache, x, f.pos, f.slots, f.table)
        if f.z_pre is not None:
            full = f.z_pre.new_empty(f.run.shape[0] + f.pre.shape[0], d)
            if z is not None:
                full[f.run] = z.to(full.dtype)
            full[f.pre] = f.z_pre
            z = full
        z = F.layer_norm(z, (d,), *self.norm)
        Z = latent_cfg(z[f.cond], z[f.null], f.alpha.to(z.dtype))  # exactly z without CFG
        if self.short is not None:
            Z = Z + self.short.step(self.ring, f.ring, f.prev.to(Z.dtype),
                                    attend=ops.ring_attention).to(Z.dtype)
        logits = (self._eos_lin(Z) if self._eos_lin is not None else
                  F.linear(Z, self.eos_w, self.eos_b))[:, 0]

        def head(c, xx, times):
            return self._head_fn(self.head, c, xx, times)

        noise = f.noise.to(Z.dtype)
        if self.cfg.head.kind == "lsd":
            out = lsd_sample(head, Z, noise[0], self.head_steps)
        else:
            more = iter(noise[1:])
            out = consistency_sample(head, Z, noise[0], self.head_steps,
                                     renoise=lambda: next(more))
        return out, logits

    def __call__(self, f: FrameInputs):
        if not self.graphs:
            return self.compute(f)
        if f.z_pre is not None:
            raise ValueError("precomputed backbone rows (z_pre) are an eager-path input; "
                             "the captured frame always runs the backbone")
        R = f.row_src.shape[0]
        bucket = next((b for b in self.buckets if b >= R), None)
        if bucket is None:
            raise ValueError(f"{R} rows exceed the largest CUDA-graph bucket "
                             f"{self.buckets[-1]}; pass larger buckets")
        self._fill(f, bucket)
        if not ops.cuda_graphs(self.device):
            out, logits = self.compute(self._inputs(bucket))
        else:
            if bucket not in self._captured:
                self._capture(bucket)
            graph, out, logits = self._captured[bucket]
            graph.replay()
        N = f.prev.shape[0]
        return out[:N].clone(), logits[:N].clone()

    # -- CUDA graphs --------------------------------------------------------------------------
    def _buffers(self):
        """Fixed-address inputs for the largest bucket (every bucket reads a prefix)."""
        if self._static is None:
            B, C, dev = self.buckets[-1], self.cfg.latent_dim, self.device
            steps = self.head_steps if self.cfg.head.kind != "lsd" else 1
            long = dict(dtype=torch.long, device=dev)
            i32 = dict(dtype=torch.int32, device=dev)
            c = self.cache
            scratch = c.new_stream()  # padded rows write their K/V here; never read
            self._scratch_slot = int(c.reserve([scratch], 1)[0, 0])
            self._static = dict(
                prev=torch.zeros(B, C, device=dev), row_src=torch.zeros(B, **long),
                pos=torch.zeros(B, **long), slots=torch.zeros(B, **long),
                indptr=torch.zeros(B + 1, **i32), indices=torch.zeros_like(c.indices, device=dev),
                last=torch.zeros(B, **i32), start=torch.zeros(B, **i32),
                cond=torch.zeros(B, **long), null=torch.zeros(B, **long),
                alpha=torch.ones(B, 1, device=dev), noise=torch.zeros(steps, B, C, device=dev),
                ring=torch.zeros(B, **long), add=torch.zeros(B, self.cfg.backbone.d_model,
                                                             device=dev))
        return self._static

    def _fill(self, f: FrameInputs, bucket: int) -> None:
        s = self._buffers()
        N, R = f.prev.shape[0], f.row_src.shape[0]
        indptr, indices, last, start = f.table
        cp = lambda name, src, n: s[name][:n].copy_(src, non_blocking=True)  # noqa: E731
        cp("prev", f.prev, N)
        s["noise"][:, :N].copy_(f.noise, non_blocking=True)
        for name, src in (("row_src", f.row_src), ("pos", f.pos), ("slots", f.slots),
                          ("last", last), ("start", start)):
            cp(name, src, R)
        cp("indptr", indptr, R + 1)
        cp("indices", indices[:int(indptr[R])], int(indptr[R]))
        for name, src in (("cond", f.cond), ("null", f.null), ("alpha", f.alpha)):
            cp(name, src, N)
        if f.ring is not None:
            cp("ring", f.ring, N)
        if f.add is not None:
            cp("add", f.add, R)
        else:
            s["add"][:R] = 0
        s["add"][R:bucket] = 0
        # padding: rows R.. read no pages and write the scratch slot; requests N.. read row 0
        s["row_src"][R:bucket] = 0
        s["pos"][R:bucket] = 0
        s["slots"][R:bucket] = self._scratch_slot
        s["indptr"][R + 1:bucket + 1] = int(indptr[R])
        s["last"][R:bucket] = 0
        s["start"][R:bucket] = 0
        s["cond"][N:bucket] = 0
        s["null"][N:bucket] = 0
        s["alpha"][N:bucket] = 1
        if self.ring is not None:
            s["ring"][N:bucket] = self.ring.count.shape[0] - 1  # the scratch ring slot

    def _inputs(self, bucket: int) -> FrameInputs:
        s = self._static
        b = slice(0, bucket)
        table = (s["indptr"][:bucket + 1], s["indices"], s["last"][b], s["start"][b])
        return FrameInputs(s["prev"][b], s["row_src"][b], s["pos"][b], s["slots"][b], table,
                           s["cond"][b], s["null"][b], s["alpha"][b], s["noise"][:, b],
                           s["ring"][b] if self.ring is not None else None, s["add"][b])

    def _capture(self, bucket: int) -> None:
        f = self._inputs(bucket)
        # Warm up on a side stream (Triton autotuning/compilation, cuBLAS handles, the head's
        # cached time embeddings) so that capture records only kernel launches. The warm-up
        # writes K/V and ring rows exactly as the replay will, so it changes nothing.
        ring_saved = None if self.ring is None else (self.ring.k.clone(), self.ring.v.clone(),
                                                     self.ring.count.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.compute(f)
        torch.cuda.current_stream().wait_stream(side)
        if ring_saved is not None:
            self._restore_ring(ring_saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records launches only: nothing is written
            out, logits = self.compute(f)
        self._captured[bucket] = (graph, out, logits)

    def _restore_ring(self, saved) -> None:
        self.ring.k.copy_(saved[0])
        self.ring.v.copy_(saved[1])
        self.ring.count.copy_(saved[2])

