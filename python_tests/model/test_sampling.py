"""Samplers against heads whose ideal output is known in closed form."""
import math

import pytest
import torch

from calm_fast.model.sampling import (EOSRule, consistency_sample, consistency_schedule, gaussian_noise, latent_cfg, lsd_sample)

TARGET = torch.tensor([[1.5, -2.0, 0.5]])


def ideal_consistency_F(c, x, times):
    """For data = one point x*, f(x_t, t) = x* for every (x_t, t): F = (cos t x_t - x*)/sin t."""
    (t,) = times
    return (math.cos(t) * x - TARGET) / math.sin(t)


def ideal_lsd_F(c, x, times):
    """Straight paths x_s = s x* + (1 - s) e: the flow map's F(x_s, s, t) = (x* - x_s)/(1 - s)."""
    s, _ = times
    return (TARGET - x) / (1 - s)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ideal_heads_land_on_the_data_in_any_number_of_steps(steps):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, generator=g)
    out = consistency_sample(ideal_consistency_F, None, noise, steps,
                             renoise=lambda: torch.randn(1, 3, generator=g))
    torch.testing.assert_close(out, TARGET)
    torch.testing.assert_close(lsd_sample(ideal_lsd_F, None, noise, steps), TARGET)


def test_multistep_consistency_renoises_at_the_schedule_times():
    seen = []

    def F(c, x, times):
        seen.append(times[0])
        return torch.zeros_like(x)

    consistency_sample(F, None, torch.ones(1, 2), 4, renoise=lambda: torch.ones(1, 2))
    assert seen == consistency_schedule(4) == pytest.approx(
        [math.pi / 2, 3 * math.pi / 8, math.pi / 4, math.pi / 8])
    with pytest.raises(ValueError, match="renoise"):
        consistency_sample(F, None, torch.ones(1, 2), 2)


def test_gaussian_temperature_std_is_sqrt_tau():
    x = gaussian_noise([0.3] * 4000, 16, generators=None)
    assert abs(x.std().item() - math.sqrt(0.3)) < 0.01
    assert gaussian_noise([0.0], 4).abs().max() == 0
    y = gaussian_noise([4.0] * 200, 16, clamp=1.0)
    assert y.abs().max() <= 1.0 and y.std() > 0.5


def test_per_stream_generators_are_independent_of_the_batch():
    a = gaussian_noise([0.7, 0.5], 8, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    b = gaussian_noise([0.5], 8, generators=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(a[1:], b)
    with pytest.raises(ValueError, match="generators"):
        gaussian_noise([0.5, 0.5], 8, generators=[torch.Generator()])
    with pytest.raises(ValueError, match="temperatures"):
        gaussian_noise([float("nan")], 8)


def test_latent_cfg():
    zc, zn = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert latent_cfg(zc, zn, 1.5).item() == 2.5
    assert latent_cfg(zc, zn, 1.0).item() == 2.0


def test_eos_rule_follows_pocket_tts():
    r = EOSRule(-4.0, frames_after_eos=0)
    assert r.keep(0, -5.0) and not r.keep(1, -3.0)  # the EOS frame itself is dropped
    r = EOSRule(-4.0, frames_after_eos=2)
    assert r.keep(0, -3.0) and r.keep(1, -9.0) and not r.keep(2, -9.0)
    r = EOSRule(-4.0, min_frames=3)
    assert r.keep(1, 0.0) and r.eos_at is None
    r = EOSRule(None)
    assert all(r.keep(i, 100.0) for i in range(5))
