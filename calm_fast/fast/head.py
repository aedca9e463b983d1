"""The AdaLN head's packed weights and its CPU paths (the consistency / LSD head of CALM).

The head maps (condition c from the backbone, time(s), noisy latent x) to a flow / a
consistency output. Over one packed weight layout (``PackedHead``, made by ``pack_head``
from a state dict in the published ``flow_net.*`` key layout):

* ``head_ref``   : plain torch, op for op the published module (the oracle);
* ``head_cpu``   : the CPU fast path: the same math with the per-op overhead removed;
* ``calm_fast.kernels.fused_head.head_triton``: the GPU path (ops.head picks).

Why packing pays: every ``adaLN_modulation`` starts with SiLU(y) of the *same* y, so all
shift/scale/gate vectors of all blocks come from ONE matmul against concatenated weights
instead of 7 small ones; the time embedding depends only on the step's (s, t), so it is
computed once per schedule and reused for every frame; weights are stored pre-transposed
for ``x @ W`` and never copied again. Timings: benchmarks/results/fused_head.csv.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from calm_fast.fast import ops
from calm_fast.fast.cpu_linear import SplitLinear, linear
from calm_fast.fast.int8 import Int8Linear
from calm_fast.model.sampling import lsd_sample


@dataclass
class PackedHead:
    """Head weights laid out for the fused paths (all tensors on one device/dtype)."""

    width: int
    in_dim: int
    out_dim: int
    n_blocks: int
    w_in: torch.Tensor  # [in_dim, W]
    b_in: torch.Tensor
    w_cond: torch.Tensor  # [cond_dim, W]
    b_cond: torch.Tensor
    time_mlps: list  # per time condition: (freqs, w0 [F, W], b0, w2 [W, W], b2, alpha, eps)
    w_ada: torch.Tensor  # [W, n_blocks * 3W + 2W]: (shift, scale, gate) per block, then final
    b_ada: torch.Tensor
    ln_w: torch.Tensor  # [n_blocks, W] (the blocks' LayerNorm is affine)
    ln_b: torch.Tensor
    w1: torch.Tensor  # [n_blocks, W, W]
    b1: torch.Tensor  # [n_blocks, W]
    w2: torch.Tensor
    b2: torch.Tensor
    w_out: torch.Tensor  # [W, out_dim]
    b_out: torch.Tensor
    ln_eps: float = 1e-6
    _temb_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_time(self) -> int:
        return len(self.time_mlps)

    @property
    def cond_dim(self) -> int:
        w = self.w_cond
        return w.shape[0] if isinstance(w, torch.Tensor) else w.in_features

    def to(self, device=None, dtype=None) -> "PackedHead":
        def mv(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        kw = {k: mv(v) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        tm = [tuple(mv(t) if isinstance(t, torch.Tensor) else t for t in m)
              for m in self.time_mlps]
        return PackedHead(self.width, self.in_dim, self.out_dim, self.n_blocks,
                          time_mlps=tm, ln_eps=self.ln_eps, **kw)

    def nbytes(self) -> int:
        """Bytes of weights one head evaluation reads (time MLPs excluded: cached)."""
        total = 0
        for v in self.__dict__.values():
            for t in (v if isinstance(v, list) and v and hasattr(v[0], "nbytes") else [v]):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
                elif hasattr(t, "nbytes") and callable(t.nbytes):
                    total += t.nbytes()
        return total

    def _repack(self, make) -> "PackedHead":
        """A copy whose matmuls are ``make(w, b)`` callables with the bias folded in
        (``head_cpu`` only); the time MLPs stay plain tensors (cached per schedule)."""
        q = PackedHead(**{k: v for k, v in self.__dict__.items() if k != "_temb_cache"})
        q.w_in, q.w_cond = make(self.w_in, self.b_in), make(self.w_cond, self.b_cond)
        q.w_ada, q.w_out = make(self.w_ada, self.b_ada), make(self.w_out, self.b_out)
        q.w1 = [make(w, b) for w, b in zip(self.w1, self.b1)]
        q.w2 = [make(w, b) for w, b in zip(self.w2, self.b2)]
        q.b1 = q.b2 = None  # now inside the ops (nbytes must not count them twice)
        for name in ("b_in", "b_cond", "b_ada", "b_out"):
            setattr(q, name, None)
        return q

    def quantized(self) -> "PackedHead":
        """A copy whose matmuls use int8 weights (fast/int8.py, CPU; ``head_cpu`` only)."""
        return self._repack(Int8Linear)

    def check(self, c: torch.Tensor, x: torch.Tensor) -> None:
        """Shapes of a call's condition c [B, cond_dim] and input x [B, in_dim]."""
        _check(self, c, x)

    def time_embedding_at(self, times: tuple) -> torch.Tensor:
        """The cached [1, W] time embedding of scalar times (every path shares it)."""
        return cached_time_embedding(self, times)

    def split(self, bf16: bool = False) -> "PackedHead":
        """A copy whose matmuls use every CPU thread at decode batch sizes
        (calm_fast.fast.cpu_linear.SplitLinear; ``head_cpu`` only); ``bf16``: bf16 weights and
        rows, fp32 sums (cpu_linear)."""
        return self._repack(lambda w, b: SplitLinear(w, b, bf16=bf16))


