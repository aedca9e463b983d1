"""Aligned-text CALM models (model/aligned_text.py): the text reaches each frame as rows
placed by durations; the fast generator adds them exactly where the dense model does."""
from dataclasses import replace

import pytest
import torch

from calm_fast.errors import ArgumentError
from calm_fast.model.calm import CALM
from calm_fast.model.config import preset
from calm_fast.runtime.generate import CALMGenerator, Request
from golden import dense_generate, perturbed


@pytest.fixture(scope="module")
def aligned():
    torch.manual_seed(0)
    return perturbed(CALM(replace(preset("tiny"), aligned_text=True)))


def test_rows_follow_the_durations(aligned):
    m = aligned
    ids = m.text_ids(tokens=torch.tensor([3, 4, 5]))
    assert ids.tolist() == [0, 3, 4, 5, 0]  # the silences at both ends
    dur = torch.tensor([3, 8, 8, 2, 4])  # 25 sub-frames -> 4 frames (the last one partly)
    prefix, rows = m.text_inputs(tokens=torch.tensor([3, 4, 5]), durations=dur)
    assert prefix.shape == (1, 64) and rows.shape == (4, 64)
    h = m.text_states(ids)
    # frame 1 covers sub-frames 8..15: 3 of phoneme 1 (3..10), then 5 of phoneme 2
    e = m.aligned.fold_in(h)
    seq = torch.cat([e[1:2].expand(3, -1), e[2:3].expand(5, -1)]) + m.aligned.fold_pos
    torch.testing.assert_close(rows[1], m.aligned.fold(seq.reshape(-1)))
    # a change of phoneme 3's duration moves nothing before it
    _, rows2 = m.text_inputs(tokens=torch.tensor([3, 4, 5]), durations=torch.tensor([3, 8, 8, 9, 4]))
    torch.testing.assert_close(rows2[:2], rows[:2])
    assert rows2.shape[0] == 4 and not torch.allclose(rows2[3], rows[3])


def test_predicted_durations_and_speed(aligned):
    m = aligned
    v = torch.randn(6, 8)
    _, rows = m.text_inputs(tokens=torch.arange(1, 30), voice=v)
    _, fast = m.text_inputs(tokens=torch.arange(1, 30), voice=v, speed=2.0)
    assert fast.shape[0] < rows.shape[0]
    h = m.text_states(m.text_ids(tokens=torch.arange(1, 30)))
    d = m.aligned.durations(h[None], v.mean(0)[None])[0]
    assert rows.shape[0] == -(-int(d.sum()) // 8) and bool((d >= 1).all())


def test_prefix_refuses_text_and_bad_speed(aligned):
    with pytest.raises(ValueError, match="aligned frame rows"):
        aligned.prefix(tokens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="speed must be"):
        aligned.text_inputs(tokens=torch.tensor([1]), speed=0)
    with pytest.raises(ValueError, match="empty text"):
        aligned.text_inputs(tokens=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="frames, more than"):
        aligned.text_inputs(tokens=torch.tensor([1]), durations=torch.tensor([1, 8 * 600, 1]))


def test_fast_generation_equals_the_dense_model(aligned):
    m = aligned
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i, (n, cfg) in enumerate([(3, 1.0), (7, 1.5), (2, 1.0)]):
        prefix, rows = m.text_inputs(tokens=torch.arange(1, n + 1), voice=torch.randn(4, 8, generator=g),
                                     durations=torch.full((n + 2,), 5))
        reqs.append(Request(prefix, len(rows), temperature=0.5, cfg_scale=cfg, seed=10 + i,
                            frame_cond=rows, eos_threshold=None))
    got = CALMGenerator(m).generate(reqs)
    for r, x in zip(reqs, got):
        assert x.shape[0] == r.max_frames
        torch.testing.assert_close(x, dense_generate(m, r), atol=2e-5, rtol=1e-4)
    # the rows matter: the same request without them differs
    bare = replace(reqs[0], frame_cond=None)
    assert not torch.allclose(CALMGenerator(m).generate([bare])[0], got[0])


def test_frame_cond_is_checked(aligned, tts):
    prefix, rows = aligned.text_inputs(tokens=torch.tensor([1]), durations=torch.tensor([8, 8, 8]))
    gen = CALMGenerator(aligned)
    with pytest.raises(ArgumentError, match="fewer than max_frames"):
        gen.generate([Request(prefix, 4, frame_cond=rows)])
    with pytest.raises(ArgumentError, match="NaN"):
        gen.generate([Request(prefix, 3, frame_cond=rows * float("nan"))])
    with pytest.raises(ArgumentError, match=r"frame_cond must be float \[frames, 64\]"):
        gen.generate([Request(prefix, 3, frame_cond=rows[:, :5])])
    with pytest.raises(ArgumentError, match="reads its text in the prefix"):
        CALMGenerator(tts).generate([Request(tts.prefix(tokens=torch.tensor([1])), 3,
                                             frame_cond=rows)])
