"""Triton paged decode attention vs its torch reference (interpreter on CPU, or a GPU)."""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from calm_fast.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention_ref, paged_decode_attention_triton)

from paged_fixtures import build, sdpa_one  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton_interpret


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_triton_matches_reference(seed, dtype):
    rng = np.random.default_rng(seed)
    kv_heads = int(rng.choice([1, 2]))
    heads = kv_heads * int(rng.choice([1, 2]))
    block_size = int(rng.choice([2, 4, 3]))  # 3: a non-power-of-two block is padded
    cache, streams, hist, q = build(seed, 3, heads, kv_heads, 16, block_size)
    table = [t.to(DEVICE) for t in cache.page_table(streams)]
    k, v = cache.k[0].to(DEVICE, dtype), cache.v[0].to(DEVICE, dtype)
    qd = q.to(DEVICE, dtype)
    out = paged_decode_attention_triton(qd, k, v, *table)
    ref = paged_decode_attention_ref(qd.float(), k.float(), v.float(), *table)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for b, (kk, vv) in enumerate(hist):  # and against each stream's true history
        torch.testing.assert_close(out[b].float().cpu(), sdpa_one(q[b], kk, vv),
                                   rtol=10 * tol, atol=10 * tol)


def test_triton_empty_stream_and_no_start():
    cache, streams, hist, q = build(7, 2, 2, 2, 8, 4)
    empty = cache.new_stream()
    indptr, indices, last, start = cache.page_table(streams + [empty])
    q3 = torch.cat([q, torch.randn(1, 2, 8)]).to(DEVICE)
    table = [t.to(DEVICE) for t in (indptr, indices, last)]
    kc, vc = cache.k[0].to(DEVICE), cache.v[0].to(DEVICE)
    if int(start.max()) == 0:  # without trimming, start may be omitted
        out = paged_decode_attention_triton(q3, kc, vc, *table)
        torch.testing.assert_close(out, paged_decode_attention_ref(q3, kc, vc, *table))
    out = paged_decode_attention_triton(q3, kc, vc, *table, start.to(DEVICE))
    assert torch.equal(out[2].cpu(), torch.zeros(2, 8))


def test_triton_rejects_mismatched_shapes():
    cache, streams, hist, q = build(1, 1, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention_triton(torch.randn(1, 3, 8), cache.k[0], cache.v[0],
                                      *cache.page_table(streams))
