"""Bad input at the generation entry points: every value checked where it enters (a
calm_fast error naming the field, nothing reserved), a failing request confined to itself,
handles bound to their engine."""
import pytest
import torch

from calm_fast.errors import (ArgumentError, ArgumentTypeError, CalmFastError,
                              NonFiniteError)
from calm_fast.fast.cache import PagedKVCache
from calm_fast.runtime.engine import Engine
from calm_fast.runtime.generate import CALMGenerator
from calm_fast.runtime.scheduler import Request, Scheduler

POISON = 7.125  # a prompt latent value that makes the frame step fail (see poison())


def ok_request(m, **kw):
    return Request(m.prefix(tokens=torch.tensor([3, 4])), 4, seed=1, eos_threshold=None, **kw)


FIELD_CASES = [  # (field overrides, error class, words the message must hold)
    (dict(max_frames=0), ArgumentError, "max_frames must be in [1"),
    (dict(max_frames=2.5), ArgumentTypeError, "max_frames must be an integer"),
    (dict(max_frames=True), ArgumentTypeError, "max_frames must be an integer"),
    (dict(max_frames="4"), ArgumentTypeError, "max_frames"),
    (dict(max_frames=600), ArgumentError, "exceed the context"),
    (dict(temperature=-1.0), ArgumentError, "temperature must be in [0"),
    (dict(temperature=1e30), ArgumentError, "temperature must be in [0"),
    (dict(temperature=float("nan")), ArgumentError, "temperature must be finite"),
    (dict(temperature="hot"), ArgumentTypeError, "temperature must be a number"),
    (dict(cfg_scale=1e30), ArgumentError, "cfg_scale must be in [0"),
    (dict(cfg_scale=float("inf")), ArgumentError, "cfg_scale must be finite"),
    (dict(cfg_scale=-2.0), ArgumentError, "cfg_scale"),
    (dict(seed=2**64), ArgumentError, "seed must be in [0"),
    (dict(seed=-1), ArgumentError, "seed must be in [0"),
    (dict(seed=1.5), ArgumentTypeError, "seed must be an integer or None"),
    (dict(seed="7"), ArgumentTypeError, "seed"),
    (dict(eos_threshold="x"), ArgumentTypeError, "eos_threshold must be a number or None"),
    (dict(eos_threshold=float("nan")), ArgumentError, "eos_threshold must be finite"),
    (dict(frames_after_eos=-1), ArgumentError, "frames_after_eos must be in [0"),
    (dict(frames_after_eos=1.0), ArgumentTypeError, "frames_after_eos"),
    (dict(min_frames=-3), ArgumentError, "min_frames must be in [0"),
    (dict(min_frames=9), ArgumentError, "min_frames must be in [0, 4]"),
    (dict(noise_clamp=-1.0), ArgumentError, "noise_clamp must be in (0"),
    (dict(noise_clamp=0.0), ArgumentError, "noise_clamp must be in (0"),
    (dict(generator=123), ArgumentTypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("over,cls,words", FIELD_CASES,
                         ids=[f"{next(iter(o))}={list(o.values())[0]!r}" for o, _, _ in FIELD_CASES])
def test_request_fields_are_checked_at_submit(tts, over, cls, words):
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    base = eng.cache.manager.num_free_blocks
    r = ok_request(tts)
    for k, v in over.items():
        setattr(r, k, v)
    with pytest.raises(cls) as e:
        eng.submit(r)
    assert isinstance(e.value, CalmFastError) and words in str(e.value)
    assert eng.queue_depth == 0 and eng.cache.manager.num_free_blocks == base  # nothing held


TENSOR_CASES = [
    (lambda m: Request(m.prefix(tokens=torch.tensor([3])).detach().numpy(), 3), ArgumentTypeError,
     "prefix must be a torch.Tensor"),
    (lambda m: Request(torch.zeros(2, 64, dtype=torch.long), 3), ArgumentError,
     "prefix must be float"),
    (lambda m: Request(torch.randn(2, 5), 3), ArgumentError, "prefix must be float [P >= 1, 64]"),
    (lambda m: Request(torch.randn(0, 64), 3), ArgumentError, "prefix must be float"),
    (lambda m: Request(torch.full((2, 64), float("nan")), 3), ArgumentError, "NaN"),
    (lambda m: Request(torch.randn(2, 64), 3, null_prefix=torch.full((1, 64), float("inf")),
                       cfg_scale=2.0), ArgumentError, "null_prefix holds NaN"),
    (lambda m: Request(torch.randn(2, 64), 3, prompt_latents=[[0.0] * 8]), ArgumentTypeError,
     "prompt_latents must be a torch.Tensor"),
    (lambda m: Request(torch.randn(2, 64), 3, prompt_latents=torch.randn(4, 5)), ArgumentError,
     "prompt_latents"),
    (lambda m: Request(torch.randn(2, 64), 3, prompt_latents=torch.randn(2, 3, 8)),
     ArgumentError, "prompt_latents must be float [L, 8]"),
    (lambda m: {"prefix": torch.randn(2, 64), "max_frames": 3}, ArgumentTypeError,
     "must be a calm_fast Request"),
]


@pytest.mark.parametrize("make,cls,words", TENSOR_CASES)
def test_request_tensors_are_checked(tts, make, cls, words):
    gen = CALMGenerator(tts)
    with pytest.raises(cls) as e:
        gen.generate([ok_request(tts), make(tts)])
    assert words in str(e.value)


ENGINE_CASES = [
    (dict(num_blocks=0), ArgumentError, "num_blocks must be in [2"),
    (dict(num_blocks=10.5), ArgumentTypeError, "num_blocks must be an integer"),
    (dict(max_streams=0), ArgumentError, "max_streams must be in [1"),
    (dict(block_size=0), ArgumentError, "block_size must be in [1"),
    (dict(head_steps=0), ArgumentError, "head_steps must be in [1"),
    (dict(decode_frames=0), ArgumentError, "decode_frames must be in [1"),
    (dict(device="tpu"), ArgumentError, "device must be 'cpu' or 'cuda"),
    (dict(device=3.5), ArgumentError, "device must be"),
    (dict(dtype="fp32"), ArgumentTypeError, "dtype must be a torch.dtype"),
    (dict(vae="vae.safetensors"), ArgumentTypeError, "vae must be a calm_fast VAE"),
]


@pytest.mark.parametrize("over,cls,words", ENGINE_CASES)
def test_engine_arguments_are_checked(tts, over, cls, words):
    kw = dict(num_blocks=64, block_size=4, max_streams=4) | over
    with pytest.raises(cls) as e:
        Engine(tts, **kw)
    assert isinstance(e.value, CalmFastError) and words in str(e.value)


def test_cuda_on_a_cpu_machine_says_so(tts):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ArgumentError, match="CUDA is not available"):
        Scheduler(tts, device="cuda", num_blocks=8)


def test_a_model_that_is_not_a_calm_model(tts):
    with pytest.raises(ArgumentTypeError, match="model must be a calm_fast CALM model"):
        CALMGenerator(torch.nn.Linear(2, 2))


def test_shared_templates_are_bound_to_their_engine(tts):
    a = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    b = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    voice = tts.prefix(tokens=torch.tensor([5, 6, 7, 8, 9]))
    t = a.share(voice)
    req = Request(torch.cat([voice, tts.prefix(tokens=torch.tensor([1]))]), 3, seed=0,
                  eos_threshold=None)
    with pytest.raises(ArgumentError, match="made by another Engine"):
        b.submit(req, shared=t)
    with pytest.raises(ArgumentError, match="made by another Engine"):
        b.unshare(t)
    with pytest.raises(ArgumentTypeError, match="a Shared template"):
        a.submit(req, shared=(t.stream, 5))
    a.unshare(t)
    with pytest.raises(ArgumentError, match="was unshared"):
        a.submit(req, shared=t)
    with pytest.raises(ArgumentError, match="NaN"):
        a.share(torch.full((2, voice.shape[1]), float("nan")))


def test_unsharing_a_template_that_a_waiting_request_names(tts):
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=1)
    voice = tts.prefix(tokens=torch.tensor([5, 6, 7, 8, 9]))
    t = eng.share(voice)
    r = Request(torch.cat([voice, tts.prefix(tokens=torch.tensor([1]))]), 3, seed=0,
                eos_threshold=None)
    eng.submit(ok_request(tts))  # runs first (one stream at a time)
    rid = eng.submit(r, shared=t)
    eng.step()
    eng.unshare(t)  # the waiting request now prefills its whole prefix
    out = eng.generate_all()
    torch.testing.assert_close(out[rid], CALMGenerator(tts).generate([r])[0],
                               rtol=1e-5, atol=1e-5)


