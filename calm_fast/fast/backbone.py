"""The backbone's CPU fast path: a pre-LN RoPE Transformer over PagedKVCache, with packed
weights and ragged positions.

Layer math (the published Pocket TTS / Kyutai stack): h = LN1(x); q, k, v = h W_in (no
bias); RoPE on q, k with (real, imag) pairs interleaved, frequencies max_period^(-2i/D);
x += ls1 * attn(q, K, V) W_out; x += ls2 * gelu_tanh(LN2(x) W1) W2. LayerNorm eps 1e-5.

Why it is fast where the published module is not: weights are pre-transposed once for
``x @ W``; the RoPE tables are computed once per call for the whole batch; K/V go straight
into their paged slots (no concatenation, no masks over a dense buffer); decode attention
is the C++ kernel over the page table; and each stream keeps its own position, so streams
of different lengths share one batched step (the published cache needs equal offsets).

With fp32 CPU weights the whole step is one C++ call (``ops.native_decode_step``), and so
is a prefill (T rows attending causally over the stream): the per-op dispatch that
dominates a small-width step is gone (benchmarks/results/design_notes.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_fast.model import rope
from calm_fast.fast import ops
from calm_fast.fast.cache import PagedKVCache
from calm_fast.fast.cpu_linear import SplitLinear, linear
from calm_fast.fast.int8 import Int8Linear


@dataclass
class PackedLayer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    w_qkv: torch.Tensor  # [d, (H + 2 Hkv) Dh]  (or an Int8Linear, see quantized())
    w_o: torch.Tensor  # [H Dh, d]
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w1: torch.Tensor  # [d, ff]
    w2: torch.Tensor  # [ff, d]
    ls1: torch.Tensor | None = None
    ls2: torch.Tensor | None = None


@dataclass
class PackedBackbone:
    layers: list
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    max_period: float = 10_000.0
    eps: float = 1e-5

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes()
                   for L in self.layers for t in L.__dict__.values()
                   if isinstance(t, (torch.Tensor, Int8Linear, SplitLinear)))

    def to(self, device=None, dtype=None) -> "PackedBackbone":
        """A copy on ``device`` / in ``dtype`` (plain tensor layers only)."""
        def mv(t):
            if t is None:
                return None
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"cannot move a {type(t).__name__} layer: move before "
                                "split() / quantized()")
            return t.to(device=device, dtype=dtype)

        layers = [PackedLayer(**{k: mv(v) for k, v in L.__dict__.items()}) for L in self.layers]
        return PackedBackbone(layers, self.d_model, self.heads, self.kv_heads, self.head_dim,
                              self.max_period, self.eps)

    def _repack(self, make) -> "PackedBackbone":
        layers = [PackedLayer(**{**L.__dict__, **{k: make(getattr(L, k))
                                                  for k in ("w_qkv", "w_o", "w1", "w2")}})
                  for L in self.layers]
        return PackedBackbone(layers, self.d_model, self.heads, self.kv_heads, self.head_dim,
                              self.max_period, self.eps)

    def quantized(self) -> "PackedBackbone":
        """A copy whose four projections per layer run with int8 weights (CPU)."""
        return self._repack(Int8Linear)

    def split(self, bf16: bool = False) -> "PackedBackbone":
        """A copy whose projections run through cpu_linear.SplitLinear (panel-packed fp32,
        every CPU thread at any batch size; the native decode step reads the same panels).
        ``bf16``: the panels hold bf16 weights (half the bytes), the rows are rounded to bf16,
        products and sums are fp32 (cpu_linear)."""
        return self._repack(lambda w: SplitLinear(w, bf16=bf16))

    def make_cache(self, num_blocks: int, block_size: int = 16, max_streams: int = 256,
                   dtype=torch.float32, device="cpu", backend=None) -> PagedKVCache:
        return PagedKVCache(len(self.layers), num_blocks, block_size, self.kv_heads,
                            self.head_dim, dtype=dtype, device=device,
                            max_streams=max_streams, backend=backend)


def pack_transformer(sd: dict, prefix: str = "", heads: int | None = None,
                     kv_heads: int | None = None, max_period: float = 10_000.0) -> PackedBackbone:
    """Pack a state dict in the published ``StreamingTransformer`` layout
    (``layers.{i}.self_attn.in_proj.weight``, ``...out_proj.weight``, ``norm1``, ``norm2``,
    ``linear1``, ``linear2``, optional ``layer_scale_{1,2}.scale``)."""
    g = {k[len(prefix):]: v.detach() for k, v in sd.items() if k.startswith(prefix)}
    n = 1 + max((int(k.split(".")[1]) for k in g if k.startswith("layers.")), default=-1)
    if n == 0:
        raise KeyError(f"no 'layers.<i>.' keys under prefix {prefix!r}")
    if heads is None:
        raise ValueError("heads must be given (the state dict does not record it)")
    kv_heads = kv_heads or heads
    d = g["layers.0.norm1.weight"].shape[0]
    attn_dim = g["layers.0.self_attn.out_proj.weight"].shape[1]
    head_dim = attn_dim // heads
    want = (heads + 2 * kv_heads) * head_dim
    if g["layers.0.self_attn.in_proj.weight"].shape[0] != want:
        raise ValueError(f"in_proj has {g['layers.0.self_attn.in_proj.weight'].shape[0]} "
                         f"outputs, expected {want} for {heads} heads / {kv_heads} kv heads")
    layers = []
    for i in range(n):
        p = f"layers.{i}."
        t = lambda k: g[p + k].t().contiguous()  # noqa: E731
        layers.append(PackedLayer(
            g[p + "norm1.weight"], g[p + "norm1.bias"], t("self_attn.in_proj.weight"),
            t("self_attn.out_proj.weight"), g[p + "norm2.weight"], g[p + "norm2.bias"],
            t("linear1.weight"), t("linear2.weight"),
            g.get(p + "layer_scale_1.scale"), g.get(p + "layer_scale_2.scale")))
    return PackedBackbone(layers, d, heads, kv_heads, head_dim, max_period)


def pack(transformer) -> PackedBackbone:
    """The weights of a ``model.transformer.Transformer`` laid out for the fast prefill and
    step (a copy: re-pack after training)."""
    c = transformer.cfg
    return pack_transformer(transformer.state_dict(), "", c.num_heads, c.kv_heads, c.max_period)


def pack_shape(transformer) -> PackedBackbone:
    """The head layout of a Transformer with no weights (for ``rope_tables``)."""
    c = transformer.cfg
    return PackedBackbone([], c.d_model, c.num_heads, c.kv_heads, c.head_dim, c.max_period)


def rope_tables(p: PackedBackbone, positions: torch.Tensor):
    """The RoPE tables (model.rope) of the backbone's heads at ``positions`` [N]."""
    return rope.rope_tables(p.head_dim, p.max_period, positions)


