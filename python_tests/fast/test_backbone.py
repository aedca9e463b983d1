"""Backbone fast path: equals the published StreamingTransformer; prefill == steps; ragged
batches == single streams."""
import pytest
import torch

from calm_fast.fast import backbone as fb
from paged_fixtures import random_sd
from calm_fast.model.config import TransformerConfig
from calm_fast.model.transformer import Transformer


@pytest.mark.peer
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_published_streaming_transformer(kv_heads):
    tr_mod = pytest.importorskip("pocket_tts.modules.transformer")
    from pocket_tts.modules.stateful_module import (StatefulModule, increment_steps,
                                                    init_states)

    torch.manual_seed(0)
    ref = tr_mod.StreamingTransformer(d_model=32, num_heads=4, num_layers=2,
                                      dim_feedforward=64, num_kv_heads=kv_heads).eval()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    for name, mod in ref.named_modules():  # what the package's TTSModel does at load
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    p = fb.pack_transformer(ref.state_dict(), heads=4, kv_heads=kv_heads)
    x = torch.randn(1, 9, 32)
    state = init_states(ref, batch_size=1, sequence_length=32)
    with torch.no_grad():
        want_prefix = ref(x[:, :6], state)
        increment_steps(ref, state, 6)
        want_steps = []
        for t in range(6, 9):
            want_steps.append(ref(x[:, t:t + 1], state)[:, 0])
            increment_steps(ref, state, 1)
    cache = p.make_cache(16, 4)
    s = cache.new_stream()
    got_prefix = fb.prefill(p, cache, s, x[0, :6])
    torch.testing.assert_close(got_prefix, want_prefix[0], rtol=1e-5, atol=1e-5)
    for t in range(6, 9):
        torch.testing.assert_close(fb.step(p, cache, [s], x[:, t]), want_steps[t - 6],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_scale", [False, True])
def test_prefill_equals_steps(layer_scale):
    p = fb.pack_transformer(random_sd(layer_scale=layer_scale), heads=4)
    x = torch.randn(10, 32)
    c1 = p.make_cache(16, 4)
    a = c1.new_stream()
    full = fb.prefill(p, c1, a, x)
    c2 = p.make_cache(16, 4)
    b = c2.new_stream()
    part = [fb.prefill(p, c2, b, x[:3])]
    part += [fb.step(p, c2, [b], x[t:t + 1]) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(part), full, rtol=1e-5, atol=1e-5)


def test_ragged_batch_equals_single_streams():
    p = fb.pack_transformer(random_sd(kv_heads=2, seed=3), heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, 32, generator=g) for n in (2, 7, 4)]
    nxt = torch.randn(3, 32, generator=g)
    cache = p.make_cache(32, 4)
    ids = [cache.new_stream() for _ in prompts]
    for s, pr in zip(ids, prompts):
        fb.prefill(p, cache, s, pr)
    batched = fb.step(p, cache, ids, nxt)
    for i, pr in enumerate(prompts):
        c = p.make_cache(8, 4)
        s = c.new_stream()
        fb.prefill(p, c, s, pr)
        torch.testing.assert_close(batched[i], fb.step(p, c, [s], nxt[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-5)


def test_forked_prefix_continues_like_a_fresh_stream():
    p = fb.pack_transformer(random_sd(seed=5), heads=4)
    prompt, a_next, b_next = torch.randn(5, 32), torch.randn(1, 32), torch.randn(1, 32)
    cache = p.make_cache(16, 4)
    root = cache.new_stream()
    fb.prefill(p, cache, root, prompt)
    fork = cache.fork(root)
    out = fb.step(p, cache, [root, fork], torch.cat([a_next, b_next]))
    c2 = p.make_cache(16, 4)
    s = c2.new_stream()
    fb.prefill(p, c2, s, prompt)
    torch.testing.assert_close(out[1:], fb.step(p, c2, [s], b_next), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    sd = random_sd()
    with pytest.raises(ValueError, match="heads must be given"):
        fb.pack_transformer(sd)
    with pytest.raises(ValueError, match="expected 48 for 4 heads / 1 kv heads"):
        fb.pack_transformer(sd, heads=4, kv_heads=1)
    with pytest.raises(KeyError, match="no 'layers"):
        fb.pack_transformer({"x": torch.zeros(1)}, heads=1)
    p = fb.pack_transformer(sd, heads=4)
    cache = p.make_cache(8, 4)
    s = cache.new_stream()
    with pytest.raises(ValueError, match=r"step input must be \[1, 32\]"):
        fb.step(p, cache, [s], torch.randn(1, 16))
    with pytest.raises(ValueError, match="prefill input"):
        fb.prefill(p, cache, s, torch.randn(0, 32))


def test_int8_weights_stay_close_and_shrink():
    p = fb.pack_transformer(random_sd(d=256, heads=4, ff=1024, seed=7), heads=4)
    q = p.quantized()
    assert q.nbytes() < 0.3 * p.nbytes()
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1))
    outs = []
    for pk in (p, q):
        cache = pk.make_cache(16, 4)
        s = cache.new_stream()
        outs.append(torch.cat([fb.prefill(pk, cache, s, x[:4]),
                               fb.step(pk, cache, [s], x[4:5]), fb.step(pk, cache, [s], x[5:])]))
    rel = (outs[1] - outs[0]).norm() / outs[0].norm()
    # measured 0.04-0.06 at d=256 (0.02-0.03 at d=1024): fbgemm quantizes activations
    # per tensor to 7 bits, so narrow models lose more
    assert rel < 0.1, rel


def test_int8_linear_rejects_bad_weights():
    from calm_fast.fast.int8 import Int8Linear

    with pytest.raises(ValueError, match="float"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int32))


