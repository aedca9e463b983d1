"""engine.Engine: continuous batching equals single-request generation whatever the batch
and the join times; shared prefixes by fork; admission control under a tiny cache; no block
leaked after thousands of random join/cancel events."""
import random

import pytest
import torch

from calm_fast.runtime.engine import Engine
from calm_fast.errors import CacheFullError
from calm_fast.runtime.generate import CALMGenerator, Request
from golden import ragged_tts_requests


def alone(m, r):
    return CALMGenerator(m).generate([r])[0]


def check_reserve(engine):
    assert engine.reserved >= 0
    assert engine.cache.manager.num_free_blocks - 1 >= engine.reserved  # promises are kept


def test_join_at_any_frame_equals_single_request(tts):
    reqs = ragged_tts_requests(tts)
    reqs.append(Request(tts.prefix(tokens=torch.tensor([4, 4])), 7, seed=9, eos_threshold=None))
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=8)
    base = eng.cache.manager.num_free_blocks
    join_at = {0: [0], 2: [1, 3], 3: [2]}  # step -> requests that join before it
    ids, frames, step = {}, {}, 0
    while step < 3 or eng.running or eng.queue_depth:
        for k in join_at.get(step, []):
            ids[eng.submit(reqs[k])] = k
        for ev in eng.step():
            if ev.latent is not None:
                frames.setdefault(ids[ev.request], []).append(ev.latent)
        check_reserve(eng)
        step += 1
    for k, r in enumerate(reqs):
        torch.testing.assert_close(torch.stack(frames[k]), alone(tts, r), rtol=1e-4, atol=1e-4)
    assert eng.cache.manager.num_free_blocks == base - 1  # the shared null prefix row


def test_music_model_with_short_context(music):
    reqs = [Request(music.prefix(tags=["genre:jazz"]), 6, seed=s, eos_threshold=None,
                    cfg_scale=c) for s, c in ((1, 1.0), (2, 2.0), (3, 1.0))]
    eng = Engine(music, num_blocks=64, block_size=4, max_streams=2)  # the third one waits
    ids = [eng.submit(r) for r in reqs]
    first = {ev.request: ev.latent for ev in eng.step()}
    assert eng.queue_depth == 1 and eng.running == 2 and len(first) == 2
    out = eng.generate_all()
    for i, r in zip(ids, reqs):
        got = torch.cat([first[i][None], out[i]]) if i in first else out[i]
        torch.testing.assert_close(got, alone(music, r), rtol=1e-4, atol=1e-4)


def test_shared_prefix_is_prefilled_once_and_forked(tts):
    g = torch.Generator().manual_seed(0)
    voice = tts.prefix(voice=torch.randn(9, 8, generator=g))  # [bos, 9 voice rows]
    texts = [torch.tensor([1, 2]), torch.tensor([5, 6, 7, 8]), torch.tensor([9])]
    reqs = [Request(torch.cat([voice, tts.conditioner(t)]), 5, seed=i, cfg_scale=1.5,
                    eos_threshold=None) for i, t in enumerate(texts)]
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    base = eng.cache.manager.num_free_blocks
    shared = eng.share(voice)
    free0 = eng.cache.manager.num_free_blocks
    ids = [eng.submit(r, shared=shared) for r in reqs]
    eng.step()  # all admitted: prefix rows 10 = 2 full shared blocks + 2 rows copied
    per_request = (free0 - 1 - eng.cache.manager.num_free_blocks) / 3  # -1: null template
    unshared = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    free1 = unshared.cache.manager.num_free_blocks
    for r in reqs:
        unshared.submit(r)
    unshared.step()
    assert per_request < (free1 - 1 - unshared.cache.manager.num_free_blocks) / 3 - 1.5
    out = eng.generate_all()
    for i, r in zip(ids, reqs):
        # the frame of the first step was consumed above: compare from the second one
        torch.testing.assert_close(out[i], alone(tts, r)[1:], rtol=1e-4, atol=1e-4)
    eng.unshare(shared)
    assert eng.cache.manager.num_free_blocks == base - 1  # the null template stays