def pack_head(sd: dict, prefix: str = "") -> PackedHead:
    """Pack a head state dict in the published ``SimpleMLPAdaLN`` key layout.

    Keys (after ``prefix``): ``input_proj``, ``cond_embed``, ``time_embed.{i}.mlp.{0,2,3}``
    and ``time_embed.{i}.freqs``, ``res_blocks.{i}.{in_ln,mlp.0,mlp.2,adaLN_modulation.1}``,
    ``final_layer.{linear,adaLN_modulation.1}``.
    """
    g = {k[len(prefix):]: v.detach() for k, v in sd.items() if k.startswith(prefix)}
    missing = [k for k in ("input_proj.weight", "cond_embed.weight", "final_layer.linear.weight")
               if k not in g]
    if missing:
        raise KeyError(f"not a SimpleMLPAdaLN state dict (prefix {prefix!r}): missing {missing}")
    n_blocks = 1 + max((int(k.split(".")[1]) for k in g if k.startswith("res_blocks.")),
                       default=-1)
    n_time = 1 + max((int(k.split(".")[1]) for k in g if k.startswith("time_embed.")),
                     default=-1)
    W, in_dim = g["input_proj.weight"].shape
    t = lambda k: g[k].t().contiguous()  # noqa: E731  (Linear weight -> x @ W layout)
    blk = lambda i, k: g[f"res_blocks.{i}.{k}"]  # noqa: E731
    time_mlps = [(g[f"time_embed.{i}.freqs"], t(f"time_embed.{i}.mlp.0.weight"),
                  g[f"time_embed.{i}.mlp.0.bias"], t(f"time_embed.{i}.mlp.2.weight"),
                  g[f"time_embed.{i}.mlp.2.bias"], g[f"time_embed.{i}.mlp.3.alpha"], 1e-5)
                 for i in range(n_time)]
    ada_w = [blk(i, "adaLN_modulation.1.weight") for i in range(n_blocks)]
    ada_b = [blk(i, "adaLN_modulation.1.bias") for i in range(n_blocks)]
    ada_w.append(g["final_layer.adaLN_modulation.1.weight"])
    ada_b.append(g["final_layer.adaLN_modulation.1.bias"])
    stack = lambda k: torch.stack([blk(i, k) for i in range(n_blocks)])  # noqa: E731
    return PackedHead(
        width=W, in_dim=in_dim, out_dim=g["final_layer.linear.weight"].shape[0],
        n_blocks=n_blocks,
        w_in=t("input_proj.weight"), b_in=g["input_proj.bias"],
        w_cond=t("cond_embed.weight"), b_cond=g["cond_embed.bias"], time_mlps=time_mlps,
        w_ada=torch.cat(ada_w).t().contiguous(), b_ada=torch.cat(ada_b),
        ln_w=stack("in_ln.weight"), ln_b=stack("in_ln.bias"),
        w1=stack("mlp.0.weight").transpose(1, 2).contiguous(), b1=stack("mlp.0.bias"),
        w2=stack("mlp.2.weight").transpose(1, 2).contiguous(), b2=stack("mlp.2.bias"),
        w_out=t("final_layer.linear.weight"), b_out=g["final_layer.linear.bias"],
    )


# -- shared pieces ---------------------------------------------------------------------------
def time_embedding(p: PackedHead, ts) -> torch.Tensor | None:
    """Mean over the time conditions of MLP(cos/sin features), each ending in the head's
    variance-based RMSNorm (unbiased variance, as published). ts: list of [B, 1]."""
    if p.n_time == 0:
        return None
    if len(ts) != p.n_time:
        raise ValueError(f"the head takes {p.n_time} time input(s), got {len(ts)}")
    total = 0
    for (freqs, w0, b0, w2, b2, alpha, eps), t in zip(p.time_mlps, ts):
        args = t * freqs.to(t.dtype)
        e = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        e = F.silu(e @ w0 + b0) @ w2 + b2
        e = e * (alpha * torch.rsqrt(eps + e.var(dim=-1, keepdim=True)))
        total = total + e
    return total / p.n_time


def cached_time_embedding(p: PackedHead, times: tuple) -> torch.Tensor:
    """Time embedding of scalar times (s, t, ...), computed once per schedule: [1, W]."""
    if times not in p._temb_cache:
        w0 = p.time_mlps[0][1]  # fp32 even in a quantized head
        ts = [torch.full((1, 1), float(v), dtype=w0.dtype, device=w0.device) for v in times]
        p._temb_cache[times] = time_embedding(p, ts)
    return p._temb_cache[times]


