"""Causal sliding-window attention of T rows per stream over the pages
(csrc/window_attention_cpu.cpp, ops.window_attention) against SDPA on each stream's true
history; its torch twin; the windowed Transformer step in one native call; bad inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calm_fast import _C
from calm_fast.fast import ops

from paged_fixtures import build


def expected(q, hist, window):
    """q [B, T, H, D]; each stream's last T history rows are its queries' own keys."""
    outs = []
    T = q.shape[1]
    for b, (k, v) in enumerate(hist):
        n = k.shape[0]
        rep = q.shape[2] // k.shape[1]
        kk, vv = (t.repeat_interleave(rep, 1).transpose(0, 1) for t in (k, v))  # [H, n, D]
        qpos = torch.arange(n - T, n)[:, None]
        kpos = torch.arange(n)[None]
        mask = (kpos <= qpos) & (kpos > qpos - window)
        outs.append(F.scaled_dot_product_attention(q[b].transpose(0, 1), kk, vv,
                                                   attn_mask=mask).transpose(0, 1))
    return torch.stack(outs)


def ragged(seed, T, heads, kv_heads, dim, block_size=4, batch=5):
    """build()'s ragged / forked / trimmed streams, keeping those with >= T rows."""
    cache, streams, hist, _ = build(seed, batch, heads, kv_heads, dim, block_size)
    keep = [i for i, (k, _) in enumerate(hist) if k.shape[0] >= T]
    assert keep, "the fixture made no stream long enough"
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(len(keep), T, heads, dim, generator=g)
    return cache, [streams[i] for i in keep], [hist[i] for i in keep], q


@pytest.mark.parametrize("seed,T,heads,kv_heads,dim,window", [
    (0, 1, 4, 4, 16, 3),
    (1, 3, 4, 2, 32, 5),
    (2, 4, 2, 1, 64, 100),  # window past every stream's start
    (3, 2, 8, 8, 128, 1),   # each row sees itself only
    (4, 5, 4, 4, 64, 6),
])
def test_kernel_matches_sdpa_on_ragged_forked_trimmed_streams(seed, T, heads, kv_heads, dim,
                                                              window):
    cache, streams, hist, q = ragged(seed, T, heads, kv_heads, dim)
    table = cache.page_table(streams)
    want = expected(q, hist, window)
    got = ops.window_attention(q, cache.k[0], cache.v[0], table, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = ops.window_attention_ref(q, cache.k[0], cache.v[0], table, window)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_same_rows(threads):
    cache, streams, hist, q = ragged(7, 3, 4, 2, 64, batch=6)
    indptr, indices, last, start = (t.numpy() for t in cache.page_table(streams))
    out = np.empty_like(q.numpy())
    _C.window_attention(q.numpy(), cache.k[0].numpy(), cache.v[0].numpy(), indptr, indices,
                        last, start, 4, 64 ** -0.5, out, threads)
    torch.testing.assert_close(torch.from_numpy(out), expected(q, hist, 4), rtol=1e-5,
                               atol=1e-5)


def test_force_reference_env(monkeypatch):
    cache, streams, hist, q = ragged(5, 2, 4, 4, 32)
    monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    assert not ops.window_attention_ok(q, cache.k)
    got = ops.window_attention(q, cache.k[0], cache.v[0], cache.page_table(streams), 3)
    torch.testing.assert_close(got, expected(q, hist, 3), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    cache, streams, hist, q = ragged(1, 3, 4, 2, 32)
    indptr, indices, last, start = (t.numpy() for t in cache.page_table(streams))
    k, v = cache.k[0].numpy(), cache.v[0].numpy()
    out = np.empty_like(q.numpy())

    def call(**kw):
        a = dict(q=q.numpy(), k_cache=k, v_cache=v, indptr=indptr, indices=indices,
                 last_page_len=last, start=start, window=4, scale=0.1, out=out)
        a.update(kw)
        _C.window_attention(**a)

    with pytest.raises(ValueError, match="fewer than its 40 queries"):
        call(q=np.zeros((q.shape[0], 40, 4, 32), np.float32),
             out=np.zeros((q.shape[0], 40, 4, 32), np.float32))
    with pytest.raises(ValueError, match="head_dim 16, 32, 64 or 128"):
        call(q=np.zeros((1, 1, 4, 8), np.float32), k_cache=np.zeros((4, 4, 2, 8), np.float32),
             v_cache=np.zeros((4, 4, 2, 8), np.float32), out=np.zeros((1, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(q=np.zeros((q.shape[0], 3, 3, 32), np.float32),
             out=np.zeros((q.shape[0], 3, 3, 32), np.float32))
    with pytest.raises(ValueError, match="must match q"):
        call(out=np.zeros((1, 1, 4, 32), np.float32))
    with pytest.raises(ValueError, match="window and T"):
        call(window=0)
    with pytest.raises(ValueError, match="page index"):
        call(indices=np.full_like(indices, 10_000))
    with pytest.raises(ValueError, match="dtype"):
        call(q=q.numpy().astype(np.float64))
    with pytest.raises(ValueError, match="query rows"):
        ops.window_attention_ref(torch.zeros(q.shape[0], 40, 4, 32), cache.k[0], cache.v[0],
                                 cache.page_table(streams), 4)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 5, 16])
def test_windowed_transformer_native_step_equals_layer_by_layer(monkeypatch, T):
    """The VAE's windowed Transformer, streamed past its window with rows of varying count:
    every layer in one native call (queries=T) == layer by layer with the C++ attention ==
    the torch reference."""
    from calm_fast.codec.vae import VAE, VAEState, vae_preset

    torch.manual_seed(T)
    vae = VAE(vae_preset("tiny")).eval()
    tr = vae.decoder_transformer
    states = [VAEState(3) for _ in range(3)]
    for step in range(6):  # 6 x up to 16 rows: past the 12-row window
        x = torch.randn(3, vae.cfg.dimension, T + step % 3)
        native = tr(x, states[0])
        with monkeypatch.context() as m:
            m.setattr(ops, "native_decode_step_ok", lambda *a, **k: False)
            layered = tr(x, states[1])
            m.setenv("CALM_FAST_FORCE_REF", "1")
            ref = tr(x, states[2])
        torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layered, ref, rtol=1e-5, atol=1e-5)


def test_windowed_native_step_rejects_streams_shorter_than_their_queries():
    from calm_fast.fast import backbone as fb

    from paged_fixtures import random_sd

    def call(p, queries, window, heads):
        cache = p.make_cache(8, 4)
        s = cache.new_stream()
        slots = cache.reserve([s], 2)[0]
        cs = torch.ones(4, 16 // heads)
        ops.native_decode_step(fb.native_layers(p), heads, heads, 1e-5, torch.zeros(4, 32),
                               cs, cs, cache.k, cache.v, torch.cat([slots, slots]),
                               cache.page_table([s]), queries=queries, window=window)
        return cache

    p = fb.pack_transformer(random_sd(layers=1), heads=2).split()  # head_dim 16
    with pytest.raises(ValueError, match="fewer than its 4 queries"):
        call(p, 4, 3, 2)
    with pytest.raises(ValueError, match="not streams of 3 queries"):
        call(p, 3, 0, 2)
    with pytest.raises(ValueError, match="head_dim 16, 32, 64 or 128, got 8"):
        call(fb.pack_transformer(random_sd(layers=1), heads=4).split(), 2, 3, 4)