def test_prefill_without_outputs_fills_the_same_cache():
    """outputs=False stops the last layer after its K/V: the cache, hence every later step,
    is the same."""
    p = fb.pack_transformer(random_sd(layers=3, seed=9), heads=4)
    g = torch.Generator().manual_seed(2)
    prefix, nxt = torch.randn(7, 32, generator=g), torch.randn(3, 1, 32, generator=g)
    outs = []
    for full in (True, False):
        cache = p.make_cache(16, 4)
        s = cache.new_stream()
        got = fb.prefill(p, cache, s, prefix, outputs=full)
        assert (got is None) == (not full)
        outs.append(torch.cat([fb.step(p, cache, [s], x) for x in nxt]))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def make_transformer(kv=None, ls=None):
    torch.manual_seed(0)
    return Transformer(TransformerConfig(32, 2, 4, num_kv_heads=kv, layer_scale=ls)).eval()


@pytest.mark.parametrize("kv,ls", [(None, None), (2, 0.5)])
def test_packed_prefill_then_steps_equal_the_dense_module(kv, ls):
    tr = make_transformer(kv, ls)
    x = torch.randn(1, 11, 32)
    with torch.no_grad():
        want = tr(x)[0]
    p = fb.pack(tr)
    cache = p.make_cache(16, 4)
    s = cache.new_stream()
    got = [fb.prefill(p, cache, s, x[0, :6])]
    for i in range(6, 11):
        got.append(fb.step(p, cache, [s], x[0, i:i + 1]))
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-5, atol=1e-5)
    cache2 = p.make_cache(16, 4)
    s2 = cache2.new_stream()
    torch.testing.assert_close(fb.prefill(p, cache2, s2, x[0]), want, rtol=1e-5, atol=1e-5)