def _check(p: PackedHead, c: torch.Tensor, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != p.in_dim:
        raise ValueError(f"head input x must be [B, {p.in_dim}], got {tuple(x.shape)}")
    if c.dim() != 2 or c.shape[0] != x.shape[0] or c.shape[1] != p.cond_dim:
        raise ValueError(f"head condition c must be [{x.shape[0]}, {p.cond_dim}], "
                         f"got {tuple(c.shape)}")


# -- reference --------------------------------------------------------------------------------
def _mm(x, w, b):
    """x @ w + b for a plain weight; a packed one (SplitLinear, Int8Linear) holds its bias."""
    if not isinstance(w, torch.Tensor):
        return w(x)
    return x @ w if b is None else x @ w + b


def _block_bias(b, i):
    return None if b is None else b[i]


def head_ref(p: PackedHead, c: torch.Tensor, x: torch.Tensor, ts=()) -> torch.Tensor:
    """Op-for-op reference. c [B, cond_dim], x [B, in_dim], ts: list of [B, 1] times. Packed
    (split / int8) weights run as their callables, which carry their bias."""
    _check(p, c, x)
    W = p.width
    y = _mm(c, p.w_cond, p.b_cond)
    temb = time_embedding(p, list(ts))
    if temb is not None:
        y = y + temb
    h = _mm(x, p.w_in, p.b_in)
    mods = _mm(F.silu(y), p.w_ada, p.b_ada)
    for i in range(p.n_blocks):
        shift, scale, gate = mods[:, 3 * W * i:3 * W * (i + 1)].chunk(3, dim=-1)
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        n = (h - mean) / torch.sqrt(var + p.ln_eps) * p.ln_w[i] + p.ln_b[i]
        n = n * (1 + scale) + shift
        h = h + gate * _mm(F.silu(_mm(n, p.w1[i], _block_bias(p.b1, i))), p.w2[i],
                           _block_bias(p.b2, i))
    shift, scale = mods[:, 3 * W * p.n_blocks:].chunk(2, dim=-1)
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    n = (h - mean) / torch.sqrt(var + p.ln_eps) * (1 + scale) + shift
    return _mm(n, p.w_out, p.b_out)


# -- CPU fast path ------------------------------------------------------------------------------
def head_cpu(p: PackedHead, c: torch.Tensor, x: torch.Tensor, times: tuple = ()) -> torch.Tensor:
    """Same math as ``head_ref`` for scalar times shared by the batch, fewer and fused ops.

    One GEMM for every modulation, native layer_norm, addmm with pre-transposed weights,
    in-place epilogues, and the cached time embedding.
    """
    _check(p, c, x)
    W = p.width
    y = linear(c, p.w_cond, p.b_cond)
    if p.n_time:
        y += cached_time_embedding(p, tuple(times))
    mods = linear(F.silu(y), p.w_ada, p.b_ada)
    h = linear(x, p.w_in, p.b_in)
    for i in range(p.n_blocks):
        m = mods[:, 3 * W * i:3 * W * (i + 1)]
        n = F.layer_norm(h, (W,), p.ln_w[i], p.ln_b[i], p.ln_eps)
        n = torch.addcmul(m[:, :W], n, m[:, W:2 * W] + 1)
        u = F.silu(linear(n, p.w1[i], _block_bias(p.b1, i)), inplace=True)
        h = torch.addcmul(h, m[:, 2 * W:], linear(u, p.w2[i], _block_bias(p.b2, i)))
    m = mods[:, 3 * W * p.n_blocks:]
    n = F.layer_norm(h, (W,), None, None, p.ln_eps)
    n = torch.addcmul(m[:, :W], n, m[:, W:] + 1)
    return linear(n, p.w_out, p.b_out)


def head(p: PackedHead, c: torch.Tensor, x: torch.Tensor, times: tuple = ()) -> torch.Tensor:
    """The packed head at scalar times: Triton on CUDA, ``head_cpu`` elsewhere (also for
    packed int8 / split weights), the op-for-op ``head_ref`` when the reference is forced."""
    if ops.force_reference():
        ts = [torch.full((x.shape[0], 1), float(t), dtype=x.dtype, device=x.device)
              for t in times]
        return head_ref(p, c, x, ts)
    if ops.triton_ok(x) and isinstance(p.w_in, torch.Tensor):
        return ops.head_triton(p, c, x, times)
    return head_cpu(p, c, x, times)


# -- LSD decoding with the fused head -----------------------------------------------------------
def lsd_decode(head_fn, p: PackedHead, c: torch.Tensor, noise: torch.Tensor,
               steps: int = 1) -> torch.Tensor:
    """n-step LSD flow-map decoding (calm_fast.model.sampling.lsd_sample) with a fused head:
    ``head_fn`` is one of head_cpu / head_triton."""
    return lsd_sample(lambda cc, x, times: head_fn(p, cc, x, times), c, noise, steps)