def test_admission_control_under_a_tiny_cache(tts):
    reqs = [Request(tts.prefix(tokens=torch.arange(1 + i)), 10, seed=i, eos_threshold=None,
                    cfg_scale=1.0 if i % 2 else 2.0) for i in range(6)]
    # each request needs ~4-8 blocks of 4 rows; 14 blocks hold about two at a time
    eng = Engine(tts, num_blocks=14, block_size=4, max_streams=6)
    ids = [eng.submit(r) for r in reqs]
    depths = []
    frames = {}
    while eng.running or eng.queue_depth:
        for ev in eng.step():
            if ev.latent is not None:
                frames.setdefault(ev.request, []).append(ev.latent)
        check_reserve(eng)
        depths.append(eng.queue_depth)
    assert max(depths) >= 3 and depths[-1] == 0  # requests waited, none failed
    for i, r in zip(ids, reqs):
        torch.testing.assert_close(torch.stack(frames[i]), alone(tts, r), rtol=1e-4,
                                   atol=1e-4)
    with pytest.raises(ValueError, match="more than the"):
        eng.submit(Request(tts.prefix(tokens=torch.arange(3)), 200, eos_threshold=None))


def test_no_block_leaks_after_random_joins_and_cancels(tts):
    rng = random.Random(0)
    eng = Engine(tts, num_blocks=40, block_size=4, max_streams=5)
    base = eng.cache.manager.num_free_blocks
    g = torch.Generator().manual_seed(1)
    voice = tts.prefix(voice=torch.randn(6, 8, generator=g))
    shared = eng.share(voice)
    live = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:
            tok = torch.randint(0, 60, (rng.randint(1, 6),), generator=g)
            use_shared = rng.random() < 0.5
            prefix = torch.cat([voice, tts.conditioner(tok)]) if use_shared else \
                tts.prefix(tokens=tok)
            r = Request(prefix, rng.randint(1, 8), seed=rng.randint(0, 99),
                        cfg_scale=rng.choice([1.0, 1.5]), eos_threshold=rng.choice([None, 0.0]))
            live.append(eng.submit(r, shared=shared if use_shared else None))
        elif op < 0.45 and live:
            eng.cancel(live.pop(rng.randrange(len(live))))
        else:
            eng.step()
        check_reserve(eng)
    list(eng.run())
    eng.unshare(shared)
    null_rows = 0 if eng._null is None else 1
    assert eng.cache.manager.num_free_blocks == base - null_rows
    assert eng.reserved == 0 and eng.running == 0 and eng.queue_depth == 0
    assert sorted(eng.free_rings) == list(range(5))


def test_engine_errors(tts):
    eng = Engine(tts, num_blocks=8, block_size=4, max_streams=2)
    voice = tts.prefix(voice=torch.randn(3, 8))
    shared = eng.share(voice)
    with pytest.raises(ValueError, match="does not start with the shared rows"):
        eng.submit(Request(tts.prefix(tokens=torch.arange(3)), 2), shared=shared)
    with pytest.raises(CacheFullError, match="needs"):
        eng.share(tts.prefix(voice=torch.randn(40, 8)))
    with pytest.raises(ValueError, match="max_frames must be"):
        eng.submit(Request(tts.prefix(tokens=torch.arange(3)), 0))
    assert eng.queue_depth == 0
    with pytest.raises(ValueError, match="num_blocks"):
        Engine(tts, num_blocks=1)


def test_audio_chunks_per_stream_equal_offline_decode(tts):
    """With a VAE, each event carries its frame's audio, decoded in one batch with the other
    streams' frames; a stream's chunks equal the offline decode of its latents."""
    from calm_fast.codec.vae import VAE, vae_preset

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny")).eval()
    reqs = ragged_tts_requests(tts)
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=2, vae=vae)  # one waits
    ids = [eng.submit(r) for r in reqs]
    chunks, lats = {}, {}
    for ev in eng.run():
        if ev.latent is not None:
            assert ev.audio.shape == (1, vae.cfg.frame_size)
            chunks.setdefault(ev.request, []).append(ev.audio)
            lats.setdefault(ev.request, []).append(ev.latent)
    for i, r in zip(ids, reqs):
        with torch.no_grad():
            ref = vae.decode(tts.denormalize(alone(tts, r))[None])[0]
        torch.testing.assert_close(torch.cat(chunks[i], -1), ref, rtol=1e-4, atol=1e-4)
    assert eng.decoder.open_slots == []