@pytest.mark.parametrize("native", [True, False])
def test_prefill_many_equals_one_prefill_per_stream(native, monkeypatch):
    """Several streams prefilled together (in rounds of equal row counts, one C++ call per
    round) hold the K/V and give the outputs that one prefill per stream gives, forked
    streams included; equal lengths are bit-identical."""
    from calm_fast.fast import ops

    calls = []
    real = ops.native_decode_step
    monkeypatch.setattr(ops, "native_decode_step",
                        lambda *a, **k: calls.append(k.get("queries", 1)) or real(*a, **k))
    p = fb.pack_transformer(random_sd(layers=2, d=64, heads=4, kv_heads=2, ff=128, seed=4),
                            heads=4, kv_heads=2)
    p = p.split() if native else p
    assert (fb.native_layers(p) is not None) == native
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 64, generator=g)
    for lengths in ((6, 6, 6), (3, 9, 1, 17)):
        xs = [torch.randn(n, 64, generator=g) for n in lengths]
        caches, outs, sids = [], [], []
        for together in (False, True):
            cache = p.make_cache(64, 4)
            t = cache.new_stream()
            fb.prefill(p, cache, t, base, outputs=False)
            ss = [cache.new_stream() if i % 2 else cache.fork(t) for i in range(len(xs))]
            calls.clear()
            if together:
                got = fb.prefill_many(p, cache, list(zip(ss, xs)), outputs=True)
                assert len(calls) == (len(set(lengths)) if native else 0)
            else:
                got = [fb.prefill(p, cache, s, x) for s, x in zip(ss, xs)]
            caches.append(cache), outs.append(got), sids.append(ss)
        exact = len(set(lengths)) == 1
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
        for a, b in zip(outs[0], outs[1]):
            torch.testing.assert_close(b, a, **tol)
        for li in range(2):
            for a, b in zip(sids[0], sids[1]):
                for x, y in zip(caches[0].gather(li, a), caches[1].gather(li, b)):
                    torch.testing.assert_close(y, x, **tol)
        # the next step reads the same cache
        nxt = torch.randn(len(xs), 64, generator=g)
        torch.testing.assert_close(fb.step(p, caches[1], sids[1], nxt),
                                   fb.step(p, caches[0], sids[0], nxt), **tol)
    with pytest.raises(ValueError, match="at most once"):
        fb.prefill_many(p, p.make_cache(8, 4), [(0, base), (0, base)])


@pytest.mark.parametrize("native", [True, False])
def test_prefill_last_rows_equal_the_full_prefill_and_a_step(native):
    """outputs="last" (a prefill that carries a stream's next frame input): each stream's
    last row is the full prefill's last row, and the one-query step's output for that row
    after a prefill of the rest; the cache it leaves is the full prefill's."""
    p = fb.pack_transformer(random_sd(layers=2, d=64, heads=4, kv_heads=2, ff=128, seed=5),
                            heads=4, kv_heads=2)
    p = p.split() if native else p
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 64, generator=g)
    xs = [torch.randn(n, 64, generator=g) for n in (3, 9, 1, 17)]

    def streams(cache):
        t = cache.new_stream()
        fb.prefill(p, cache, t, base, outputs=False)
        return [cache.new_stream() if i % 2 else cache.fork(t) for i in range(len(xs))]

    full_c, last_c, step_c = (p.make_cache(64, 4) for _ in range(3))
    full_s, last_s, step_s = streams(full_c), streams(last_c), streams(step_c)
    full = fb.prefill_many(p, full_c, list(zip(full_s, xs)), outputs=True)
    last = fb.prefill_many(p, last_c, list(zip(last_s, xs)), outputs="last")
    for a, b in zip(full, last):
        assert b.shape == (64,)
        torch.testing.assert_close(b, a[-1], rtol=1e-5, atol=1e-5)
    for li in range(2):
        for a, b in zip(full_s, last_s):
            for x, y in zip(full_c.gather(li, a), last_c.gather(li, b)):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    for s, x, want in zip(step_s, xs, last):
        if x.shape[0] > 1:
            fb.prefill(p, step_c, s, x[:-1], outputs=False)
        torch.testing.assert_close(fb.step(p, step_c, [s], x[-1:])[0], want, rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="outputs must be"):
        fb.prefill_many(p, p.make_cache(8, 4), [(0, base)], outputs="first")