def rope_rotation(p: PackedBackbone, positions: torch.Tensor) -> torch.Tensor:
    """The same rotation as ``rope_tables`` as complex numbers [N, 1, Dh/2] (cos + i sin)."""
    cos, sin = rope_tables(p, positions)
    return torch.complex(cos, sin)


def _qkv(p: PackedBackbone, L: PackedLayer, x: torch.Tensor, rot: torch.Tensor):
    """q, k (RoPE applied) and v of one layer. q and k are rotated in one complex multiply
    over their shared slice of the projection: 3 ops instead of 2 x 10 (the op-by-op step is
    dispatch bound at small widths)."""
    h = F.layer_norm(x, (p.d_model,), L.ln1_w, L.ln1_b, p.eps)
    qkv = linear(h, L.w_qkv)
    H, Hk, D = p.heads, p.kv_heads, p.head_dim
    B = qkv.shape[0]
    qk = qkv[:, :(H + Hk) * D].reshape(B, H + Hk, D // 2, 2).float()  # bf16 has no complex
    qk = torch.view_as_real(torch.view_as_complex(qk) * rot).view(B, H + Hk, D).to(qkv.dtype)
    return qk[:, :H], qk[:, H:], qkv[:, (H + Hk) * D:].view(B, Hk, D)


def _finish(p: PackedBackbone, L: PackedLayer, x: torch.Tensor, attn: torch.Tensor):
    upd = linear(attn.reshape(x.shape[0], -1), L.w_o)
    x = x + (upd * L.ls1 if L.ls1 is not None else upd)
    h = F.layer_norm(x, (p.d_model,), L.ln2_w, L.ln2_b, p.eps)
    upd = linear(F.gelu(linear(h, L.w1), approximate="tanh"), L.w2)
    return x + (upd * L.ls2 if L.ls2 is not None else upd)


@torch.no_grad()
def step(p: PackedBackbone, cache: PagedKVCache, streams, x: torch.Tensor) -> torch.Tensor:
    """One new row per stream: x [B, d] -> [B, d]. Each stream's row sits at its own
    position (rows already in its cache), so ragged streams batch together."""
    streams = list(streams)
    if x.dim() != 2 or x.shape != (len(streams), p.d_model):
        raise ValueError(f"step input must be [{len(streams)}, {p.d_model}], got {tuple(x.shape)}")
    pos = torch.tensor([cache.position(s) for s in streams], device=x.device)
    slots = cache.reserve(streams, 1)[:, 0]
    return step_rows(p, cache, x, pos, slots, cache.page_table(streams))


def step_rows(p: PackedBackbone, cache: PagedKVCache, x: torch.Tensor, pos: torch.Tensor,
              slots: torch.Tensor, table) -> torch.Tensor:
    """The tensor part of ``step``, with the host bookkeeping done: rows x [B, d] at RoPE
    positions ``pos`` [B], written at cache ``slots`` [B], attending over the page
    ``table`` (``cache.page_table``; the same pages for every layer). No host sync and no
    allocation that depends on values, so a CUDA graph can capture it (frame_step.py)."""
    if ops.native_decode_step_ok(x, cache.k) and (layers := native_layers(p)) is not None:
        cos, sin = rope_tables(p, pos)
        return ops.native_decode_step(layers, p.heads, p.kv_heads, p.eps, x, cos[:, 0],
                                      sin[:, 0], cache.k, cache.v, slots, table)
    rot = rope_rotation(p, pos)
    for li, L in enumerate(p.layers):
        q, k, v = _qkv(p, L, x, rot)
        cache.write(li, slots, k, v)
        x = _finish(p, L, x, cache.attend(li, q, None, table=table))
    return x


def native_layers(p: PackedBackbone):
    """The layers as the numpy tuples ``ops.native_decode_step`` reads, made once and kept
    on ``p`` (a tensor's ``.numpy()`` call, 60 of them per step, is not free); None unless every
    projection is a native panel-packed CPU linear: ``SplitLinear`` (``split()``, fp32 or
    bf16) or ``Int8Linear`` (``quantized()``); plain or GPU weights run op by op."""
    cached = p.__dict__.get("_native")
    if cached is not None:
        return cached or None
    out = []
    for L in p.layers:
        projs = [getattr(L, k) for k in ("w_qkv", "w_o", "w1", "w2")]
        vecs = [getattr(L, k) for k in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "ls1", "ls2")]
        if not all(isinstance(w, (SplitLinear, Int8Linear)) and w.native and w.b is None
                   for w in projs) \
                or not ops.native_ok(*[v for v in vecs if v is not None], grad_mode=False):
            out = []
            break
        arr = lambda t: None if t is None else t.detach().contiguous().numpy()  # noqa: E731
        ln1_w, ln1_b, ln2_w, ln2_b, ls1, ls2 = map(arr, vecs)
        w_qkv, w_o, w1, w2 = (w.native_panels() if isinstance(w, Int8Linear) else w.panels.numpy()
                              for w in projs)
        out.append((ln1_w, ln1_b, w_qkv, w_o, ln2_w, ln2_b, w1, w2, ls1, ls2))
    p.__dict__["_native"] = out
    return out or None