def test_a_kv_template_gives_what_its_rows_give_and_is_never_prefilled(tts):
    """Engine.share_kv (a voice exported as K/V): the same frames as the rows' template; its
    placeholder rows can never be prefilled, so it cannot be unshared under a waiting
    request; bad K/V are refused before anything is reserved."""
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=1)
    voice = tts.prefix(tokens=torch.tensor([5, 6, 7, 8, 9]))
    rows_t = eng.share(voice)
    L = tts.cfg.backbone.num_layers
    k = torch.stack([eng.cache.gather(li, rows_t.stream)[0] for li in range(L)])
    v = torch.stack([eng.cache.gather(li, rows_t.stream)[1] for li in range(L)])
    kv_t = eng.share_kv(k, v)
    text = tts.prefix(tokens=torch.tensor([1, 2]))[1:]  # without its BOS row
    a = eng.submit(Request(torch.cat([voice, text]), 4, seed=3, eos_threshold=None),
                   shared=rows_t)
    b = eng.submit(Request(torch.cat([kv_t.rows, text]), 4, seed=3, eos_threshold=None),
                   shared=kv_t)
    with pytest.raises(ArgumentError, match="cannot prefill it"):
        eng.unshare(kv_t)
    out = eng.generate_all()
    torch.testing.assert_close(out[a], out[b], rtol=0, atol=0)
    free = eng.cache.manager.num_free_blocks
    with pytest.raises(ArgumentError, match="kv heads"):
        eng.share_kv(k[:, :, :, :2], v[:, :, :, :2])
    with pytest.raises(ArgumentError, match="NaN"):
        eng.share_kv(torch.full_like(k, float("nan")), v)
    with pytest.raises(ArgumentTypeError, match="torch.Tensor"):
        eng.share_kv(k.numpy(), v)
    assert eng.cache.manager.num_free_blocks == free
    eng.unshare(kv_t)


