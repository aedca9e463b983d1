"""The one dispatch point: the only module that looks at the C++ extension, Triton, the
tensors' device and ``CALM_FAST_FORCE_REF``.

Rule: Triton on CUDA tensors (kernels/), the C++ fast path on fp32 CPU tensors that need
no gradient, and the plain torch reference when ``CALM_FAST_FORCE_REF=1`` (or when no fast
path applies). The rest of calm_fast asks here (``native_ok``, ``triton_ok``) and calls the
extension only through ``native()``, so forcing the reference reaches every fast path
(python_tests/runtime/test_force_reference.py wraps ``_C`` and the Triton launchers and
checks that text -> audio then calls neither).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from calm_fast.kernels import fused_head as _fh
from calm_fast.kernels import paged_attention as _pa
from calm_fast.kernels import short_context_step as _sc
from calm_fast.kernels.paged_attention import paged_decode_attention_ref  # noqa: F401 (re-export)
from calm_fast.fast.kv_manager_py import PyKVManager
from calm_fast import checks
from calm_fast.errors import ArgumentError
from calm_fast.model import short_context

try:
    from calm_fast import _C
except ImportError:  # the extension is optional at import time; the reference still runs
    _C = None

# CALM_FAST_ISA picks the kernels' instruction set (csrc/isa_kernels.h); one this build
# cannot run on this CPU falls back to the default there, and is said here.
if _C is not None and os.environ.get("CALM_FAST_ISA") not in (None, _C.isa):
    import warnings

    warnings.warn(f"CALM_FAST_ISA={os.environ['CALM_FAST_ISA']!r} is not an instruction set "
                  f"this build runs on this CPU (it runs {', '.join(_C.runnable_isas)}); "
                  f"the kernels run {_C.isa!r}", stacklevel=2)


def _tensors(**named) -> None:
    """The kernels' array arguments are torch tensors (a numpy array or a list would reach
    the extension as an unreadable pybind signature error)."""
    for name, v in named.items():
        checks.instance(name, v, torch.Tensor, "a torch.Tensor")


def force_reference() -> bool:
    return os.environ.get("CALM_FAST_FORCE_REF", "0") not in ("", "0", "false", "False")


def has_native(name: str | None = None) -> bool:
    """The extension is built (with ``name`` when given) and the reference is not forced."""
    return _C is not None and not force_reference() and (name is None or hasattr(_C, name))


def native_ok(*tensors, name: str | None = None, grad_mode: bool = True) -> bool:
    """Whether a C++ kernel may run on ``tensors``: ``has_native(name)``, every tensor fp32
    on CPU without autograd (and, with ``grad_mode``, torch's grad mode off: the kernels
    record no graph)."""
    return (has_native(name) and not (grad_mode and torch.is_grad_enabled())
            and all(t.device.type == "cpu" and t.dtype == torch.float32
                    and not t.requires_grad for t in tensors))


def native():
    """The extension module, for a fast path that has checked ``native_ok`` / ``has_native``
    (tests swap it for a recorder)."""
    if _C is None:
        raise ImportError("the C++ extension calm_fast._C is not built: reinstall calm_fast")
    return _C


def native_info() -> str:
    """One line for ``calm-fast info``."""
    if _C is None:
        return "not built"
    build = "native" if _C.native_build else "portable"
    return (f"yes ({build} build, kernels {_C.isa} of {'/'.join(_C.runnable_isas)}, "
            f"openmp={_C.has_openmp}, bf16 dot products "
            f"{_C.has_bf16_dot}, int8 dot products {_C.has_int8_dot})")


def triton_ok(t: torch.Tensor) -> bool:
    """A Triton kernel may run on ``t``: a CUDA tensor, Triton installed, not forced."""
    return t.is_cuda and _fh.triton is not None and not force_reference()


def cuda_graphs(device) -> bool:
    """Whether frames on ``device`` run as captured CUDA graphs (else eagerly)."""
    return torch.device(device).type == "cuda"


# Below this many bytes of LM weights a frame is too little work to split: on a CPU, from
# the engine's own thread, one thread ran every batch size of the shipped 6.6M-parameter
# TTS faster than two (benchmarks/results/design_notes.md, "engine threads"), while the
# Pocket TTS models (>= 100M parameters, bound by reading their weights) need every core.
SMALL_MODEL_BYTES = 64 << 20


def cpu_layout(plain, step, prefill):
    """The fp32 CPU backbone a scheduler runs: ``plain.split()`` (panel-packed, one C++ call
    per step) or ``plain`` itself (torch op by op), by ``CALM_FAST_CPU_GEMM``: "auto" (the
    default: measured once per process and host by ``fast.calibrate`` for models of at
    least SMALL_MODEL_BYTES; below that ours, where torch's per-op cost dominates), "native"
    or "torch". ``step``/``prefill``: fast.backbone's, to time with. Returns (backbone,
    "native" | "torch")."""
    mode = os.environ.get("CALM_FAST_CPU_GEMM", "auto")
    if mode not in ("auto", "native", "torch"):
        raise ArgumentError(f"CALM_FAST_CPU_GEMM={mode!r}: use auto, native or torch")
    if mode == "torch":
        return plain, "torch"
    split = plain.split()
    if mode == "native" or not has_native("decode_step") or plain.nbytes() < SMALL_MODEL_BYTES:
        return split, "native"
    from calm_fast.fast import calibrate

    choice = calibrate.choose(plain, split, step, prefill)
    return (split, choice) if choice == "native" else (plain, choice)


def engine_threads(model, device="cpu") -> int | None:
    """The intra-op thread count an engine thread should run ``model`` with on ``device``:
    1 for a small model on CPU, None (leave torch's setting) otherwise."""
    if torch.device(device).type != "cpu":
        return None
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1 if nbytes < SMALL_MODEL_BYTES else None


def kv_manager(num_blocks: int, block_size: int, backend: str = "auto"):
    """The block manager: the C++ one (``backend`` "cpp", or "auto" when built and not
    forced to the reference), else the pure-Python twin."""
    if backend not in ("auto", "cpp", "python"):
        raise ArgumentError(f"unknown KV backend {backend!r}: use 'auto', 'cpp' or 'python'")
    block_size = checks.integer("block_size", block_size, 1, 1 << 20)
    num_blocks = checks.integer("num_blocks", num_blocks, 1, (1 << 31) // block_size - 1)
    if backend == "python" or (backend == "auto" and not has_native("KVManager")):
        return PyKVManager(num_blocks, block_size)
    return native().KVManager(num_blocks, block_size)


def head_triton(p, c, x, times=()):
    """The Triton head (kernels/fused_head.py)."""
    return _fh.head_triton(p, c, x, times)


# -- paged single-query decode attention ---------------------------------------------------
def paged_decode_attention(q, k_cache, v_cache, indptr, indices, last_page_len,
                           start=None, scale=None, out=None):
    """Single-query attention of a ragged batch over paged K/V (see the reference)."""
    _tensors(q=q, k_cache=k_cache, v_cache=v_cache, indptr=indptr, indices=indices,
             last_page_len=last_page_len)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if triton_ok(q):
        dev = q.device
        return _pa.paged_decode_attention_triton(
            q, k_cache, v_cache, indptr.to(dev), indices.to(dev), last_page_len.to(dev),
            None if start is None else start.to(dev), scale, out)
    cpu_fast = native_ok(q, k_cache, v_cache, grad_mode=False)
    if not cpu_fast:
        res = paged_decode_attention_ref(q, k_cache, v_cache, indptr, indices,
                                         last_page_len, start, scale)
        if out is None:
            return res
        out.copy_(res)
        return out
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    _C.paged_decode_attention(
        q.numpy(), k_cache.detach().numpy(), v_cache.detach().numpy(),
        indptr.numpy(), indices.numpy(), last_page_len.numpy(),
        None if start is None else start.numpy(), out.numpy(), scale,
    )
    return out


# -- causal sliding-window attention of T rows per stream (the VAE's Transformer) ----------------
def window_attention_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether ``window_attention`` has its C++ path: fp32 CPU tensors without autograd, the
    extension built and the reference not forced (else the caller runs torch: a gather of
    the keys and a masked SDPA, vae.WindowedTransformer)."""
    return (native_ok(q, k_cache, name="window_attention", grad_mode=False)
            and window_head_dim_ok(q.shape[-1]))


def window_head_dim_ok(head_dim: int) -> bool:
    """The C++ window attention keeps a head's row in 1-8 vectors of 16 floats."""
    return head_dim in (16, 32, 64, 128)


def window_attention(q, k_cache, v_cache, table, window: int, scale=None) -> torch.Tensor:
    """q [B, T, H, D], the T new rows of each stream (their K/V already in the pages, last):
    row t attends to its stream's last ``window`` rows up to itself. k/v_cache: one layer's
    [blocks, block_size, kv_heads, D]; table = cache.page_table(streams). The C++ kernel
    (csrc/window_attention_cpu.cpp) on fp32 CPU, else the reference."""
    _tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    window = checks.integer("window", window, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not window_attention_ok(q, k_cache):
        return window_attention_ref(q, k_cache, v_cache, table, window, scale)
    indptr, indices, last, start = table
    q = q.contiguous()
    out = torch.empty_like(q)
    _C.window_attention(q.numpy(), k_cache.numpy(), v_cache.numpy(), indptr.numpy(),
                        indices.numpy(), last.numpy(), None if start is None else start.numpy(),
                        int(window), scale, out.numpy(), torch.get_num_threads())
    return out


def window_attention_ref(q, k_cache, v_cache, table, window: int, scale=None) -> torch.Tensor:
    """The same in torch: every stream's live rows gathered with one index op, left-padded
    to the longest (padding points at a real row and is masked), then a masked SDPA."""
    indptr, indices, last, start = (t.long().cpu() for t in table)
    B, T, H, D = q.shape
    bs, Hk = k_cache.shape[1], k_cache.shape[2]
    start = torch.zeros_like(last) if start is None else start
    n = (indptr[1:B + 1] - indptr[:B] - 1) * bs + last[:B] - start[:B]  # live rows
    if bool((n < T).any()):
        raise ValueError(f"every stream needs its {T} query rows in the cache")
    L = int(n.max())
    off = L - n  # left padding per stream
    u = start[:B, None] + (torch.arange(L)[None] - off[:, None]).clamp(min=0)
    rows = (indices[indptr[:B, None] + u // bs] * bs + u % bs).reshape(-1).to(q.device)
    K = k_cache.reshape(-1, Hk, D)[rows].view(B, L, Hk, D)
    V = v_cache.reshape(-1, Hk, D)[rows].view(B, L, Hk, D)
    if H != Hk:
        K, V = K.repeat_interleave(H // Hk, 2), V.repeat_interleave(H // Hk, 2)
    qpos = (n - T)[:, None, None] + torch.arange(T)[None, :, None]  # [B, T, 1]
    kpos = torch.arange(L)[None, None] - off[:, None, None]  # [B, 1, L]
    mask = ((kpos >= 0) & (kpos <= qpos) & (kpos > qpos - window))[:, None].to(q.device)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2).to(q.dtype),
                                       V.transpose(1, 2).to(q.dtype), attn_mask=mask,
                                       scale=scale)
    return a.transpose(1, 2)


# -- every layer of a Transformer step in one call, fp32 CPU ------------------------------------
def native_decode_step_ok(x: torch.Tensor, k_cache: torch.Tensor,
                          windowed: bool = False) -> bool:
    """Whether ``native_decode_step`` applies: the extension is built, the reference is not
    forced, and x / the cache are fp32 CPU tensors without autograd; ``windowed`` (several
    queries per stream or a window) also needs a head_dim the window attention takes. Any
    row count (it beat op by op from 1 to 64 rows: benchmarks/results/design_notes.md)."""
    return (native_ok(x, k_cache, name="decode_step", grad_mode=False) and x.shape[0] >= 1
            and (not windowed or window_head_dim_ok(k_cache.shape[-1])))


def native_decode_step(layers, heads, kv_heads, eps, x, cos, sin, k_cache, v_cache, slots,
                       table, queries: int = 1, window: int = 0,
                       last_kv_only: bool = False, last_rows_only: bool = False) -> torch.Tensor:
    """Every layer of one Transformer step in one C++ call (csrc/decode_step_cpu.cpp):
    ``layers`` as numpy tuples (fast_backbone.native_layers), x [B, d] (copied, then
    updated), cos/sin [B, Dh/2], the full [layers, blocks, ...] K/V pools, int64 ``slots``
    [B] and ``table`` = cache.page_table(...). Returns the new x. Each row is one stream's
    next position (the backbone), or with ``queries`` = T the rows are streams of T
    consecutive rows attending causally over their stream's last ``window`` rows (0: all:
    a prefill; W: the VAE's windowed Transformer). ``last_kv_only``: the last layer stops
    once its K/V are written (the returned rows are then not the output); ``last_rows_only``
    (no window): it finishes only each stream's last row (the only output rows then)."""
    _tensors(x=x, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slots=slots)
    out = x.detach().clone(memory_format=torch.contiguous_format)
    indptr, indices, last, start = table
    _C.decode_step(layers, heads, kv_heads, eps, out.numpy(), cos.contiguous().numpy(),
                   sin.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                   slots.to(torch.int64).contiguous().numpy(), indptr.numpy(),
                   indices.numpy(), last.numpy(), None if start is None else start.numpy(),
                   queries=queries, window=window, last_kv_only=last_kv_only,
                   last_rows_only=last_rows_only, threads=torch.get_num_threads())
    return out


# -- short-context ring step attention ---------------------------------------------------------
def ring_attention(q, k, v, ring_k, ring_v, slots, pos, max_period=10_000.0):
    """RoPE + ring write + attention of one short-context step (kernels/short_context_step)."""
    if triton_ok(q):
        return _sc.ring_attention_triton(q, k, v, ring_k, ring_v, slots, pos, max_period)
    return short_context.ring_attention(q, k, v, ring_k, ring_v, slots, pos, max_period)
