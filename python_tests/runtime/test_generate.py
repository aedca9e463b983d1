"""Batched streaming generation == dense per-request recomputation (python_tests/golden.py)."""
import pytest
import torch

from calm_fast.errors import CacheFullError
from calm_fast.runtime.generate import CALMGenerator, Request
from golden import dense_generate, ragged_tts_requests


def test_ragged_batch_equals_each_request_alone(tts):
    reqs = ragged_tts_requests(tts)
    got = CALMGenerator(tts, head_steps=2).generate(reqs)
    for r, x in zip(reqs, got):
        assert x.shape == (r.max_frames, 8)
        torch.testing.assert_close(x, dense_generate(tts, r, 2), rtol=1e-4, atol=1e-4)


def test_music_consistency_with_short_context_and_tags(music):
    g = torch.Generator().manual_seed(6)
    reqs = [Request(music.prefix(tags=["genre:jazz", "tempo:fast"]), 7, seed=4,
                    prompt_latents=torch.randn(6, 8, generator=g), eos_threshold=None),
            Request(music.prefix(tags=["instrument:piano"]), 3, seed=5, cfg_scale=1.5,
                    eos_threshold=None)]
    for steps in (1, 4):
        got = CALMGenerator(music, head_steps=steps).generate(reqs)
        for r, x in zip(reqs, got):
            torch.testing.assert_close(x, dense_generate(music, r, steps), rtol=1e-4, atol=1e-4)


def test_streaming_yields_frames_as_made_and_frees_finished_streams(tts):
    reqs = [Request(tts.null_prefix(), 2, seed=1, eos_threshold=None, cfg_scale=1.5),
            Request(tts.null_prefix(), 5, seed=2, eos_threshold=None)]
    gen = CALMGenerator(tts)
    it = gen.stream(reqs)
    first = next(it)
    assert first.step == 0 and first.ids == [0, 1] and first.latents.shape == (2, 8)
    assert gen.cache.stats()["streams"] == 3
    second = next(it)
    assert second.finished == [0] and gen.cache.stats()["streams"] == 1
    used = gen.cache.stats()["used_blocks"]
    third = next(it)
    assert third.ids == [1] and gen.cache.stats()["used_blocks"] >= used
    it.close()  # stopping early releases what is still held
    assert gen.cache.stats()["streams"] == 0 and gen.cache.stats()["used_blocks"] == 0


def test_seeded_and_reproducible(tts):
    r = lambda seed: Request(tts.null_prefix(), 3, seed=seed, eos_threshold=None)  # noqa: E731
    gen = CALMGenerator(tts)
    a, b = gen.generate([r(7)])[0], gen.generate([r(7)])[0]
    assert torch.equal(a, b) and not torch.equal(a, gen.generate([r(8)])[0])
    torch.manual_seed(3)
    c = gen.generate([r(None)])[0]
    torch.manual_seed(3)
    assert torch.equal(c, gen.generate([r(None)])[0])


def test_eos_ends_a_stream(tts):
    with torch.no_grad():
        bias = tts.out_eos.bias.clone()
        tts.out_eos.bias.fill_(100.0)
    try:
        out = CALMGenerator(tts).generate([
            Request(tts.null_prefix(), 10, seed=1, min_frames=1, frames_after_eos=2),
            Request(tts.null_prefix(), 10, seed=1, eos_threshold=None)])
    finally:
        with torch.no_grad():
            tts.out_eos.bias.copy_(bias)
    assert out[0].shape[0] == 3 and out[1].shape[0] == 10


def test_bad_requests_are_refused_before_anything_runs(tts):
    gen = CALMGenerator(tts)
    ok = tts.null_prefix()
    cases = [
        (Request(torch.randn(2, 5), 3), r"prefix must be float \[P >= 1, 64\]"),
        (Request(ok[:0], 3), "prefix must be"),
        (Request(torch.full((2, 64), float("nan")), 3), "NaN"),
        (Request(ok, 3, prompt_latents=torch.randn(4, 5)), "latents"),
        (Request(ok, 3, prompt_latents=torch.randn(0, 8)), "empty"),
        (Request(ok, 0), "max_frames"),
        (Request(ok, 3, temperature=-1.0), "temperature"),
        (Request(ok, 600), "exceed the context of 512"),
    ]
    for req, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gen.generate([Request(ok, 2), req])
    with pytest.raises(ValueError, match="no requests"):
        gen.generate([])


def test_cache_exhaustion_is_a_clear_error(tts):
    gen = CALMGenerator(tts, num_blocks=2, block_size=4)
    with pytest.raises(CacheFullError, match="free"):
        gen.generate([Request(tts.null_prefix(), 20, eos_threshold=None)])
    assert gen.cache.stats()["streams"] == 0


