"""VAE decoding on the fast CPU paths: the windowed Transformer as one native step over a
paged cache, the SEANet decoder as channels-last C++ convs (fast/seanet.py).

``decode(vae, latents, state)`` equals ``vae.decode(latents, state)`` (the pure-torch
reference in codec/vae.py) within float rounding, offline and streamed in chunks of any
size (python_tests/fast/test_vae_fast.py). It runs when the extension is built, the
reference is not forced and the tensors are fp32 CPU without autograd (``applies``);
otherwise it is the reference. A streaming state belongs to the path that started it: the
fast path keeps the windowed Transformer's K/V in ``state.caches`` (a PagedKVCache with a
stream per batch row, trimmed to the window), the reference in ``state.tensors``; the
convs' state is the same tensors on both (fast/seanet.py).
"""
from __future__ import annotations

import torch

from calm_fast.codec.vae import VAE, VAEState, WindowedTransformer
from calm_fast.errors import CacheFullError
from calm_fast.fast import backbone as fb
from calm_fast.fast import ops
from calm_fast.fast import seanet
from calm_fast.fast import istft as fast_istft
from calm_fast.codec.istft import ISTFTVAE
from calm_fast.fast.cache import PagedKVCache
from calm_fast.fast.cpu_linear import cached_for

BLOCK = 16  # rows per cache block of a windowed Transformer's stream


def applies(vae: VAE, x: torch.Tensor | None = None) -> bool:
    """Whether ``decode`` takes the fast path for this VAE (and input ``x``)."""
    if not isinstance(vae, VAE):  # the iSTFT family has no windowed Transformer
        return False
    w = vae.decoder_transformer.transformer
    p = next(vae.parameters()).detach()  # weights: their autograd flag does not matter
    return (ops.native_ok(p, name="decode_step", grad_mode=False)
            and ops.window_head_dim_ok(w.cfg.head_dim)
            and (x is None or ops.native_ok(x, name="decode_step")))


def decode(vae: VAE, latents: torch.Tensor, state: VAEState | None = None) -> torch.Tensor:
    """latents [B, frames, latent_dim] -> wav [B, channels, frames * frame_size]."""
    if isinstance(vae, ISTFTVAE):
        return fast_istft.decode(vae, latents, state)
    if not applies(vae, latents):
        return vae.decode(latents, state)
    vae._check_latents(latents)  # (native_ok: grad mode is off here)
    x = vae.quantizer.output_proj(latents.transpose(1, 2))
    x = vae.upsample(x, state)
    x = window_transformer(vae.decoder_transformer, x,
                           VAEState(x.shape[0]) if state is None else state)
    y = seanet.decode(vae.decoder, x, state)
    return vae.decoder(x, state) if y is None else y


def open_window_cache(mod: WindowedTransformer, streams: int, rows: int,
                      dtype=torch.float32, device="cpu") -> PagedKVCache:
    """A cache for ``streams`` streams of ``mod`` that each write up to ``rows`` rows per call
    (the window's ``context - 1`` kept rows come on top)."""
    c = mod.transformer.cfg
    per_stream = -(-(mod.context - 1 + rows) // BLOCK) + 1
    return PagedKVCache(c.num_layers, streams * per_stream, BLOCK, c.kv_heads, c.head_dim,
                        dtype=dtype, device=device, max_streams=streams)


def window_transformer(mod: WindowedTransformer, x: torch.Tensor,
                       state: VAEState) -> torch.Tensor:
    """``mod(x, state)`` for x [B, C, T] with every layer in one C++ call."""
    if (mod, "k") in state.tensors:
        raise ValueError("this VAEState was started on the reference path "
                         "(codec.vae): keep decoding it there")
    h = x.transpose(1, 2)
    B, T, _ = h.shape
    if mod not in state.caches:
        cache = open_window_cache(mod, B, T, h.dtype, h.device)
        state.caches[mod] = (cache, [cache.new_stream() for _ in range(B)])
    return _stream(mod, h, state).transpose(1, 2)


def _stream(mod: WindowedTransformer, h: torch.Tensor, state: VAEState) -> torch.Tensor:
    B, T, _ = h.shape
    W = mod.context
    cache, ids = state.caches[mod]
    layers = cached_for(mod, "_native_layers", list(mod.transformer.parameters()),
                        lambda: fb.native_layers(fb.pack(mod.transformer).split()))
    shape = fb.pack_shape(mod.transformer)
    # each stream at its own position (the engine's streams join at any frame)
    start = torch.tensor([cache.position(s) for s in ids], device=h.device)
    pos = start[:, None] + torch.arange(T, device=h.device)[None]  # [B, T]
    cos, sin = fb.rope_tables(shape, pos.reshape(-1))
    try:
        slots = cache.reserve(ids, T)  # [B, T]; all or nothing
    except CacheFullError:
        if T == 1:
            raise
        # the cache was sized by the first call: a longer chunk goes in two halves, which is
        # the same computation (causal)
        return torch.cat([_stream(mod, h[:, :T // 2], state),
                          _stream(mod, h[:, T // 2:], state)], 1)
    table = cache.page_table(ids)
    h = ops.native_decode_step(
        layers, shape.heads, shape.kv_heads, shape.eps, h.reshape(B * T, -1),
        cos.reshape(B * T, -1), sin.reshape(B * T, -1), cache.k, cache.v,
        slots.reshape(-1), table, queries=T, window=W).view(B, T, -1)
    for s in ids:  # the next call's first row needs the W - 1 rows before it
        cache.trim_front(s, W - 1)
    return h