def test_chunked_decode_ramps_and_equals_frame_by_frame(tts):
    """decode_frames=4: a stream's chunks hold 1, 2, 4, 4, ... frames (the rest when it
    ends), decoded in batches with other streams, and its audio equals the offline decode;
    a request cancelled with undecoded frames leaves no slot or queue behind."""
    from calm_fast.codec.vae import VAE, vae_preset

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny")).eval()
    reqs = ragged_tts_requests(tts)
    extra = Request(tts.prefix(tokens=torch.tensor([3, 1])), 12, seed=4, eos_threshold=None)
    eng = Engine(tts, num_blocks=96, block_size=4, max_streams=4, vae=vae, decode_frames=4)
    ids = [eng.submit(r) for r in reqs]
    victim = eng.submit(extra)
    sizes, chunks, frames, step = {}, {}, {}, 0
    while eng.running or eng.queue_depth:
        for ev in eng.step():
            frames[ev.request] = frames.get(ev.request, 0) + (ev.latent is not None)
            if ev.audio is not None:
                assert ev.audio.shape[-1] % vae.cfg.frame_size == 0
                sizes.setdefault(ev.request, []).append(ev.audio.shape[-1] // vae.cfg.frame_size)
                chunks.setdefault(ev.request, []).append(ev.audio)
        step += 1
        if step == 6:
            assert frames[victim] == 6 and sum(sizes[victim]) == 3  # 1 + 2; 3 pending
            assert eng.cancel(victim)
            assert victim not in eng._undecoded
    for i, r in zip(ids, reqs):
        n = frames[i]
        want, c = [], 0
        while sum(want) < n:
            want.append(min(2 ** c, 4, n - sum(want)))
            c += 1
        assert sizes[i] == want, (sizes[i], n)
        with torch.no_grad():
            ref = vae.decode(tts.denormalize(alone(tts, r))[None])[0]
        torch.testing.assert_close(torch.cat(chunks[i], -1), ref, rtol=1e-4, atol=1e-4)
    assert eng.decoder.open_slots == [] and not eng._undecoded
    with pytest.raises(ValueError, match="decode_frames"):
        Engine(tts, num_blocks=8, vae=vae, decode_frames=0)


def test_decode_chunks_never_exceed_decode_rows(tts):
    from calm_fast.codec.vae import VAE, vae_preset

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny")).eval()
    reqs = [Request(tts.prefix(tokens=torch.tensor([i + 1])), 6, seed=i, eos_threshold=None)
            for i in range(4)]
    eng = Engine(tts, num_blocks=96, block_size=4, max_streams=4, vae=vae, decode_frames=4)
    eng.DECODE_ROWS = 2  # chunks of at most 2 frames, whatever decode_frames says
    for r in reqs:
        eng.submit(r)
    sizes = [ev.audio.shape[-1] // vae.cfg.frame_size for ev in eng.run()
             if ev.audio is not None]
    assert max(sizes) == 2 and sum(sizes) == 4 * 6, sizes


def test_a_steps_streams_are_decoded_in_calls_of_at_most_decode_rows(tts):
    """4 streams with DECODE_ROWS = 4 and chunks of 1, 2, 4 frames: 4, 2, then 1 stream
    per VAE call; the audio equals one-at-a-time decoding."""
    from calm_fast.codec.vae import VAE, vae_preset

    torch.manual_seed(0)
    vae = VAE(vae_preset("tiny")).eval()
    reqs = [Request(tts.prefix(tokens=torch.tensor([i + 1])), 7, seed=i, eos_threshold=None)
            for i in range(4)]
    eng = Engine(tts, num_blocks=96, block_size=4, max_streams=4, vae=vae, decode_frames=4)
    eng.DECODE_ROWS = 4
    calls = []
    real = eng.decoder.decode
    eng.decoder.decode = lambda slots, lat: calls.append(lat.shape[:2]) or real(slots, lat)
    ids = [eng.submit(r) for r in reqs]
    chunks = {}
    for ev in eng.run():
        if ev.audio is not None:
            chunks.setdefault(ev.request, []).append(ev.audio)
    assert calls and all(n * f <= 4 for n, f in calls), calls
    assert {(4, 1), (2, 2), (1, 4)} <= set(calls), calls
    for i, r in zip(ids, reqs):
        with torch.no_grad():
            ref = vae.decode(tts.denormalize(alone(tts, r))[None])[0]
        torch.testing.assert_close(torch.cat(chunks[i], -1), ref, rtol=1e-4, atol=1e-4)


def test_requests_arriving_together_are_prefilled_together(tts, monkeypatch):
    """Requests admitted in one step go through one batched prefill (their first frames come
    together); if that prefill fails, no block is lost and every request waits again, then
    runs to the same frames as alone."""
    from calm_fast.fast import backbone as fb

    reqs = ragged_tts_requests(tts)
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=8)
    base = eng.cache.manager.num_free_blocks
    ids = {eng.submit(r): k for k, r in enumerate(reqs)}
    batches, real = [], fb.prefill_many

    def failing_once(p, cache, items, outputs=False):
        batches.append(len(items))
        if len(batches) == 1:
            raise MemoryError("no room for the prefill")
        return real(p, cache, items, outputs)

    monkeypatch.setattr(fb, "prefill_many", failing_once)
    with pytest.raises(MemoryError):
        eng.step()
    assert eng.running == 0 and eng.queue_depth == len(reqs) and eng.reserved == 0
    assert [p.rid for p in eng.waiting] == sorted(ids)  # in their order
    assert eng.cache.manager.num_free_blocks == base - eng._templates  # (the CFG null row)
    frames = {}
    while eng.running or eng.queue_depth:
        for ev in eng.step():
            if ev.latent is not None:
                frames.setdefault(ids[ev.request], []).append(ev.latent)
    assert batches[1] >= len(reqs)  # all of them (and their CFG streams) in one call
    for k, r in enumerate(reqs):
        torch.testing.assert_close(torch.stack(frames[k]), alone(tts, r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_first_frame_comes_out_of_the_prefill(tts, monkeypatch, cfg):
    """A request's first frame input rides along with its prefill (one pass over the
    weights): the step that admits it runs no backbone step for it, later steps do, and its
    frames are those of the request alone. A request joining a running batch adds no row to
    that step's backbone call."""
    from calm_fast.fast import backbone as fb

    rows, real = [], fb.step_rows
    monkeypatch.setattr(fb, "step_rows",
                        lambda p, c, x, *a: rows.append(x.shape[0]) or real(p, c, x, *a))
    reqs = [Request(tts.prefix(tokens=torch.tensor([3, 1, 4])), 5, seed=1, eos_threshold=None,
                    cfg_scale=cfg),
            Request(tts.prefix(tokens=torch.tensor([2, 7])), 4, seed=2, eos_threshold=None,
                    cfg_scale=cfg)]
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=4)
    base = eng.cache.manager.num_free_blocks
    per = 2 if cfg != 1 else 1  # backbone rows per running request
    ids = {eng.submit(reqs[0]): 0}
    frames = {}

    def step():
        for ev in eng.step():
            if ev.latent is not None:
                frames.setdefault(ids[ev.request], []).append(ev.latent)
        check_reserve(eng)

    step()
    assert rows == []  # the first frame read no weights of its own
    ids[eng.submit(reqs[1])] = 1
    step()
    assert rows == [per]  # request 0's second frame only: request 1's first came with its prefill
    while eng.running or eng.queue_depth:
        step()
    assert rows[1:] == [2 * per] * 3  # both finish on the fifth step
    for k, r in enumerate(reqs):
        torch.testing.assert_close(torch.stack(frames[k]), alone(tts, r), rtol=1e-4, atol=1e-4)
    assert eng.cache.manager.num_free_blocks == base - eng._templates
