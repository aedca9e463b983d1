"""fast.calibrate / ops.cpu_layout: the fp32 CPU backbone layout is chosen by measurement on
this host (once per process, CPU model, thread count and shape), CALM_FAST_CPU_GEMM forces
either, and both layouts generate the same frames."""
import pytest
import torch

from calm_fast.errors import ArgumentError
from calm_fast.fast import backbone as fb
from calm_fast.fast import calibrate, ops
from calm_fast.fast.cpu_linear import SplitLinear
from calm_fast.runtime.generate import CALMGenerator, Request
from paged_fixtures import random_sd


@pytest.fixture
def plain():
    return fb.pack_transformer(random_sd(), heads=4)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(calibrate, "_CHOICES", {})


def fake_timer(native, torch_s, calls):
    def timer(layouts, step, prefill):
        assert step is fb.step and prefill is fb.prefill
        calls.append(sorted(layouts))
        return {"native": native, "torch": torch_s}
    return timer


def test_torch_is_chosen_only_when_clearly_faster_and_once_per_shape(plain):
    split = plain.split()
    calls = []
    assert calibrate.choose(plain, split, fb.step, fb.prefill, fake_timer(1.0, 0.95, calls)) == "native"  # a tie
    assert calibrate.choose(plain, split, fb.step, fb.prefill, fake_timer(1.0, 0.5, calls)) == "native"  # cached
    assert calls == [["native", "torch"]]
    calibrate._CHOICES.clear()
    assert calibrate.choose(plain, split, fb.step, fb.prefill, fake_timer(1.0, 0.8, calls)) == "torch"
    other = fb.pack_transformer(random_sd(ff=96), heads=4)  # another shape: measured again
    assert calibrate.choose(other, other.split(), fb.step, fb.prefill, fake_timer(0.5, 1.0, calls)) == "native"
    assert len(calls) == 3


def test_time_layouts_times_each_layout_on_its_own_cache(plain):
    t = calibrate.time_layouts({"native": plain.split(), "torch": plain}, fb.step,
                               fb.prefill, ctx=5, reps=3)
    assert set(t) == {"native", "torch"} and all(0 < v < 1 for v in t.values())


def test_env_forces_a_layout_and_rejects_others(plain, monkeypatch):
    monkeypatch.setenv("CALM_FAST_CPU_GEMM", "torch")
    p, kind = ops.cpu_layout(plain, fb.step, fb.prefill)
    assert kind == "torch" and p is plain
    monkeypatch.setenv("CALM_FAST_CPU_GEMM", "native")
    p, kind = ops.cpu_layout(plain, fb.step, fb.prefill)
    assert kind == "native" and isinstance(p.layers[0].w1, SplitLinear)
    monkeypatch.setenv("CALM_FAST_CPU_GEMM", "fastest")
    with pytest.raises(ArgumentError, match="CALM_FAST_CPU_GEMM"):
        ops.cpu_layout(plain, fb.step, fb.prefill)


def test_auto_measures_big_models_only(plain, monkeypatch):
    monkeypatch.setenv("CALM_FAST_CPU_GEMM", "auto")
    calls = []
    monkeypatch.setattr(calibrate, "time_layouts", fake_timer(1.0, 0.5, calls))
    assert ops.cpu_layout(plain, fb.step, fb.prefill)[1] == "native" and not calls  # small: ours, no timing
    monkeypatch.setattr(ops, "SMALL_MODEL_BYTES", 0)
    if ops.has_native("decode_step"):
        p, kind = ops.cpu_layout(plain, fb.step, fb.prefill)
        assert kind == "torch" and p is plain and calls


def test_both_layouts_generate_the_same_frames(tts, monkeypatch):
    reqs = [Request(tts.prefix(tokens=torch.tensor([1, 2, 3])), 6, seed=3, eos_threshold=None),
            Request(tts.prefix(tokens=torch.tensor([4])), 4, seed=5, eos_threshold=None)]
    out = {}
    for mode in ("native", "torch"):
        monkeypatch.setenv("CALM_FAST_CPU_GEMM", mode)
        gen = CALMGenerator(tts)
        assert gen.layout == mode
        out[mode] = gen.generate(reqs)
    for a, b in zip(out["native"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
