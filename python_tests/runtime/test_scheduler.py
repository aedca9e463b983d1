"""The generation core (runtime/scheduler.py): admit / step / release and block accounting."""
import torch

from calm_fast.runtime.generate import CALMGenerator
from calm_fast.runtime.scheduler import Request, Scheduler


def test_admit_step_release_keep_the_block_promises(tts):
    sched = Scheduler(tts, num_blocks=64, block_size=4, max_streams=8)
    sched.setup(0, 0, 0)
    free0 = sched.free_blocks
    reqs = [Request(tts.prefix(tokens=torch.tensor([3, 4, 5])), 6, seed=1, eos_threshold=None),
            Request(tts.prefix(tokens=torch.tensor([7])), 9, seed=2, cfg_scale=2.0,
                    eos_threshold=None)]
    streams = []
    for i, r in enumerate(reqs):
        sched.check(i, r)
        streams.append(sched.admit(i, r, ring_slot=i))
    need = sum(sched.blocks_for(r) for r in reqs)
    # what is allocated plus what is promised is exactly what the requests may ever take
    assert (free0 - sched.free_blocks) + sched.reserved == need
    made = {0: 0, 1: 0}
    live = list(streams)
    while live:
        out = sched.step(live)
        for i in out.ids:
            made[i] += 1
        assert sched.reserved >= 0 and sched.available >= 0
    assert made == {0: 6, 1: 9}
    assert sched.reserved == 0 and sched.free_blocks == free0  # all released


def test_generator_runs_on_the_scheduler_and_matches_it(tts):
    r = Request(tts.prefix(tokens=torch.tensor([3, 4])), 5, seed=7, eos_threshold=None)
    want = CALMGenerator(tts).generate([r])[0]
    assert isinstance(CALMGenerator(tts), Scheduler)
    sched = Scheduler(tts)
    sched.setup(sched.blocks_for(r), 1, 1)
    s = sched.admit(0, r, 0)
    frames = []
    live = [s]
    while live:
        frames.append(sched.step(live).latents)
    # (cache sizes differ, so the attention may split its work differently: rounding only)
    torch.testing.assert_close(torch.cat(frames), want, rtol=1e-5, atol=1e-5)
