"""A toy training run for the trainer tests, runnable as a script (torchrun, kill tests).

    python train_toy.py OUT_DIR STEPS [--kill-at N] [--global-batch B]
"""
import argparse
import os
import signal
import socket
import subprocess
import sys

import torch
import torch.nn as nn

from calm_fast.train.trainer import Trainer, TrainConfig, shutdown_distributed


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300):
    """Run ``python -m torch.distributed.run`` on loopback with ``nproc`` gloo CPU ranks of
    one thread each, on a port that is free right now (a fixed port can still be held)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
                           *args], capture_output=True, text=True, env=env, timeout=timeout)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch_fn_for(global_batch):
    def batch_fn(step, micro, rank, world):
        g = torch.Generator().manual_seed(1000 * step + micro)
        x = torch.randn(global_batch, 4, generator=g)
        y = x @ torch.tensor([[0.5], [-1.0], [0.25], [2.0]])
        per = global_batch // world
        return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    return batch_fn


def loss_fn(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    return loss, {"mse": loss.item()}


def run(out_dir, steps, kill_at=None, global_batch=16, dropout=True, accum=1, batch_fn=None,
        **kw):
    model = make_model()
    if not dropout:
        model[2].p = 0.0
    cfg = TrainConfig(out_dir=out_dir, steps=steps, lr=1e-2, warmup=3, ckpt_every=5,
                      log_every=1, progress=False, accum=accum, **kw)

    def lf(m, b):
        trainer_step = trainer.step
        if kill_at is not None and trainer_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real, unannounced kill mid-step
        return loss_fn(m, b)

    trainer = Trainer(model, lf, batch_fn or batch_fn_for(global_batch), cfg)
    trainer.run()
    if trainer.world > 1:  # lets the torchrun test check that every rank trained
        with open(os.path.join(out_dir, f"rank{trainer.rank}.done"), "w") as f:
            f.write(str(trainer.world))
    return trainer


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--no-dropout", action="store_true")
    args = ap.parse_args()
    try:
        run(args.out, args.steps, args.kill_at, dropout=not args.no_dropout)
    finally:
        shutdown_distributed()
