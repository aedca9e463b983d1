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


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_rows_across_threads_for_few_streams(threads):
    """With fewer streams than threads each stream's rows are split into one chunk per
    thread and the partial softmaxes merged (chunks may be empty or cross pages)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(6):
            cache, streams, hist, q = build(40 + seed, 1 + seed % 2, 4, 2, 16, 4)
            out = cache.attend(0, q, streams)
            for b, (k, v) in enumerate(hist):
                torch.testing.assert_close(out[b], sdpa_one(q[b], k, v), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


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
