"""Shared fixtures for the paged-attention tests: ragged, forked and trimmed streams."""
import numpy as np
import torch
import torch.nn.functional as F

from calm_fast.fast.cache import PagedKVCache


def sdpa_one(q, k, v):
    """q [H, D], k/v [L, Hkv, D] -> [H, D] with grouped heads."""
    rep = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(rep, 1).transpose(0, 1)
    v = v.repeat_interleave(rep, 1).transpose(0, 1)
    return F.scaled_dot_product_attention(q[:, None], k, v)[:, 0]


def build(seed, batch, heads, kv_heads, dim, block_size, backend="cpp"):
    """A cache with ragged streams (some forked, some trimmed) and their true histories."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cache = PagedKVCache(1, 64, block_size, kv_heads, dim, max_streams=16, backend=backend)
    streams, hist = [], []
    for i in range(batch):
        if i > 0 and rng.random() < 0.3:  # share a prefix with the previous stream
            s = cache.fork(streams[-1])
            k, v = [t.clone() for t in hist[-1]]
        else:
            s = cache.new_stream()
            k = v = torch.zeros(0, kv_heads, dim)
        n = int(rng.integers(1, 3 * block_size + 2))
        nk = torch.randn(n, kv_heads, dim, generator=g)
        nv = torch.randn(n, kv_heads, dim, generator=g)
        slots = cache.reserve([s], n)
        cache.write(0, slots, nk, nv)
        k, v = torch.cat([k, nk]), torch.cat([v, nv])
        if rng.random() < 0.4:  # sliding window
            keep = int(rng.integers(1, k.shape[0] + 1))
            cache.trim_front(s, keep)
            k, v = k[-keep:], v[-keep:]
        streams.append(s)
        hist.append((k, v))
    q = torch.randn(batch, heads, dim, generator=g)
    return cache, streams, hist, q


def random_sd(layers=2, d=32, heads=4, kv_heads=4, ff=64, layer_scale=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hd = d // heads
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    sd = {}
    for i in range(layers):
        p = f"layers.{i}."
        sd |= {p + "norm1.weight": 1 + 0.1 * r(d), p + "norm1.bias": 0.1 * r(d),
               p + "norm2.weight": 1 + 0.1 * r(d), p + "norm2.bias": 0.1 * r(d),
               p + "self_attn.in_proj.weight": r((heads + 2 * kv_heads) * hd, d),
               p + "self_attn.out_proj.weight": r(d, heads * hd),
               p + "linear1.weight": r(ff, d), p + "linear2.weight": r(d, ff)}
        if layer_scale:
            sd |= {p + "layer_scale_1.scale": 0.5 + r(d), p + "layer_scale_2.scale": 0.5 + r(d)}
    return sd
