"""Trainer: schedule, EMA, checkpoints, exact resume after a real kill, torchrun DDP."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from calm_fast.train.trainer import TrainConfig, lr_at

import train_toy  # python_tests/ is on the path (pyproject: pytest pythonpath)

HERE = Path(train_toy.__file__).parent


def weights(path):
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("rng/")}


def test_lr_schedule():
    cfg = TrainConfig(out_dir="/tmp/x", steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    const = TrainConfig(out_dir="/tmp/x", steps=10, lr=0.5, schedule="constant")
    assert lr_at(const, 7) == 0.5
    for bad in (dict(steps=0), dict(schedule="step"), dict(amp="int8"), dict(ema_decay=1.0)):
        with pytest.raises(ValueError):
            TrainConfig(out_dir="/tmp/x", **{"steps": 5, **bad})


def test_training_reduces_loss_and_logs(tmp_path):
    tr = train_toy.run(str(tmp_path), 60)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[-1]["step"] == 60
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert {"loss", "lr", "grad_norm", "mse", "steps_per_s"} <= set(rows[0])
    # EMA lags the weights but moved away from the initial ones
    init = train_toy.make_model()
    ema, cur = tr.ema.state_dict(), tr.model.state_dict()
    k = "0.weight"
    assert not torch.equal(ema[k], cur[k]) and not torch.equal(ema[k], init.state_dict()[k])


def test_resume_after_kill_is_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_toy.run(str(full), 20)
    script = [sys.executable, str(HERE / "train_toy.py"), str(killed), "20"]
    res = subprocess.run(script + ["--kill-at", "13"], capture_output=True)
    assert res.returncode == -9  # SIGKILL, after the checkpoint of step 10
    assert load_checkpoint(killed / "last.safetensors", model=train_toy.make_model(),
                           restore_rng=False)["step"] == 10
    subprocess.run(script, check=True, capture_output=True)
    a, b = weights(full / "last.safetensors"), weights(killed / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # model, EMA and optimizer moments all bit-identical
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_errors(tmp_path):
    model = train_toy.make_model()
    p = save_checkpoint(tmp_path / "c.safetensors", model=model, step=3)
    other = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.GELU(), torch.nn.Linear(32, 2))
    with pytest.raises(CheckpointError,
                       match=r"missing \['2.bias', '2.weight'\], unexpected \['3.bias'"):
        load_checkpoint(p, model=other)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad, model=model)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors", model=model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(p, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_nan_loss_is_reported(tmp_path):
    from calm_fast.train.trainer import Trainer

    model = train_toy.make_model()
    tr = Trainer(model, lambda m, b: (torch.tensor(float("nan"), requires_grad=True), {}),
                 train_toy.batch_fn_for(4), TrainConfig(out_dir=str(tmp_path), steps=2,
                                                        progress=False))
    with pytest.raises(FloatingPointError, match="nan at step 0"):
        tr.run()


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """accum=2 over the two halves of each step's batch == one full-batch step."""
    full_fn = train_toy.batch_fn_for(16)

    def halves(step, micro, rank, world):
        x, y = full_fn(step, 0, rank, world)
        return x[8 * micro:8 * (micro + 1)], y[8 * micro:8 * (micro + 1)]

    a = train_toy.run(str(tmp_path / "a"), 3, dropout=False, ema_decay=None)
    b = train_toy.run(str(tmp_path / "b"), 3, dropout=False, ema_decay=None, accum=2,
                      batch_fn=halves)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_single_process(tmp_path):
    """DDP over gloo with 2 ranks (8 samples each) == 1 process on the 16-sample batch."""
    single = tmp_path / "single"
    train_toy.run(str(single), 6, dropout=False)
    ddp = tmp_path / "ddp"
    res = train_toy.torchrun([str(HERE / "train_toy.py"), str(ddp), "6", "--no-dropout"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (ddp / "rank1.done").read_text() == "2"
    a, b = weights(single / "last.safetensors"), weights(ddp / "last.safetensors")
    for k in a:
        if k.startswith("model/"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_that_fails_late_loads_nothing(tmp_path):
    """A corrupt RNG tensor (the last part loaded) leaves model, EMA, optimizer and RNG as
    they were: loading is all or nothing."""
    from safetensors.torch import save_file
    from safetensors import safe_open

    src = train_toy.make_model()
    save_checkpoint(tmp_path / "c.safetensors", model=src, ema=train_toy.make_model(), step=3,
                    optimizer=torch.optim.AdamW(src.parameters()))
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    t["rng/torch"] = t["rng/torch"][:10]  # a cut generator state
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    torch.manual_seed(123)
    model, ema = train_toy.make_model(), train_toy.make_model()
    opt = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="cannot restore the training state.*nothing"):
        load_checkpoint(tmp_path / "bad.safetensors", model=model, ema=ema, optimizer=opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state_dict()["state"] and torch.equal(torch.get_rng_state(), rng)
    # the good one still loads whole
    assert load_checkpoint(tmp_path / "c.safetensors", model=model, ema=ema,
                           optimizer=opt)["step"] == 3
    assert all(torch.equal(src.state_dict()[k], v) for k, v in model.state_dict().items())
