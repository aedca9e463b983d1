"""The native decode step (csrc/decode_step_cpu.cpp, every layer in one C++ call) against the
op-by-op path it replaces, on ragged, forked and trimmed streams; fallbacks; bad inputs."""
import numpy as np
import pytest
import torch

from calm_fast import _C
from calm_fast.fast import backbone as fb
from calm_fast.fast import ops

from paged_fixtures import random_sd


def op_by_op(monkeypatch):
    monkeypatch.setattr(ops, "native_decode_step_ok", lambda *a, **k: False)


def run_steps(p, cache_seed, rows, steps, monkeypatch=None, trim=None, fork=False):
    """Prefill ragged streams, optionally fork the first and trim one, then step them all
    ``steps`` times; returns every step's output [steps, rows, d]."""
    g = torch.Generator().manual_seed(cache_seed)
    cache = p.make_cache(160, 4, max_streams=16)
    streams = []
    for i in range(rows):
        if fork and i == 1:
            streams.append(cache.fork(streams[0]))
            continue
        s = cache.new_stream()
        fb.prefill(p, cache, s, torch.randn(3 + 2 * i, p.d_model, generator=g))
        streams.append(s)
    if trim is not None:
        cache.trim_front(streams[-1], trim)
    outs = []
    for _ in range(steps):
        x = torch.randn(rows, p.d_model, generator=g)
        outs.append(fb.step(p, cache, streams, x))
    return torch.stack(outs)


@pytest.mark.parametrize("rows,kv_heads,layer_scale,trim,fork", [
    (1, 4, False, None, False),
    (2, 2, True, None, True),
    (3, 4, True, 2, False),
    (4, 1, False, 5, True),
    (9, 2, True, 3, True),  # from 8 rows the loops between the GEMMs run on every thread
])
def test_native_step_equals_op_by_op(monkeypatch, rows, kv_heads, layer_scale, trim, fork):
    p = fb.pack_transformer(random_sd(layers=3, kv_heads=kv_heads, layer_scale=layer_scale,
                                      seed=rows), heads=4, kv_heads=kv_heads)
    assert fb.native_layers(p) is None  # plain [in, out] weights run op by op
    native = run_steps(p.split(), 7, rows, 6, trim=trim, fork=fork)
    assert fb.native_layers(p.split()) is not None
    with monkeypatch.context() as m:
        op_by_op(m)
        ref = run_steps(p, 7, rows, 6, trim=trim, fork=fork)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-5)


def test_gelu_tails_and_wide_activations(monkeypatch):
    """Pre-activations far into both tails of the tanh (the native GELU uses its own exp)."""
    sd = random_sd(layers=1, seed=11)
    sd["layers.0.linear1.weight"] *= 40
    p = fb.pack_transformer(sd, heads=4)
    native = run_steps(p.split(), 3, 2, 3)
    with monkeypatch.context() as m:
        op_by_op(m)
        ref = run_steps(p, 3, 2, 3)
    torch.testing.assert_close(native, ref, rtol=1e-5, atol=1e-4)


def test_nan_input_propagates():
    p = fb.pack_transformer(random_sd(layers=1), heads=4).split()
    cache = p.make_cache(8, 4)
    s = cache.new_stream()
    fb.prefill(p, cache, s, torch.randn(3, 32))
    out = fb.step(p, cache, [s], torch.full((1, 32), float("nan")))
    assert torch.isnan(out).all()


def test_any_row_count_runs_native(monkeypatch):
    p = fb.pack_transformer(random_sd(layers=2, seed=4), heads=4).split()
    calls = []
    real = ops.native_decode_step
    monkeypatch.setattr(ops, "native_decode_step", lambda *a: calls.append(1) or real(*a))
    run_steps(p, 1, 12, 1)
    assert calls  # (int8 layers: test_int8.py)


