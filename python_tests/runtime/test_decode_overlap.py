"""Engine(overlap=True): the decoder on its own thread (runtime.decode_worker) gives the
frames of the engine without it (the same bits: the LM's C++ step does not depend on its
thread count) and its audio (to the decoder's rounding), in the same order per request; a stream's first
chunk comes out in the step that made it; cancelling, errors and the caller's thread count
behave."""
import threading

import pytest
import torch

from calm_fast.codec.vae import VAE, vae_preset
from calm_fast.runtime.decode_slots import DecodeSlots
from calm_fast.runtime.decode_worker import DecodeWorker
from calm_fast.runtime.engine import Engine
from calm_fast.runtime.generate import Request
from golden import ragged_tts_requests


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return VAE(vae_preset("tiny")).eval()


def drive(eng, reqs, cancel_at=None):
    """Step to the end: per request its latents, audio chunks and the step of its first
    audio; optionally cancel request ``cancel_at[1]`` before step ``cancel_at[0]``."""
    ids = [eng.submit(r) for r in reqs]
    lats, audio, first, step = {}, {}, {}, 0
    while eng.running or eng.queue_depth or eng._held:
        if cancel_at and step == cancel_at[0]:
            assert eng.cancel(ids[cancel_at[1]])
        for ev in eng.step():
            k = ids.index(ev.request)
            if ev.latent is not None:
                lats.setdefault(k, []).append(ev.latent)
            if ev.audio is not None:
                audio.setdefault(k, []).append(ev.audio)
                first.setdefault(k, step)
        step += 1
    return lats, audio, first


@pytest.mark.parametrize("overlap_streams", [4, 1])
def test_overlap_gives_the_same_frames_audio_and_first_chunks(tts, vae, overlap_streams):
    """overlap_streams 1: steps with more streams decode on the engine thread (after what
    the worker holds), the others on the worker."""
    reqs = ragged_tts_requests(tts)
    reqs.append(Request(tts.prefix(tokens=torch.tensor([3, 1])), 12, seed=4,
                        eos_threshold=None))
    torch.set_num_threads(2)
    runs = []
    for overlap in (False, True):
        eng = Engine(tts, num_blocks=96, block_size=4, max_streams=3, vae=vae,
                     decode_frames=4, overlap=overlap)  # max_streams 3: one request waits
        eng.OVERLAP_STREAMS = overlap_streams
        runs.append(drive(eng, reqs))
        assert torch.get_num_threads() == 2  # the LM's share is given back after each step
        if overlap:
            eng._worker.sync()
            assert eng.decoder.open_slots == [] and not eng._held
    (la, aa, fa), (lb, ab, fb) = runs
    assert sorted(la) == sorted(lb) == list(range(len(reqs)))
    for k in la:
        # the LM runs on one thread or two, step by step: our C++ step's sums do not
        # depend on the thread count (Scheduler.thread_invariant), so the bits are equal
        assert torch.equal(torch.stack(lb[k]), torch.stack(la[k]))
        assert [a.shape for a in aa[k]] == [a.shape for a in ab[k]]
        # the decoder runs on one thread on the worker: torch's convolutions may round
        # differently from the engine thread's two (its path follows the requests)
        torch.testing.assert_close(torch.cat(ab[k], -1), torch.cat(aa[k], -1),
                                   rtol=1e-5, atol=1e-6)
    assert fa == fb  # the first chunk is waited for: no later than without overlap


def test_the_same_requests_give_the_same_bits_whatever_the_decoder_timing(tts, vae):
    """A decoder that is sometimes slow (so the LM's steps meet it busy or idle at random)
    changes nothing: the LM takes the decoder's core only while it is idle, and its sums do
    not depend on its thread count."""
    import random
    import time

    reqs = [Request(tts.prefix(tokens=torch.tensor([i + 1, 3])), 9, seed=i,
                    eos_threshold=None) for i in range(2)]
    torch.set_num_threads(2)
    runs = []
    for trial in range(3):
        eng = Engine(tts, num_blocks=96, block_size=4, max_streams=2, vae=vae,
                     decode_frames=2, overlap=True)
        real, rng = eng.decoder.decode, random.Random(trial)

        def jittery(slots, lat):
            time.sleep(rng.choice([0.0, 0.0, 0.003]))
            return real(slots, lat)

        eng.decoder.decode = jittery
        runs.append(drive(eng, reqs))
    for lats, audio, _ in runs[1:]:
        for k in range(2):
            assert torch.equal(torch.stack(lats[k]), torch.stack(runs[0][0][k]))
            assert torch.equal(torch.cat(audio[k], -1), torch.cat(runs[0][1][k], -1))