@torch.no_grad()
def prefill(p: PackedBackbone, cache: PagedKVCache, stream: int, x: torch.Tensor,
            outputs: bool = True) -> torch.Tensor | None:
    """T new rows of one stream: x [T, d] -> [T, d], causal over its cached rows too.
    ``outputs=False``: only fill the cache (a prefix whose outputs nobody reads): the last
    layer stops once its K/V are written, which skips its attention, output projection and
    feed-forward, ~12% of the prefill's FLOPs at `pocket` shapes. Returns None then."""
    if x.dim() != 2 or x.shape[1] != p.d_model or x.shape[0] == 0:
        raise ValueError(f"prefill input must be [T>0, {p.d_model}], got {tuple(x.shape)}")
    if ops.native_decode_step_ok(x, cache.k, windowed=True) and \
            (layers := native_layers(p)) is not None:
        # every layer in one C++ call: the T rows attend causally over the whole stream
        return _native_rounds(p, layers, cache, [(stream, x)], outputs)[0]
    T = x.shape[0]
    pos = cache.position(stream) + torch.arange(T, device=x.device)
    slots = cache.reserve([stream], T)[0]
    rot = rope_rotation(p, pos)
    rep = p.heads // p.kv_heads
    for li, L in enumerate(p.layers):
        q, k, v = _qkv(p, L, x, rot)
        cache.write(li, slots, k, v)
        if not outputs and li == len(p.layers) - 1:
            return None
        K, V = cache.gather(li, stream)  # [Lk, Hkv, D], the new rows last
        Lk = K.shape[0]
        # query i (absolute start + i) sees keys up to index Lk - T + i
        mask = (torch.arange(Lk, device=x.device)[None] <=
                (Lk - T + torch.arange(T, device=x.device))[:, None])
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), K.repeat_interleave(rep, 1).transpose(0, 1),
            V.repeat_interleave(rep, 1).transpose(0, 1), attn_mask=mask)
        x = _finish(p, L, x, attn.transpose(0, 1))
    return x


