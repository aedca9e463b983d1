"""Bad inputs at the native layer: the C++ extension's bindings, the block manager (C++ and
its Python twin) and the paged cache raise calm_fast errors (CalmFastError and
ValueError/TypeError) that name the argument and the value, and change nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_fast.errors import (ArgumentError, ArgumentTypeError, CacheFullError, CalmFastError,
                              UnknownStreamError)
from calm_fast.fast import ops
from calm_fast.fast.cache import PagedKVCache, make_manager

C = ops.native()
needs_native = pytest.mark.skipif(C is None, reason="extension not built")
BACKENDS = ["python", pytest.param("cpp", marks=needs_native)]


def _raises(cls, words, fn):
    with pytest.raises(cls) as e:
        fn()
    assert isinstance(e.value, CalmFastError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


NATIVE_CASES = [  # (name, fn, error class, words the message must hold)
    ("KVManager num_blocks -1", lambda: C.KVManager(-1, 16), ArgumentError, ["num_blocks", "-1"]),
    ("KVManager block_size 0", lambda: C.KVManager(8, 0), ArgumentError, ["block_size", "0"]),
    ("linear shapes", lambda: C.linear(np.zeros((2, 3), np.float32),
                                       np.zeros((1, 5, 32), np.float32), None,
                                       np.zeros((2, 32), np.float32)),
     ArgumentError, ["linear shapes", "(2, 3)"]),
    ("linear float64", lambda: C.linear(np.zeros((2, 5)), np.zeros((1, 5, 32), np.float32),
                                        None, np.zeros((2, 32), np.float32)),
     ArgumentError, ["dtype"]),
]


@needs_native
@pytest.mark.parametrize("name,fn,cls,words", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_extension_bindings_raise_calm_fast_errors(name, fn, cls, words):
    _raises(cls, words, fn)


OPS_CASES = [
    ("kv_manager float blocks", lambda: ops.kv_manager(10.5, 16), ArgumentTypeError,
     ["num_blocks", "10.5"]),
    ("kv_manager zero block size", lambda: ops.kv_manager(8, 0), ArgumentError,
     ["block_size", "got 0"]),
    ("kv_manager backend", lambda: ops.kv_manager(8, 16, "gpu"), ArgumentError,
     ["'gpu'", "'cpp'"]),
    ("attention numpy q", lambda: ops.paged_decode_attention(
        np.zeros((1, 2, 16), np.float32), *[torch.zeros(1)] * 5), ArgumentTypeError,
     ["q must be a torch.Tensor", "ndarray"]),
    ("window 0", lambda: ops.window_attention(torch.zeros(1, 1, 2, 16), torch.zeros(1, 4, 2, 16),
                                              torch.zeros(1, 4, 2, 16), None, 0),
     ArgumentError, ["window", "got 0"]),
    ("cache num_layers 0", lambda: PagedKVCache(0, 4, 4, 1, 16), ArgumentError,
     ["num_layers", "got 0"]),
    ("cache max_streams 2.5", lambda: PagedKVCache(1, 4, 4, 1, 16, max_streams=2.5),
     ArgumentTypeError, ["max_streams", "2.5"]),
]


@pytest.mark.parametrize("name,fn,cls,words", OPS_CASES, ids=[c[0] for c in OPS_CASES])
def test_dispatch_and_cache_arguments_are_checked(name, fn, cls, words):
    _raises(cls, words, fn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_manager_refuses_bad_calls_and_changes_nothing(backend):
    m = make_manager(4, 4, backend)
    s = m.new_stream()
    m.append(s, 3)
    before = (m.length(s), m.num_free_blocks)
    _raises(ArgumentError, ["negative", "-3"], lambda: m.append(s, -3))
    _raises(ArgumentError, ["truncate", "9"], lambda: m.truncate(s, 9))
    _raises(UnknownStreamError, ["unknown stream 99"], lambda: m.free(99))
    _raises(CacheFullError, [], lambda: m.append(s, 100))
    assert (m.length(s), m.num_free_blocks) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_methods_check_their_arguments(backend):
    cache = PagedKVCache(1, 4, 4, 1, 16, backend=backend)
    s = cache.new_stream()
    cache.reserve([s], 2)
    _raises(ArgumentTypeError, ["stream", "'a'"], lambda: cache.length("a"))
    _raises(ArgumentTypeError, ["n", "1.5"], lambda: cache.reserve([s], 1.5))
    _raises(ArgumentError, ["keep_last", "-1"], lambda: cache.trim_front(s, -1))
    _raises(ArgumentError, ["stream", "-2"], lambda: cache.free(-2))
    assert cache.length(s) == 2