def poison(monkeypatch, sched):
    """Make the frame step raise, after doing its work (cache rows, noise, ring), whenever
    a stream whose previous latent starts with POISON is in the batch."""
    real = type(sched.frame).__call__

    def call(self, f):
        out = real(self, f)
        if bool((f.prev[:, 0] == POISON).any()):
            raise RuntimeError("poisoned")
        return out
    monkeypatch.setattr(type(sched.frame), "__call__", call)


@pytest.mark.parametrize("model", ["tts", "music"])
def test_a_failing_request_leaves_the_others_bit_identical(model, request, monkeypatch):
    m = request.getfixturevalue(model)
    C = m.cfg.latent_dim
    cond = (lambda: m.prefix(tokens=torch.tensor([3, 4]))) if model == "tts" else \
        (lambda: m.prefix(tags=["genre:jazz"]))
    good = [Request(cond(), 6, seed=s, eos_threshold=None, cfg_scale=c)
            for s, c in ((1, 1.0), (2, 2.0), (3, 1.0))]
    bad_prompt = torch.zeros(2, C)
    bad_prompt[-1, 0] = POISON
    bad = Request(cond(), 6, seed=9, eos_threshold=None, prompt_latents=bad_prompt)

    def run(reqs):
        eng = Engine(m, num_blocks=96, block_size=4, max_streams=8)
        poison(monkeypatch, eng.sched)
        base = eng.cache.manager.num_free_blocks
        ids = [eng.submit(r) for r in reqs]
        frames, errors = {i: [] for i in ids}, {}
        for ev in eng.run():
            if ev.latent is not None:
                frames[ev.request].append(ev.latent)
            if ev.error is not None:
                errors[ev.request] = ev.error
        assert eng.reserved == 0 and eng.running == 0
        assert eng.cache.manager.num_free_blocks >= base - 1  # all rows back (a null template)
        return [torch.stack(frames[i]) if frames[i] else None for i in ids], errors

    clean, _ = run(good)  # the same batch without the bad request
    mixed, errors = run(good[:2] + [bad] + good[2:])
    assert list(errors) == [2] and "poisoned" in str(errors[2]) and mixed[2] is None
    for want, got in zip(clean, mixed[:2] + mixed[3:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and each as alone, up to the rounding that batching itself brings
    for r, got in zip(good, mixed[:2] + mixed[3:]):
        torch.testing.assert_close(got, run([r])[0][0], rtol=1e-4, atol=1e-5)


def test_a_non_finite_frame_ends_only_its_request(tts, monkeypatch):
    """A request whose frame comes out NaN ends with NonFiniteError; the others go on."""
    gen = CALMGenerator(tts)
    gen.setup(0, 0, 0)
    real = type(gen.frame).__call__

    def call(self, f):
        out, logits = real(self, f)
        hit = f.prev[:, 0] == POISON
        return torch.where(hit[:, None], float("nan"), out), logits
    monkeypatch.setattr(type(gen.frame), "__call__", call)
    p = torch.zeros(1, tts.cfg.latent_dim)
    p[0, 0] = POISON
    reqs = [ok_request(tts), Request(tts.prefix(tokens=torch.tensor([3])), 4, seed=2,
                                     eos_threshold=None, prompt_latents=p)]
    outs = list(gen.stream(reqs))
    errs = {k: v for o in outs for k, v in o.errors.items()}
    assert list(errs) == [1] and isinstance(errs[1], NonFiniteError)
    assert sum(o.ids.count(0) for o in outs) == 4 and sum(o.ids.count(1) for o in outs) == 0
    with pytest.raises(NonFiniteError, match="request 1"):
        gen.generate(reqs)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_cache_truncate_rolls_rows_back(backend):
    from calm_fast.fast import ops

    if backend == "cpp" and not ops.has_native("KVManager"):
        pytest.skip("no extension")
    c = PagedKVCache(1, 8, 4, 1, 4, backend=backend)
    a = c.new_stream()
    c.reserve([a], 6)
    b = c.fork(a)
    free = c.manager.num_free_blocks
    c.reserve([b], 3)  # copy-on-write of the shared partial block, then a new block
    c.truncate(b, 3)
    assert c.position(b) == 6 and c.length(b) == 6
    assert c.manager.num_free_blocks == free - 1  # the private copy stays; the new block is back
    c.truncate(a, 6)
    assert c.length(a) == 0 and c.position(a) == 0
    with pytest.raises(ValueError, match="truncate: n must be in"):
        c.truncate(b, 7)