def test_bad_inputs_are_rejected_before_any_write():
    p = fb.pack_transformer(random_sd(layers=2), heads=4).split()
    cache = p.make_cache(8, 4)
    s = cache.new_stream()
    fb.prefill(p, cache, s, torch.randn(3, 32))
    slots = cache.reserve([s], 1)[:, 0]
    indptr, indices, last, start = (t.numpy() for t in cache.page_table([s]))
    layers = fb.native_layers(p)
    x = np.zeros((1, 32), np.float32)
    cs = np.ones((1, 4), np.float32)
    k, v = cache.k.numpy(), cache.v.numpy()
    before = k.copy()
    sl = slots.numpy().astype(np.int64)

    def call(**kw):
        a = dict(layers=layers, heads=4, kv_heads=4, eps=1e-5, x=x, cos=cs, sin=cs,
                 k_cache=k, v_cache=v, slots=sl, indptr=indptr, indices=indices,
                 last_page_len=last, start=start)
        a.update(kw)
        _C.decode_step(**a)

    with pytest.raises(ValueError, match="at least one row"):
        call(x=np.zeros((0, 32), np.float32))
    with pytest.raises(ValueError, match="not streams of 2 queries"):
        call(queries=2)
    with pytest.raises(ValueError, match="last_rows_only takes neither"):
        call(last_rows_only=True, window=2)
    with pytest.raises(ValueError, match="last_rows_only takes neither"):
        call(last_rows_only=True, last_kv_only=True)
    with pytest.raises(ValueError, match="3 layers for a cache of 2"):
        call(layers=layers[:1] * 2 + layers[:1])
    with pytest.raises(ValueError, match="w_qkv has shape"):
        call(layers=[layers[0][:2] + (np.ascontiguousarray(layers[0][2][:, :8]),) + layers[0][3:]]
             + layers[1:])
    with pytest.raises(ValueError, match="slot out of range"):
        call(slots=np.array([10_000], np.int64))
    with pytest.raises(ValueError, match="page index"):
        call(indices=np.full_like(indices, 99))
    with pytest.raises(ValueError, match="cos/sin"):
        call(cos=np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        call(kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        call(x=x.astype(np.float64))
    np.testing.assert_array_equal(k, before)


@pytest.mark.parametrize("kv_heads,layer_scale", [(2, False), (1, True)])
def test_native_prefill_equals_op_by_op(monkeypatch, kv_heads, layer_scale):
    """Prefill through the native step (queries = T, no window): a fresh stream, then a fork
    of it that prefills more rows over the shared prefix, then steps; outputs=False stops
    the last layer after its K/V and leaves the same cache."""
    sd = random_sd(layers=3, d=64, heads=4, kv_heads=kv_heads, ff=96, layer_scale=layer_scale,
                   seed=kv_heads)
    p = fb.pack_transformer(sd, heads=4, kv_heads=kv_heads)  # head_dim 16
    g = torch.Generator().manual_seed(1)
    prefix, more, nxt = (torch.randn(n, 64, generator=g) for n in (9, 5, 3))

    def run(pk, outputs=True):
        cache = pk.make_cache(32, 4)
        root = cache.new_stream()
        a = fb.prefill(pk, cache, root, prefix, outputs=outputs)
        s = cache.fork(root)
        b = fb.prefill(pk, cache, s, more)
        steps = [fb.step(pk, cache, [s], nxt[i:i + 1]) for i in range(3)]
        return a, torch.cat([b] + steps)

    calls = []
    real = ops.native_decode_step
    monkeypatch.setattr(ops, "native_decode_step",
                        lambda *a, **k: calls.append(k.get("queries", 1)) or real(*a, **k))
    native = run(p.split())
    assert 9 in calls and 5 in calls  # both prefills took the native step
    with monkeypatch.context() as m:
        op_by_op(m)
        ref = run(p)
    torch.testing.assert_close(native[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native[1], ref[1], rtol=1e-5, atol=1e-5)
    a, rest = run(p.split(), outputs=False)
    assert a is None
    torch.testing.assert_close(rest, native[1], rtol=0, atol=0)