@pytest.mark.parametrize("invariant", [True, False])
def test_the_lm_takes_the_decoders_core_while_it_is_idle(tts, vae, invariant):
    """With a thread-invariant LM step, steps that meet the decoder busy run on one thread
    and the others on both; otherwise (torch's or fbgemm's kernels) every overlapped step
    keeps to one, whatever the timing."""
    import time

    reqs = [Request(tts.prefix(tokens=torch.tensor([2, 3])), 10, seed=0, eos_threshold=None)]
    torch.set_num_threads(2)
    eng = Engine(tts, num_blocks=96, block_size=4, max_streams=2, vae=vae, decode_frames=2,
                 overlap=True)
    if not invariant:
        eng.sched.layout = "torch"
    assert eng.sched.thread_invariant is invariant
    real_decode, real_step, seen = eng.decoder.decode, eng.sched.step, []

    def slow(slots, lat):  # a decode outlasts the LM step queued right after it
        time.sleep(0.05)
        return real_decode(slots, lat)

    def step(streams):
        seen.append(torch.get_num_threads())
        return real_step(streams)

    eng.decoder.decode, eng.sched.step = slow, step
    drive(eng, reqs)
    assert set(seen) == ({1, 2} if invariant else {1})
    assert torch.get_num_threads() == 2


def test_cancel_while_decoding_drops_its_events_and_keeps_the_others(tts, vae):
    reqs = [Request(tts.prefix(tokens=torch.tensor([i + 1, 2])), 10, seed=i,
                    eos_threshold=None) for i in range(3)]
    ref = drive(Engine(tts, num_blocks=96, block_size=4, max_streams=3, vae=vae,
                       decode_frames=2), reqs, cancel_at=(5, 1))
    eng = Engine(tts, num_blocks=96, block_size=4, max_streams=3, vae=vae, decode_frames=2,
                 overlap=True)
    got = drive(eng, reqs, cancel_at=(5, 1))
    for k in (0, 2):  # the others are as without overlap
        torch.testing.assert_close(torch.cat(got[1][k], -1), torch.cat(ref[1][k], -1),
                                   rtol=1e-5, atol=1e-6)
    # the cancelled one: never more than it made before the cancel, nothing after
    assert len(got[0][1]) <= 5 and len(ref[0][1]) == 5
    eng._worker.sync()
    assert eng.decoder.open_slots == [] and not eng._undecoded
    # the engine takes new work on the freed slots
    again = drive(eng, reqs[:1])
    torch.testing.assert_close(torch.cat(again[1][0], -1), torch.cat(ref[1][0], -1),
                               rtol=1e-5, atol=1e-6)


def test_a_decoder_error_surfaces_in_the_engine_thread(tts, vae):
    eng = Engine(tts, num_blocks=64, block_size=4, max_streams=2, vae=vae, overlap=True)

    def broken(slots, lat):
        raise RuntimeError("decoder broke")

    eng.decoder.decode = broken
    eng.submit(Request(tts.prefix(tokens=torch.tensor([1, 2])), 4, seed=0,
                       eos_threshold=None))
    with pytest.raises(RuntimeError, match="decoder broke"):
        list(eng.run())


def test_worker_runs_calls_in_order_on_its_own_thread(vae):
    slots = DecodeSlots(vae, 2)
    w = DecodeWorker(slots)
    names = []
    real = slots.decode
    slots.decode = lambda s, lat: names.append(
        (threading.current_thread().name, torch.get_num_threads())) or real(s, lat)
    torch.set_num_threads(2)  # the caller's later setting does not reach the worker's
    w.open(0)
    lat = torch.randn(1, 1, vae.cfg.latent_dim)
    a = w.decode([0], lat)
    w.close(0)
    w.open(0)  # reopened: a fresh stream, so the same frame gives the same audio
    b = w.decode([0], lat)
    torch.testing.assert_close(a.result(), b.result())
    assert names == [("calm-fast-decoder", 1)] * 2
    w.close(5)  # a bad call nobody waits on is raised at the next sync
    with pytest.raises(IndexError):
        w.sync()
    w.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        w.open(0)


def test_overlap_must_be_a_bool(tts, vae):
    with pytest.raises(TypeError, match="overlap"):
        Engine(tts, num_blocks=8, vae=vae, overlap="yes")