def prefill_many(p: PackedBackbone, cache: PagedKVCache, items, outputs=False):
    """Prefill several streams at once: ``items`` is [(stream, x [T_i, d])]. Each stream gets
    the K/V (and, with ``outputs``, the rows) that ``prefill`` of its own rows gives. On the
    native path the streams go through in rounds of equal row counts (a round takes the
    shortest remaining count from every stream still open), each round one C++ call over all
    of them: the weights are read once per round instead of once per stream, which is what a
    prefill of a few text rows is bound by. Returns [out_i] (None each when not ``outputs``).

    ``outputs="last"``: only each stream's last row [d] is wanted (its next frame reads
    it); the native last layer then finishes only the rounds' last rows."""
    items = list(items)
    if outputs not in (False, True, "last"):
        raise ValueError(f"outputs must be False, True or 'last', got {outputs!r}")
    for _, x in items:
        if x.dim() != 2 or x.shape[1] != p.d_model or x.shape[0] == 0:
            raise ValueError(f"prefill input must be [T>0, {p.d_model}], got {tuple(x.shape)}")
    if len({s for s, _ in items}) != len(items):
        raise ValueError("prefill_many: each stream at most once")
    layers = None
    if items and ops.native_decode_step_ok(items[0][1], cache.k, windowed=True):
        layers = native_layers(p)
    if layers is None:
        outs = [prefill(p, cache, s, x, bool(outputs)) for s, x in items]
        return [o[-1] for o in outs] if outputs == "last" else outs
    return _native_rounds(p, layers, cache, items, outputs)


def _native_rounds(p: PackedBackbone, layers, cache: PagedKVCache, items, outputs):
    """The native prefill of [(stream, x)]: rounds of the shortest remaining row count c
    from every stream still open, each one ``decode_step(queries=c)`` call over them (one
    stream: one call over its T rows). With ``outputs="last"`` every round finishes its
    streams' last rows only (a round always ends some stream; the others' rows are unread)."""
    done = [0] * len(items)
    outs = [[] for _ in items]
    last = outputs == "last"
    while True:
        open_ = [i for i, (_, x) in enumerate(items) if done[i] < x.shape[0]]
        if not open_:
            break
        c = min(items[i][1].shape[0] - done[i] for i in open_)
        streams = [items[i][0] for i in open_]
        x = torch.cat([items[i][1][done[i]:done[i] + c] for i in open_])
        pos = torch.cat([cache.position(s) + torch.arange(c) for s in streams]).to(x.device)
        slots = cache.reserve(streams, c).reshape(-1)
        cos, sin = rope_tables(p, pos)
        # without outputs the last layer stops once its K/V are written
        y = ops.native_decode_step(layers, p.heads, p.kv_heads, p.eps, x, cos[:, 0], sin[:, 0],
                                   cache.k, cache.v, slots, cache.page_table(streams),
                                   queries=c, window=0, last_kv_only=not outputs,
                                   last_rows_only=last)
        for j, i in enumerate(open_):
            if last:
                outs[i] = [y[(j + 1) * c - 1]]
            elif outputs:
                outs[i].append(y[j * c:(j + 1) * c])
            done[i] += c
    if last:
        return [o[0] for o in outs]
    return [torch.cat(o) if outputs else None for o in outs]
