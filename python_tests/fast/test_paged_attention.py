"""The C++ CPU paged decode attention against SDPA on each stream's own K/V history."""
import numpy as np
import pytest
import torch

from calm_fast import _C
from calm_fast.fast import ops
from calm_fast.fast.cache import PagedKVCache

from paged_fixtures import build, sdpa_one


@pytest.mark.parametrize("seed", range(12))
def test_cpu_kernel_matches_sdpa_on_ragged_shared_and_trimmed_streams(seed):
    rng = np.random.default_rng(100 + seed)
    kv_heads = int(rng.choice([1, 2, 4]))
    heads = kv_heads * int(rng.choice([1, 2, 3]))
    dim = int(rng.choice([8, 16, 64]))
    block_size = int(rng.choice([1, 4, 16]))
    batch = int(rng.integers(1, 6))
    cache, streams, hist, q = build(seed, batch, heads, kv_heads, dim, block_size)
    out = cache.attend(0, q, streams)
    for b, (k, v) in enumerate(hist):
        torch.testing.assert_close(out[b], sdpa_one(q[b], k, v), rtol=1e-5, atol=1e-5)
    # the torch reference over the same pages agrees too
    ref = ops.paged_decode_attention_ref(q, cache.k[0], cache.v[0], *cache.page_table(streams))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _long_streams(lengths, heads=4, kv_heads=2, dim=16, block_size=4, seed=0):
    """A cache holding one stream per length (long ones cross several 64-row chunks, the
    first trimmed so that it starts inside a page), their histories and queries."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, 160, block_size, kv_heads, dim, max_streams=8)
    streams, hist = [], []
    for i, n in enumerate(lengths):
        s = cache.new_stream()
        k, v = torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)
        cache.write(0, cache.reserve([s], n), k, v)
        if i == 0:
            cache.trim_front(s, n - 3)
            k, v = k[3:], v[3:]
        streams.append(s)
        hist.append((k, v))
    return cache, streams, hist, torch.randn(len(lengths), heads, dim, generator=g)


def test_a_streams_attention_has_the_same_bits_on_any_threads_and_in_any_batch():
    """Each stream's rows are cut into 64-row chunks by its own length alone, so neither
    the thread count nor the other streams in the call change its bits (the engine gives
    the LM a different thread count from step to step)."""
    cache, streams, hist, q = _long_streams([200, 1, 64, 65, 130])
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cache.attend(0, q, streams))
            for b, s in enumerate(streams):  # alone in its call
                assert torch.equal(cache.attend(0, q[b:b + 1], [s])[0], outs[0][b])
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    for b, (k, v) in enumerate(hist):
        torch.testing.assert_close(outs[0][b], sdpa_one(q[b], k, v), rtol=1e-5, atol=1e-5)


def test_python_twin_gives_the_same_attention():
    a = build(3, 4, 4, 2, 16, 4, backend="cpp")
    b = build(3, 4, 4, 2, 16, 4, backend="python")
    torch.testing.assert_close(a[0].attend(0, a[3], a[1]), b[0].attend(0, b[3], b[1]))


def test_force_reference_env(monkeypatch):
    cache, streams, hist, q = build(5, 3, 2, 2, 8, 4)
    fast = cache.attend(0, q, streams)
    monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
    torch.testing.assert_close(cache.attend(0, q, streams), fast, rtol=1e-5, atol=1e-5)


def test_empty_stream_gives_zeros():
    cache = PagedKVCache(1, 8, 4, 1, 8)
    s = cache.new_stream()
    out = cache.attend(0, torch.randn(1, 1, 8), [s])
    assert torch.equal(out, torch.zeros(1, 1, 8))


def _table(cache, streams):
    return [t.numpy() for t in cache.page_table(streams)]


def test_bad_inputs_are_rejected_before_any_read():
    cache, streams, hist, q = build(1, 2, 4, 2, 8, 4)
    k, v = cache.k[0].numpy(), cache.v[0].numpy()
    indptr, indices, last, start = _table(cache, streams)
    out = np.zeros((2, 4, 8), np.float32)
    qn = q.numpy()
    call = _C.paged_decode_attention
    with pytest.raises(ValueError, match="dtype"):
        call(qn.astype(np.float64), k, v, indptr, indices, last, start, out, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        call(np.asfortranarray(np.zeros((2, 4, 8), np.float32)), k, v, indptr, indices, last,
             start, out, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(np.zeros((2, 3, 8), np.float32), k, v, indptr, indices, last, start,
             np.zeros((2, 3, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match="out"):
        call(qn, k, v, indptr, indices, last, start, np.zeros((2, 4, 4), np.float32), 1.0)
    bad = indices.copy()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="page index 10000 out of range"):
        call(qn, k, v, indptr, bad, last, start, out, 1.0)
    with pytest.raises(ValueError, match="last_page_len"):
        call(qn, k, v, indptr, indices, last * 0 + 99, start, out, 1.0)
    with pytest.raises(ValueError, match="must have 4 dims"):
        call(qn, k[0], v, indptr, indices, last, start, out, 1.0)
    ro = out.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        call(qn, k, v, indptr, indices, last, start, ro, 1.0)
    assert not out.any()  # nothing was written by the failed calls
