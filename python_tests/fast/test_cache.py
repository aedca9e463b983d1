"""PagedKVCache: tensor writes land in the manager's slots, COW copies every layer."""
import pytest
import torch

from calm_fast.fast.cache import PagedKVCache, make_manager
from calm_fast.errors import CacheFullError
from calm_fast.fast.kv_manager_py import PyKVManager


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_fork_then_append_keeps_both_histories_on_every_layer(backend):
    c = PagedKVCache(3, 8, 4, 2, 4, backend=backend)
    a = c.new_stream()
    ka = torch.randn(6, 2, 4)
    slots = c.reserve([a], 6)
    for layer in range(3):
        c.write(layer, slots, ka + layer, -ka - layer)
    b = c.fork(a)
    kb = torch.randn(1, 2, 4)
    sb = c.reserve([b], 1)  # COW of the shared, partly filled block
    for layer in range(3):
        c.write(layer, sb, kb + layer, -kb - layer)
    sa = c.reserve([a], 1)
    ka2 = torch.randn(1, 2, 4)
    for layer in range(3):
        c.write(layer, sa, ka2 + layer, -ka2 - layer)
    for layer in range(3):
        k, v = c.gather(layer, a)
        torch.testing.assert_close(k, torch.cat([ka, ka2]) + layer)
        torch.testing.assert_close(v, -torch.cat([ka, ka2]) - layer)
        k, v = c.gather(layer, b)
        torch.testing.assert_close(k, torch.cat([ka, kb]) + layer)
    assert c.position(a) == 7 and c.length(b) == 7


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_reserve_is_all_or_nothing(backend):
    c = PagedKVCache(1, 4, 4, 1, 4, backend=backend)
    s = [c.new_stream() for _ in range(3)]
    c.reserve(s, 4)  # three blocks
    free = c.stats()["free_blocks"]
    with pytest.raises(CacheFullError, match=r"3 stream\(s\) need 3 more block"):
        c.reserve(s, 1)
    assert c.stats()["free_blocks"] == free
    assert [c.length(x) for x in s] == [4, 4, 4]
    assert c.can_append(s[:1], 1) and not c.can_append(s, 1)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("CALM_FAST_KV_BACKEND", "python")
    assert isinstance(make_manager(4, 4), PyKVManager)
    assert PagedKVCache(1, 4, 4, 1, 4).stats()["backend"] == "python"
    monkeypatch.delenv("CALM_FAST_KV_BACKEND")
    assert PagedKVCache(1, 4, 4, 1, 4).stats()["backend"] == "cpp"
    with pytest.raises(ValueError, match="unknown KV backend"):
        make_manager(4, 4, "gpu")


def test_bad_construction_and_too_many_streams():
    with pytest.raises(ValueError, match="kv_heads"):
        PagedKVCache(1, 4, 4, 0, 4)
    c = PagedKVCache(1, 4, 4, 1, 4, max_streams=2)
    s = [c.new_stream() for _ in range(3)]
    with pytest.raises(ValueError, match="exceed max_streams=2"):
        c.page_table(s)


def test_page_table_buffers_keep_their_address():
    c = PagedKVCache(1, 12, 2, 1, 4)
    s = [c.new_stream() for _ in range(3)]
    ptrs = (c.indptr.data_ptr(), c.indices.data_ptr())
    for n in (1, 3, 2):
        c.reserve(s, n)
        indptr, indices, last, start = c.page_table(s)
        assert (indptr.data_ptr(), indices.data_ptr()) == ptrs
    assert indptr.tolist() == [0, 3, 6, 9] and last.tolist() == [2, 2, 2]