def test_int8_generator_stays_close(tts):
    r = Request(tts.prefix(tokens=torch.arange(5)), 4, seed=1, eos_threshold=None,
                temperature=0.0)
    a = CALMGenerator(tts).generate([r])[0]
    b = CALMGenerator(tts, int8=True).generate([r])[0]
    # dynamic int8 activations on a 64-wide random model: close, not equal (first frame,
    # before errors feed back)
    assert torch.nn.functional.cosine_similarity(a[0], b[0], dim=0) > 0.95


def test_int8_frames_are_the_same_bits_on_any_threads(tts):
    """int8 sums are exact integers and the native step cuts its other reductions by shape:
    one thread, two, alone or in a batch, the same frames (what lets the LM take the
    decoder's idle core, Scheduler.thread_invariant)."""
    from calm_fast.fast import ops

    if not ops.has_native("linear_i8"):
        pytest.skip("calm_fast._C not built")
    mk = lambda i: Request(tts.prefix(tokens=torch.arange(3 + i)), 6, seed=i,  # noqa: E731
                           eos_threshold=None)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            gen = CALMGenerator(tts, precision="int8")
            assert gen.layout == "native" and gen.thread_invariant
            outs.append(gen.generate([mk(0), mk(1), mk(2)]) + gen.generate([mk(1)]))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][1], outs[0][3])  # in a batch of 3 and alone


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_fp32_math_on_rounded_rows_and_weights(tts, native, monkeypatch):
    """precision="bf16": the backbone's and head's matmuls take bf16-rounded weights (half
    the bytes on the native path) and bf16-rounded rows, with fp32 products and sums,
    nothing else changed: it equals the fp32 path run on those rounded numbers, and it is
    not the fp32 model's output. (To fp32 rounding over the first 8 frames, and to a bf16
    step, ~4e-3 here, over all 12: a row that sits on a bf16 rounding boundary can round the
    other way after an fp32-rounding-sized difference in the sums, which moves that frame by
    about a bf16 step; where that first happens moves with any change of summation order.)"""
    from calm_fast.fast import backbone as fb
    from calm_fast.fast import ops
    from calm_fast.fast.cpu_linear import SplitLinear
    from calm_fast.fast.head import pack_head

    if native and ops._C is None:
        pytest.skip("calm_fast._C not built")
    if not native:
        monkeypatch.setattr(ops, "_C", None)
    r = Request(tts.prefix(tokens=torch.arange(5)), 12, seed=1, eos_threshold=None,
                temperature=0.5, cfg_scale=1.5)
    bf = CALMGenerator(tts, precision="bf16")
    ref = CALMGenerator(tts)
    class Rounded:  # bf16(x) @ bf16(W), op by op in fp32
        def __init__(self, w, b=None):
            self.lin = SplitLinear(w.bfloat16().float(), b)
            self.in_features, self.out_features = w.shape

        def __call__(self, x):
            return self.lin(x.bfloat16().float())

    rounded = Rounded
    ref.backbone = fb.pack(tts.transformer)._repack(rounded)
    ref.head = pack_head(tts.flow_net.state_dict())._repack(rounded)
    got, want = bf.generate([r])[0], ref.generate([r])[0]
    torch.testing.assert_close(got[:8], want[:8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    assert not torch.allclose(got, CALMGenerator(tts).generate([r])[0], atol=1e-4)
    fp = CALMGenerator(tts)
    if native:
        assert bf.backbone.nbytes() < 0.6 * fp.backbone.nbytes()
    with pytest.raises(ValueError, match="precision must be one of"):
        CALMGenerator(tts, precision="fp16")
    with pytest.raises(ValueError, match="disagree"):
        CALMGenerator(tts, precision="bf16", int8=True)


def test_a_null_prefix_longer_than_the_prefix_fits_the_cache(tts):
    # the cache is sized per stream from the longer prefix (the null one here)
    g = torch.Generator().manual_seed(9)
    r = Request(tts.null_prefix(), 3, seed=4, cfg_scale=1.5, eos_threshold=None,
                null_prefix=torch.randn(80, 64, generator=g))
    got = CALMGenerator(tts).generate([r])[0]
    torch.testing.assert_close(got, dense_generate(tts, r), rtol=1e-4, atol=1e-4)


def test_per_request_noise_clamps(tts):
    reqs = [Request(tts.null_prefix(), 3, seed=1, eos_threshold=None, noise_clamp=0.5),
            Request(tts.null_prefix(), 3, seed=2, eos_threshold=None)]
    both = CALMGenerator(tts).generate(reqs)
    for r, x in zip(reqs, both):
        torch.testing.assert_close(x, CALMGenerator(tts).generate([r])[0])
